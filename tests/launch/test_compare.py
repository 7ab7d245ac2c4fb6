"""``plait runs``: three real runs side by side, and their curves in one PNG."""
from __future__ import annotations

import pytest

from plait.core.errors import DataError
from plait.launch import cli
from plait.launch.compare import compare, find_runs
from plait.testing import train_steps

pytestmark = pytest.mark.timeout(300)


def test_plait_runs_compares_three_runs_and_plots_their_curves(tmp_path, capsys):
    for name, lr in (("a", 3e-3), ("b", 1e-3), ("c", 3e-4)):
        train_steps(tmp_path, steps=4, name=name, lr=lr, log_every=2)
    runs = find_runs([str(tmp_path / "runs")])
    assert [run.name for run in runs] == ["a", "b", "c"]
    header, rows = compare(runs)
    by_label = {row[0]: row[1:] for row in rows}
    assert header == ["", "a", "b", "c"]
    assert by_label["run.lr"] == ["0.003", "0.001", "0.0003"]
    assert "run.name" not in by_label and "plugins.fusion.dim" not in by_label  # only what differs
    for label in ("test accuracy", "samples/s", "MFU", "GFLOP/sample", "peak RSS MB (max worker)"):
        assert all(cell != "—" for cell in by_label[label]), label
    plot = tmp_path / "curves.png"
    assert cli.main(["runs", str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b"), str(tmp_path / "runs" / "c"),
                     "--plot", str(plot)]) == 0
    shown = capsys.readouterr().out
    assert "run.lr" in shown and "MFU" in shown and f"{plot}: written" in shown
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000
    with pytest.raises(DataError, match=r"nowhere: not a run folder"):
        find_runs([str(tmp_path / "nowhere")])
