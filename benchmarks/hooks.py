"""What plait's own hook dispatch costs.

    .venv/bin/python benchmarks/hooks.py [--calls 200000] [--steps 40]

- ns per ``call_each`` of a hook with 1 and with 20 plugins implementing it (no-op bodies):
  the price of a hook call as such.
- step_overhead_fraction: the dispatch of every hook ``fit`` calls in one optimizer step
  (batch_start, loss_terms, after_backward, batch_end, and train_metrics / log_metrics once per
  ``log_every`` steps) with the default plugin set, its implementations swapped for no-ops so
  that only dispatch is timed, over the measured time of a default training step (in-process,
  one worker, median of the logged windows).

Last line: JSON {"ns_per_hook_call_1_plugin", "ns_per_hook_call_20_plugins", "step_overhead_fraction", ...}.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import inspect
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

from plait.core import hookspecs
from plait.core.config import load_config
from plait.core.hookspecs import hookimpl
from plait.core.manager import Plugins
from plait.core.runs import prepare
from plait.launch import ray_runner

ROOT = Path(__file__).resolve().parents[1]
PER_STEP = ["plait_batch_start", "plait_loss_terms", "plait_after_backward", "plait_batch_end"]
PER_LOG = ["plait_train_metrics", "plait_count_tokens", "plait_log_metrics"]
ARGUMENTS = {"state": None, "batch": None, "outputs": None, "loss": None, "metrics": {}, "step": 0}


def no_op_plugins(hooks_by_plugin: dict[str, list[str]]) -> Plugins:
    """Plugins whose implementations of the given hooks do nothing, loaded like any other."""
    for name, hooks in hooks_by_plugin.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        for hook in hooks:  # taking every argument of the hookspec, as real implementations do
            arguments = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
            exec(f"def {hook}({arguments}): return None", module.__dict__)
            setattr(module, hook, hookimpl(module.__dict__[hook]))
        sys.modules[name] = module
    return Plugins().load(hooks_by_plugin)


def ns_per_call(plugins: Plugins, hook: str, calls: int) -> float:
    spec = getattr(hookspecs, hook)  # as the loop calls it
    started = time.perf_counter_ns()
    for _ in range(calls):
        plugins.call_each(spec, **ARGUMENTS)
    return (time.perf_counter_ns() - started) / calls


def default_step_seconds(steps: int) -> tuple[float, int, int]:
    """(median seconds per optimizer step, batch size, log_every) of the default config, in-process."""
    with tempfile.TemporaryDirectory() as runs_dir:
        raw = load_config(ROOT / "plugins.yaml", ["scaling.num_workers=0", f"run.max_steps={steps}", "run.log_every=5",
                                                  f"run.runs_dir={runs_dir}", "run.name=hooks"])
        raw["plugins"].pop("curves", None)
        config, _ = prepare(raw, "plugins.yaml")
        ray_runner.train(config, raw)
        rows = [json.loads(line) for line in (Path(runs_dir) / "hooks" / "metrics.jsonl").read_text().splitlines()]
    speed = statistics.median(r["samples_per_s"] for r in rows if r["split"] == "train")
    defaults = prepare(load_config(ROOT / "plugins.yaml"), "plugins.yaml")[0].run
    return config.run.batch_size / speed, config.run.batch_size, defaults.log_every


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    one = ns_per_call(no_op_plugins({"bench_plugin_0": ["plait_batch_start"]}), "plait_batch_start", args.calls)
    twenty = ns_per_call(no_op_plugins({f"bench_plugin_{i}": ["plait_batch_start"] for i in range(20)}),
                         "plait_batch_start", args.calls)

    # dispatch only: stand-ins for the default plugins, each implementing the hooks its original
    # does, with bodies that do nothing
    _, default = prepare(load_config(ROOT / "plugins.yaml"), "plugins.yaml")
    implemented = {hook: default.implementers(getattr(hookspecs, hook)) for hook in PER_STEP + PER_LOG}
    plugins = no_op_plugins({f"bench_default_{name}": [h for h, names in implemented.items() if name in names]
                             for name in default.order})
    per_step_ns = sum(ns_per_call(plugins, hook, args.calls // 10) for hook in PER_STEP)
    per_log_ns = sum(ns_per_call(plugins, hook, args.calls // 10) for hook in PER_LOG)
    step_s, _batch_size, log_every = default_step_seconds(args.steps)
    dispatch_s = (per_step_ns + per_log_ns / log_every) * 1e-9
    print(f"hook call: {one:.0f} ns with 1 plugin, {twenty:.0f} ns with 20; default step: {step_s * 1e3:.1f} ms, "
          f"its hook dispatch {dispatch_s * 1e6:.1f} us", flush=True)
    print(json.dumps({"ns_per_hook_call_1_plugin": round(one, 1), "ns_per_hook_call_20_plugins": round(twenty, 1),
                      "step_overhead_fraction": round(dispatch_s / step_s, 6),
                      "step_ms": round(step_s * 1e3, 2), "dispatch_us_per_step": round(dispatch_s * 1e6, 2)}))


if __name__ == "__main__":
    main()
