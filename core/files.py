"""Files that appear whole or not at all: a reader (another worker, a resumed run, a user's
``tail``) never sees half of one. Checkpoints have their own stronger path (fsync, a swap of
the same step): ``checkpoint.save``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["replaced_atomically", "write_json_atomic", "write_text_atomic"]


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so ``np.savez`` keeps the name) to write a
    file or make a folder at; renamed to ``path`` when the block ends, removed if it raises.

    A folder another process completed first is kept, and this one dropped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")  # unique per writer
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not (tmp.is_dir() and path.is_dir()):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))
