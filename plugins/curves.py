"""curves.png in the run folder: training loss and validation accuracy by step."""
from __future__ import annotations

import json

from plait.core.hookspecs import hookimpl
from plait.core.stash import StashKey

#: The rows this run has logged (in the run's stash).
ROWS = StashKey[list[dict]]()


@hookimpl
def plait_fit_start(state):
    rows: list[dict] = []
    state.plugins.stash[ROWS] = rows
    metrics_file = state.run_dir / "metrics.jsonl"
    if metrics_file.exists():  # a resumed run draws its whole history
        rows.extend(json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip())


@hookimpl
def plait_log_metrics(metrics, state):
    state.plugins.stash.setdefault(ROWS, []).append(dict(metrics))


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (sum of terms)")
    if val:
        left.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val loss")
        right.plot([r["step"] for r in val], [r["accuracy"] for r in val], "o-", color="tab:green")
    left.set(xlabel="step", ylabel="loss", title="loss", yscale="log")
    left.legend()
    right.set(xlabel="step", ylabel="accuracy", title="validation accuracy", ylim=(0, 1.0))
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@hookimpl
def plait_fit_end(state):
    rows = state.plugins.stash.get(ROWS, [])
    if state.is_main and rows:
        plot(rows, state.run_dir / "curves.png")

