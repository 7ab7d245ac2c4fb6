"""``plait runs RUN...``: several runs side by side (the config keys they differ in, final
metrics, speed, MFU, memory, energy) and, with ``--plot``, one figure of their curves."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plait.core.errors import DataError
from plait.core.files import replaced_atomically
from plait.core.report import flatten

__all__ = ["Run", "compare", "find_runs", "plot_runs"]

#: The figures each run shows: (label, key path in metrics.json, format).
FIGURES: list[tuple[str, tuple[str, ...], str]] = [
    ("test accuracy", ("test", "fused", "accuracy"), "{:.4f}"),
    ("test loss", ("test", "fused", "loss"), "{:.4f}"),
    ("val accuracy", ("val", "accuracy"), "{:.4f}"),
    ("steps", ("steps",), "{}"),
    ("train seconds", ("train_seconds",), "{:.1f}"),
    ("samples/s", ("samples_per_s",), "{:.1f}"),
    ("tokens/s", ("tokens_per_s",), "{:.0f}"),
    ("GFLOP/sample", ("flops_per_sample",), "{:.4g}"),
    ("achieved TFLOP/s", ("achieved_tflops",), "{:.4g}"),
    ("MFU", ("mfu",), "{:.2%}"),
    ("peak RSS MB (max worker)", ("peak_rss_mb",), "{:.0f}"),
    ("energy J/sample", ("energy_j_per_sample",), "{:.4g}"),
]


@dataclass
class Run:
    """One run folder's config (flattened), final figures (metrics.json) and logged rows."""

    path: Path
    config: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def figure(self, keys: tuple[str, ...]) -> Any:
        if keys == ("peak_rss_mb",):
            peaks = [worker.get("rss") for worker in self.results.get("peak_memory_mb") or []]
            return max((p for p in peaks if p is not None), default=None)
        value: Any = self.results
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if keys == ("flops_per_sample",) and value is not None:
            return value / 1e9
        return value


def find_runs(paths: list[str]) -> list[Run]:
    """The runs named: run folders, or folders of run folders (each child with a config.yaml)."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if (path / "config.yaml").is_file():
            found.append(path)
        elif path.is_dir() and any((child / "config.yaml").is_file() for child in path.iterdir()):
            found.extend(sorted(child for child in path.iterdir() if (child / "config.yaml").is_file()))
        else:
            raise DataError(f"{path}: not a run folder (no config.yaml), nor a folder of run folders")
    return [_read(path) for path in found]


def _read(path: Path) -> Run:
    try:
        config = flatten(yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as exc:
        raise DataError(f"{path / 'config.yaml'}: not YAML: {exc}") from None
    run = Run(path, config)
    if (path / "metrics.json").is_file():
        run.results = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    if (path / "metrics.jsonl").is_file():
        for number, line in enumerate((path / "metrics.jsonl").read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    run.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{path / 'metrics.jsonl'}:{number}: not JSON") from None
    return run


def compare(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the config keys whose values differ between the runs (``run.name`` and
    ``run.runs_dir`` aside, which always do), then the figures any run has."""
    header = ["", *(run.name for run in runs)]
    keys = sorted({key for run in runs for key in run.config})
    differing = [key for key in keys if key not in ("run.name", "run.runs_dir")
                 and len({json.dumps(run.config.get(key), sort_keys=True) for run in runs}) > 1]
    rows = [[key, *(_cell(run.config.get(key, "—")) for run in runs)] for key in differing]
    for label, keys_path, form in FIGURES:
        values = [run.figure(keys_path) for run in runs]
        if any(v is not None for v in values):
            rows.append([label, *("—" if v is None else form.format(v) for v in values)])
    if all(run.figure(("energy_j_per_sample",)) is None for run in runs) and any(run.results for run in runs):
        rows.append(["energy J/sample", *("no meter" if run.results.get("energy_reason") else "—" for run in runs)])
    unfinished = [run.name for run in runs if not run.results]
    if unfinished:
        rows.append(["finished", *("no (no metrics.json)" if run.name in unfinished else "yes" for run in runs)])
    return header, rows


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def plot_runs(runs: list[Run], out: Path) -> Path:
    """One PNG of the runs' curves: training loss, validation accuracy and samples/s by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax, speed_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        train = [r for r in run.rows if r.get("split") == "train"]
        val = [r for r in run.rows if r.get("split") == "val" and "accuracy" in r]
        (line,) = loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=run.name)
        if val:
            acc_ax.plot([r["step"] for r in val], [r["accuracy"] for r in val], "o-", color=line.get_color(),
                        label=run.name)
        speed_ax.plot([r["step"] for r in train if "samples_per_s" in r],
                      [r["samples_per_s"] for r in train if "samples_per_s" in r], color=line.get_color(),
                      label=run.name)
    loss_ax.set(xlabel="step", ylabel="training loss", title="training loss", yscale="log")
    acc_ax.set(xlabel="step", ylabel="accuracy", title="validation accuracy")
    speed_ax.set(xlabel="step", ylabel="samples/s", title="throughput")
    for axis in (loss_ax, acc_ax, speed_ax):
        axis.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    fig.tight_layout()
    with replaced_atomically(out) as partial:
        fig.savefig(partial, format="png", dpi=110)
    plt.close(fig)
    return out
