"""``report.md``: the markdown that ``plait compress`` and distillation leave in a run folder."""
from __future__ import annotations

from pathlib import Path

from .files import write_text_atomic

__all__ = ["markdown_table", "write_report"]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A table's lines: the first column left-aligned (names), the others right-aligned (figures)."""

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    return [line(header), "|---|" + "---:|" * (len(header) - 1), *(line(row) for row in rows)]


def write_report(path: Path, lines: list[str]) -> None:
    write_text_atomic(path, "\n".join(lines) + "\n")
