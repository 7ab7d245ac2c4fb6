"""Tensor and expert parallelism on gloo workers (plait's own ``fit`` in spawned processes, wired as the Ray
runner wires it: ``worker_distributed``): a split model trains as the whole one does, its checkpoints resume
bitwise and load in one process."""
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_PLUGINS, free_port, gloo_world, spawn

from plait.core.loop import fit
from plait.core.runs import load
from plait.launch.ray_runner import worker_distributed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: No dropout anywhere: a tensor-parallel group draws its masks alike, but not as one process would.
STILL = {"text_encoder": {"hidden": 32, "layers": 2, "heads": 4, "dropout": 0.0},
         "fusion": {"dim": 32, "heads": 4, "layers": 2, "dropout": 0.0, "modality_dropout": 0.0,
                    "contrastive_weight": 0.1}}


def _worker(rank: int, workers: int, port: int, paths: list[str]) -> None:
    torch.set_num_threads(1)
    with gloo_world(rank, workers, port):
        for path in paths:
            config, plugins = load(path, [])
            distributed, _ = worker_distributed(config, rank, workers, torch.device("cpu"))
            fit(config, plugins, distributed)


def run_on(workers: int, *paths: Path) -> None:
    """Train each config in turn on ``workers`` spawned gloo processes."""
    spawn(_worker, workers, workers, free_port(), [str(p) for p in paths])


def losses(path: Path, name: str) -> list[float]:
    rows = [json.loads(line) for line in (path.parent / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["split"] == "train"]


def config(folder: Path, name: str, plugins: dict, workers: int, steps: int = 20, **scaling) -> Path:
    run = {"name": name, "runs_dir": str(folder / "runs"), "epochs": 1, "max_steps": steps, "batch_size": 8,
           "eval_batch_size": 32, "lr": 3e-3, "log_every": 1, "checkpoint_every": 10, "keep_checkpoints": 5}
    plugins = {"spoken_digits": TINY_PLUGINS["spoken_digits"], **copy.deepcopy(plugins)}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"run": run, "scaling": {"num_workers": workers, **scaling},
                                    "plugins": plugins}, sort_keys=False))
    return path


def test_tensor_parallel_text_encoder_and_fusion_train_as_one_process(tmp_path):
    whole = config(tmp_path, "whole", STILL, workers=0)
    fit(*load(str(whole), []))
    split = config(tmp_path, "tp2", STILL, workers=2, tensor_parallel=2)
    run_on(2, split)
    expected, got = losses(whole, "whole"), losses(split, "tp2")
    assert len(got) == len(expected) == 20
    assert got == pytest.approx(expected, rel=1e-5)


def final_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from plait.core import checkpoint

    return load_file(str(checkpoint.latest(folder / "runs" / name / "checkpoints") / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_fsdp_with_tensor_parallel_on_4_workers_trains_as_fsdp_on_2(tmp_path):
    plain = config(tmp_path, "fsdp", STILL, workers=2, strategy="fsdp")
    run_on(2, plain)
    mesh = config(tmp_path, "fsdp-tp", STILL, workers=4, strategy="fsdp", tensor_parallel=2)
    run_on(4, mesh)
    assert losses(mesh, "fsdp-tp") == pytest.approx(losses(plain, "fsdp"), rel=1e-5)


def test_a_tensor_parallel_run_stops_resumes_bitwise_and_loads_in_one_process(tmp_path):
    from plait.launch.evaluate import evaluate_run

    whole = config(tmp_path, "whole", STILL, workers=2, tensor_parallel=2)
    stopped = config(tmp_path, "split", {**STILL, "stop_at": {"step": 12}}, workers=2, tensor_parallel=2)
    with pytest.raises(Exception, match="stopped at step 12"):
        run_on(2, whole, stopped)
    run_on(2, config(tmp_path, "split", STILL, workers=2, tensor_parallel=2))
    assert losses(whole, "whole") == losses(whole, "split")
    assert_same(final_weights(tmp_path, "whole"), final_weights(tmp_path, "split"))
    # the checkpoint holds whole weights: one process evaluates it as the run's own test did
    tested = json.loads((tmp_path / "runs" / "whole" / "metrics.json").read_text())["test"]["fused"]
    assert evaluate_run(tmp_path / "runs" / "whole")["accuracy"] == pytest.approx(tested["accuracy"])


LM = {"wiki_lm": {"seq_len": 16, "dim": 32, "layers": 2, "heads": 4, "ffn": 64, "dropout": 0.0},
      "moe": {"experts": 4, "top_k": 2, "capacity_factor": None, "targets": ["transformers"]}}


def lm_config(folder: Path, name: str, plugins: dict, workers: int, **scaling) -> Path:
    path = config(folder, name, plugins, workers, **scaling)
    raw = yaml.safe_load(path.read_text())
    raw["plugins"].pop("spoken_digits")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_expert_parallel_trains_as_data_parallel_and_resumes_bitwise(tmp_path):
    dp = lm_config(tmp_path, "dp", LM, workers=2)
    ep = lm_config(tmp_path, "ep", LM, workers=2, expert_parallel=2)
    stopped = lm_config(tmp_path, "ep-split", {**LM, "stop_at": {"step": 12}}, workers=2, expert_parallel=2)
    with pytest.raises(Exception, match="stopped at step 12"):
        run_on(2, dp, ep, stopped)
    run_on(2, lm_config(tmp_path, "ep-split", LM, workers=2, expert_parallel=2))
    assert losses(ep, "ep") == pytest.approx(losses(dp, "dp"), rel=1e-5)
    assert losses(ep, "ep-split") == losses(ep, "ep")
    whole = final_weights(tmp_path, "ep")
    assert_same(whole, final_weights(tmp_path, "ep-split"))
    assert whole["blocks.layers.0.moe.w1"].shape[0] == 4  # every expert, whatever the mesh
    rows = [json.loads(line) for line in (tmp_path / "runs" / "ep" / "metrics.jsonl").read_text().splitlines()]
    dp_rows = [json.loads(line) for line in (tmp_path / "runs" / "dp" / "metrics.jsonl").read_text().splitlines()]
    # the loads are every worker's: the same under expert and data parallelism
    assert [r["moe0_load0"] for r in rows if "moe0_load0" in r] == pytest.approx(
        [r["moe0_load0"] for r in dp_rows if "moe0_load0" in r], abs=1e-6)


def _expert_layer(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from plait.plugins.moe import MoELayer, MoEOptions, settle_step

    torch.set_num_threads(1)
    with gloo_world(rank, 2, port):
        torch.manual_seed(0)
        whole = MoELayer(16, 32, MoEOptions(experts=4, top_k=2, capacity_factor=None))
        split = copy.deepcopy(whole)
        split.plait_expert_parallel(init_device_mesh("cpu", (2,)))
        tokens = torch.randn(2, 24, 16) * 3  # both workers' tokens; each sends its own half through the split layer
        expected = whole(tokens)
        expected.square().sum().backward()
        got = split(tokens[rank:rank + 1])
        (got.square().sum()).backward()
        settle_step([whole])
        settle_step([split])  # every worker's loads, all-reduced
        torch.save({"expected": expected[rank].detach(), "got": got[0].detach(),
                    "loads": [whole.window["load"], split.window["load"]],
                    "grads": [whole.w1.grad, split.w1.grad.full_tensor()]}, f"{out}/{rank}.pt")


def test_expert_parallel_dropless_routes_and_computes_as_one_process(tmp_path):
    spawn(_expert_layer, 2, free_port(), str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(result["got"], result["expected"], rtol=1e-5, atol=1e-6)
        whole_loads, split_loads = result["loads"]
        assert torch.equal(whole_loads, split_loads)  # the same experts for every token
        torch.testing.assert_close(result["grads"][1], result["grads"][0], rtol=1e-5, atol=1e-6)


def test_sharded_checkpoints_of_a_tensor_parallel_run_resume_bitwise_and_load_in_one_process(tmp_path):
    from plait.core.runs import load_run

    def sharded(path: Path) -> Path:
        raw = yaml.safe_load(path.read_text())
        raw["run"]["checkpoint_format"] = "sharded"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    whole = config(tmp_path, "whole", STILL, workers=2, tensor_parallel=2)
    stopped = sharded(config(tmp_path, "sharded", {**STILL, "stop_at": {"step": 12}}, workers=2, tensor_parallel=2))
    with pytest.raises(Exception, match="stopped at step 12"):
        run_on(2, whole, stopped)
    run_on(2, sharded(config(tmp_path, "sharded", STILL, workers=2, tensor_parallel=2)))
    assert losses(whole, "sharded") == losses(whole, "whole")
    # every worker wrote its own shards; one process reads them as the whole weights the full format gathered
    model = load_run(tmp_path / "runs" / "sharded")[2].model
    assert_same(final_weights(tmp_path, "whole"), {k: v.contiguous() for k, v in model.state_dict().items()})
