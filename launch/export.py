"""``plait export RUN --format hf``: a trained run as the files other tools read.

Each tower is written in its own library's format by its encoder (``plait_save_native``: an HF folder
with config, safetensors and tokenizer; timm's safetensors with its ``pretrained_cfg``), after the plugins
have made the model plain again (``plait_export_model``: LoRA merged into its base). The fusion and the
head are safetensors, and ``README.md`` is the model card: the data, the metrics, the config.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from plait.core import checkpoint, hookspecs
from plait.core.report import markdown_table
from plait.core.runs import RUN_INFO, load_run

__all__ = ["export_hf"]


def _save_tensors(module: torch.nn.Module, path: Path) -> None:
    save_file(checkpoint.packed(module.state_dict()), str(path))


def export_hf(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's newest weights as native folders into ``out`` (default ``RUN/export``), atomically:
    a folder of that name is complete. Returns it."""
    config, plugins, state = load_run(run_dir)
    model: torch.nn.Module = plugins.chain(hookspecs.plait_export_model, "model", model=state.model.cpu(),
                                           config=config)
    out = out or run_dir / "export"
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts: list[list[str]] = []
    encoders = getattr(model, "encoders", None)
    if encoders is None:  # a whole model from plait_build_model
        _save_tensors(model, tmp / "model.safetensors")
        parts.append(["model.safetensors", type(model).__name__, "safetensors of the whole model"])
    else:
        for name, encoder in encoders.items():
            folder = tmp / f"{name}_encoder"
            folder.mkdir()
            native = getattr(encoder, "plait_save_native", None)
            if callable(native):
                native(folder)
                parts.append([f"{name}_encoder/", type(encoder).__name__, "its library's own folder"])
            else:
                _save_tensors(encoder, folder / "model.safetensors")
                parts.append([f"{name}_encoder/", type(encoder).__name__, "safetensors (plait's module)"])
        for name in ("fusion", "head"):
            _save_tensors(getattr(model, name), tmp / f"{name}.safetensors")
            parts.append([f"{name}.safetensors", type(getattr(model, name)).__name__, "safetensors (plait's module)"])
    (tmp / "README.md").write_text(_model_card(run_dir, config.run.name, parts), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def _model_card(run_dir: Path, name: str, parts: list[list[str]]) -> str:
    info: dict[str, Any] = json.loads((run_dir / RUN_INFO).read_text())
    metrics_file = run_dir / "metrics.json"
    metrics: dict[str, Any] = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    lines = [f"# {name}", "", f"Exported by `plait export --format hf` from the plait run folder `{run_dir}`.",
             "", "## Files", "", *markdown_table(["file", "module", "format"], parts), "",
             "## Data", "", f"- modalities: {', '.join(info['modalities'])}",
             f"- classes ({len(info['classes'])}): {', '.join(map(str, info['classes'][:20]))}"
             + (" ..." if len(info["classes"]) > 20 else ""),
             *(f"- {key}: {value}" for key, value in (info.get("data") or {}).items()), "", "## Metrics", ""]
    test = metrics.get("test", {})
    if test:
        rows = [[modality, f"{values.get('accuracy', float('nan')):.4f}", f"{values.get('loss', float('nan')):.4f}"]
                for modality, values in test.items() if isinstance(values, dict)]
        lines += markdown_table(["test split", "accuracy", "loss"], rows)
    else:
        lines.append("No test metrics (the run had no test split, or had not finished).")
    lines += ["", "## Config", "", "```yaml", (run_dir / "config.yaml").read_text().rstrip(), "```", ""]
    return "\n".join(lines)
