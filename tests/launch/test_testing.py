"""plait.testing: the fixture plugin authors use."""
import time


def test_plait_run_trains_two_steps_with_a_plugin_in_seconds(plait_run):
    started = time.perf_counter()
    state = plait_run({"moe": {"experts": 2}})
    assert state.step == 2
    assert "moe_aux" in state.metrics["train"] and state.metrics["test"]["fused"]["samples"] == 64
    assert (state.run_dir / "checkpoints").is_dir()
    print(f"two steps in {time.perf_counter() - started:.1f} s")
