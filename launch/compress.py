"""``plait compress RUN_DIR [compress.yaml]``: a trained run in, a smaller run folder out.

compress.yaml is a config fragment merged over the run's own config: ``plugins:`` blocks of the
compressing plugins (chained through ``plait_compress`` in plugin order) and optionally
``run: {name: ...}`` for the new folder (default: ``<run folder>-compressed``, beside it). Without
it, or when no plugin in it compresses, the chain is ``quantize`` with its defaults. The new folder
is an ordinary run folder (``plait eval`` works on it) with ``report.md``: size on disk, CPU latency
at batch 1 and 32 (one thread) and test accuracy per modality and fused, before and after. Its
"after" figures come from the folder as written, reloaded, not from the model in memory.
"""
from __future__ import annotations

import copy
import json
import shutil
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from plait.core import checkpoint, hookspecs
from plait.core.config import load_config, merge
from plait.core.data import build_dataset, make_loader, move
from plait.core.errors import ConfigError, DataError
from plait.core.evaluation import evaluate_by_modality
from plait.core.files import write_json_atomic, write_text_atomic
from plait.core.model import cpu_latency_ms
from plait.core.report import markdown_table, write_report
from plait.core.runs import RUN_INFO, load_run, prepare
from plait.core.state import CompressJob, RunState

CALIBRATION_BATCH = 32


def _size_mib(run_dir: Path) -> float:
    newest = checkpoint.latest(run_dir / "checkpoints")
    assert newest is not None  # load_run refused a folder without one
    return (newest / "model.safetensors").stat().st_size / 2**20


def _test_loader(state: RunState):
    dataset = build_dataset(state.plugins, state.config, "test")
    if dataset is None:
        raise DataError(f"{state.run_dir}: the run's data set has no test split to measure the compression on")
    return make_loader(dataset, state.config.run.eval_batch_size, False, state.config.run.seed, 0)


def _calibration(state: RunState, config, plugins):
    """``calibration_batches(n)``: the first ``n`` validation batches (test if there is no validation split)."""
    cache: list[dict] = []

    def batches(n: int) -> list[dict]:
        if len(cache) < n:
            dataset = build_dataset(plugins, config, "val") or build_dataset(plugins, config, "test")
            if dataset is None:
                raise DataError(f"{state.run_dir}: the run's data set has neither a val nor a test split to "
                                "calibrate with")
            loader = make_loader(dataset, CALIBRATION_BATCH, False, config.run.seed, 0)
            cache[:] = [move(b, state.device) for b in islice(loader, n)]
        return cache[:n]

    return batches


def _measure(state: RunState, batch: dict) -> dict[str, Any]:
    model = state.model.eval()
    return {"accuracy": evaluate_by_modality(state, _test_loader(state)), "size_mib": _size_mib(state.run_dir),
            "latency_bs1_ms": cpu_latency_ms(model, batch, 1), "latency_bs32_ms": cpu_latency_ms(model, batch, 32),
            "parameters": sum(p.numel() for p in model.parameters())}


def compress_run(run_dir: Path, spec_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compress the run in ``run_dir``; return the before/after figures and the new folder."""
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run folder")
    _, _, source = load_run(run_dir)
    raw = source.config.to_dict()  # config.yaml as load_run read it
    spec = load_config(spec_path, overrides or []) if spec_path else {"plugins": {}}
    for key in set(spec.get("run", {})) - {"name", "runs_dir"}:
        raise ConfigError(f"{spec_path}: run.{key}: compress.yaml sets only run.name and run.runs_dir")
    merged = merge(raw, spec)
    merged["run"]["name"] = spec.get("run", {}).get("name", f"{run_dir.resolve().name}-compressed")
    merged["run"]["runs_dir"] = spec.get("run", {}).get("runs_dir", str(run_dir.parent))
    config, plugins = prepare(merged, str(spec_path or run_dir / "config.yaml"))
    if not plugins.implementers(hookspecs.plait_compress):
        merged["plugins"]["quantize"] = {}
        config, plugins = prepare(merged, str(spec_path or run_dir / "config.yaml"))
    out_dir = Path(config.run.runs_dir) / config.run.name
    if checkpoint.latest(out_dir / "checkpoints") is not None:
        raise ConfigError(f"{out_dir}: a run folder with weights exists already; choose another run.name "
                          "in compress.yaml (or remove it)")

    batch = move(next(iter(_test_loader(source))), torch.device("cpu"))
    before = _measure(source, batch)
    job = CompressJob(config=config, raw=merged, source=source, source_dir=run_dir, out_dir=out_dir,
                      calibration_batches=_calibration(source, config, plugins),
                      resolve=lambda r: prepare(r, str(spec_path or run_dir / "config.yaml")))
    model = copy.deepcopy(source.model)  # the source model stays as trained, for report.md
    model = plugins.chain(hookspecs.plait_compress, "model", model=model, job=job).eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", job.config.to_yaml())
    info = json.loads((run_dir / RUN_INFO).read_text())
    info["compressed_from"] = str(run_dir.resolve())
    write_json_atomic(out_dir / RUN_INFO, info)
    newest = checkpoint.latest(run_dir / "checkpoints")
    assert newest is not None  # load_run refused a folder without one
    step = int(newest.name.removeprefix(checkpoint.PREFIX))
    try:
        checkpoint.save(out_dir / "checkpoints", step, model.state_dict(), {}, keep=1)
        _, _, reloaded = load_run(out_dir)
    except Exception:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # nothing half-made is left to be trusted
        raise
    _check_reloads(model, reloaded.model, batch, source.device)
    after = _measure(reloaded, batch)
    write_report(out_dir / "report.md", report(run_dir, out_dir, before, after, job.notes))
    return {"run_dir": str(out_dir), "before": before, "after": after, "notes": job.notes}


def _check_reloads(model: torch.nn.Module, reloaded: torch.nn.Module, batch: dict, device: torch.device) -> None:
    """The folder must give back the model that was compressed, output for output."""
    with torch.inference_mode():
        a, b = model(move(batch, device))["logits"], reloaded(move(batch, device))["logits"]
    if not torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4):
        raise DataError(f"the compressed model does not reload to the same outputs (max difference "
                        f"{(a.float() - b.float()).abs().max():.3g}): a plait_compress plugin does not record "
                        "what it changed (job.set_plugin_options)")


def report(source_dir: Path, out_dir: Path, before: dict, after: dict, notes: list[str]) -> list[str]:
    """report.md's lines: size and latency, then test accuracy, before and after."""
    lines = [f"# Compression report: {out_dir.name}", "", f"From `{source_dir}`.", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "Latency: CPU, one thread, median of 5; size: model.safetensors.", ""]
    lines += markdown_table(["", "before", "after", "ratio"], [
        [label, f"{before[key]:.2f}", f"{after[key]:.2f}", f"{before[key] / after[key]:.2f}x {better}"]
        for key, label, better in (("size_mib", "size on disk (MiB)", "smaller"),
                                   ("latency_bs1_ms", "latency batch 1 (ms)", "faster"),
                                   ("latency_bs32_ms", "latency batch 32 (ms)", "faster"))])
    if after["latency_bs1_ms"] > before["latency_bs1_ms"] or after["latency_bs32_ms"] > before["latency_bs32_ms"]:
        lines += ["", ("Slower where the ratio is below 1x: with little data per layer (batch 1), converting "
                  "activations to and from int8 around each quantized layer costs more than the int8 arithmetic "
                  "saves.")]
    lines += [""]
    changes = [(modality, metrics["accuracy"], after["accuracy"][modality]["accuracy"])
               for modality, metrics in before["accuracy"].items()]
    lines += markdown_table(["test accuracy", "before", "after", "change"],
                            [[modality, f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"] for modality, a, b in changes])
    return lines
