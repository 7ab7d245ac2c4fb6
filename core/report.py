"""What a run leaves for people to read: ``report.md`` (``plait compress``, distillation), and the
flat names experiment trackers and ``plait runs`` give nested configs and metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import write_text_atomic

__all__ = ["flatten", "markdown_table", "numbers", "write_report"]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A table's lines: the first column left-aligned (names), the others right-aligned (figures)."""

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    return [line(header), "|---|" + "---:|" * (len(header) - 1), *(line(row) for row in rows)]


def write_report(path: Path, lines: list[str]) -> None:
    write_text_atomic(path, "\n".join(lines) + "\n")


def flatten(value: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts and lists as one level: ``{"plugins.fusion.dim": 32, "peak_memory_mb/0/rss": ...}``."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value} if prefix else {}
    flat: dict[str, Any] = {}
    for key, inner in items:
        flat.update(flatten(inner, f"{prefix}{sep}{key}" if prefix else str(key), sep))
    return flat


def numbers(row: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, float]:
    """The numeric entries of a metrics row, flattened (a tracker's metrics); flags and labels left out."""
    return {key: float(value) for key, value in flatten(row, prefix, sep).items()
            if isinstance(value, int | float) and not isinstance(value, bool)}
