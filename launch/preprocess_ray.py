"""``plait preprocess NAME --ray``: the plugin's transform over every chunk of the input at once, in Ray Data
``map_batches`` actors that each build the transform once (a plugin may load a vocabulary or an index).

Chunk N (``plait.launch.preprocess.plan_chunks``) becomes ``part-N.jsonl`` of the output folder. Ray Data keeps
the chunks' order (``preserve_order``), so the driver writes the parts as they arrive, each the lines of its
rows in input order: ``cat part-*.jsonl`` is the one-process output, byte for byte. The parts go to a temporary
folder renamed to ``--output`` at the end, so a failed run leaves no half output.

The actors read the input by its path: on a cluster of several nodes it must be on storage every node sees.
The driver writes the output, so only the driver's machine needs to reach ``--output``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from plait.core.errors import ConfigError, PlaitError
from plait.core.files import replaced_atomically
from plait.launch.preprocess import Chunk, Transformed, build_transforms, transform_chunk

PART_DIGITS = 5


class TransformChunks:
    """A Ray Data actor: the plugin's transforms, built once, over chunks of the input."""

    def __init__(self, plugin: str, options: dict[str, Any], cwd: str) -> None:
        if os.path.isdir(cwd):  # relative paths in the plugin's options are the user's
            os.chdir(cwd)
        import torch

        torch.set_num_threads(1)  # one actor per CPU
        _, self.transforms = build_transforms(plugin, options)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [k for k in rows if k != "part"]
        results = [transform_chunk(Chunk(**{k: _plain(rows[k][i]) for k in keys}), self.transforms)
                   for i in range(len(rows["part"]))]
        return {"part": rows["part"],
                "text": np.array([r.text for r in results], dtype=object),
                "lines": np.array([r.lines for r in results]),
                "failed": np.array([json.dumps(r.failed) for r in results], dtype=object),
                "replaced": np.array([r.replaced for r in results])}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def part_name(number: int) -> str:
    return f"part-{number:0{PART_DIGITS}d}.jsonl"


def transform_on_ray(plugin: str, options: dict[str, Any], chunks: list[Chunk], output: Path, cpus: int | None,
                     address: str | None, done: Callable[[Transformed], None]) -> None:
    """Transform ``chunks`` on ``cpus`` actors (default: every CPU of the cluster) and write the parts to
    ``output``; ``done`` hears of each part once it is written, in order."""
    import ray
    import ray.data

    from plait.launch.ray_runner import connect

    connect(address, verbose=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines; plait says rows/s
    available = int(ray.cluster_resources().get("CPU", 1))
    actors = cpus or available
    if actors > available:
        raise ConfigError(f"plait preprocess --ray: --cpus {actors} is more than the cluster's {available} CPU(s)")
    rows = [{"part": i, **asdict(c)} for i, c in enumerate(chunks)]
    with replaced_atomically(output) as folder:
        folder.mkdir()
        if not rows:
            return
        items = ray.data.from_items(rows, override_num_blocks=len(rows))  # one block per chunk: all in parallel
        dataset = items.map_batches(TransformChunks, fn_constructor_args=(plugin, options, os.getcwd()),
                                      batch_size=1, concurrency=min(actors, len(rows)), num_cpus=1,
                                      batch_format="numpy")
        dataset.context.execution_options.preserve_order = True
        dataset.context.enable_progress_bars = False  # plait's rows/s line instead
        dataset.context.print_on_execution_start = False
        expected = 0
        for row in dataset.iter_rows():
            if int(row["part"]) != expected:
                raise PlaitError(f"plait preprocess --ray: Ray Data returned part {row['part']} where part "
                                 f"{expected} was due")
            (folder / part_name(expected)).write_text(row["text"], encoding="utf-8")
            done(Transformed("", int(row["lines"]), json.loads(row["failed"]), int(row["replaced"])))
            expected += 1
