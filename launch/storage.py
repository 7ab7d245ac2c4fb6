"""Run folders in remote storage: ``run.runs_dir: s3://bucket/runs`` (or ``gs://``, ``hdfs://``,
``file://``: whatever ``pyarrow.fs`` reaches with the machine's credentials).

Each worker trains in a local staging folder. At its start the folder is filled from storage:
the run's small files and its newest complete checkpoint, so a run resumes wherever it is
started (a restarted worker on another node, another machine). Rank 0 uploads each checkpoint
as it is written, marking it complete only once every file is up (object stores cannot rename
a folder atomically), prunes what ``run.keep_checkpoints`` pruned locally, and uploads the
run's other files (metrics, config, plots) with each checkpoint and at the end.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

from plait.core import checkpoint as checkpoints
from plait.core.errors import ConfigError
from plait.core.hookspecs import hookimpl

COMPLETE = ".complete"  # written last into an uploaded checkpoint folder
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str) -> bool:
    return bool(_URI.match(location))


def run_location(runs_dir: str, name: str) -> str:
    """Where a run lives, for messages (a URI stays a URI)."""
    return f"{runs_dir.rstrip('/')}/{name}" if is_uri(runs_dir) else str(Path(runs_dir) / name)


class RemoteRuns:
    """The runs folder ``uri`` in remote storage."""

    def __init__(self, uri: str, source: str = "config") -> None:
        import pyarrow.fs

        self.uri = uri
        try:
            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(uri)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
            raise ConfigError(f"{source}: run.runs_dir: cannot open {uri}: {exc}") from None
        self.source = source

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def check_writable(self) -> None:
        """A clear error now rather than a failed upload after the first epoch."""
        probe = self._path(".plait-write-test")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as out:
                out.write(b"ok")
            self.fs.delete_file(probe)
        except Exception as exc:  # noqa: BLE001 - each filesystem raises its own kinds; all mean: not writable
            raise ConfigError(f"{self.source}: run.runs_dir: cannot write to {self.uri}: {exc}") from None

    def _listing(self, path: str) -> list[Any]:
        import pyarrow.fs

        return self.fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))

    def complete_checkpoints(self, name: str) -> list[str]:
        """Names of the run's uploaded checkpoints that are whole, oldest first."""
        import pyarrow.fs

        found = [info.base_name for info in self._listing(self._path(name, "checkpoints"))
                 if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(checkpoints.PREFIX)]
        return sorted(c for c in found
                      if self.fs.get_file_info(self._path(name, "checkpoints", c, COMPLETE)).is_file)

    def stage(self, name: str, local_runs: Path) -> Path:
        """Fill ``local_runs/name`` afresh from storage; return it."""
        import pyarrow.fs

        local = local_runs / name
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        for info in self._listing(self._path(name)):
            if info.is_file:
                pyarrow.fs.copy_files(info.path, str(local / info.base_name), source_filesystem=self.fs)
        newest = self.complete_checkpoints(name)[-1:]
        for folder in newest:
            target = local / "checkpoints" / folder
            target.mkdir(parents=True)
            pyarrow.fs.copy_files(self._path(name, "checkpoints", folder), str(target), source_filesystem=self.fs)
            (target / COMPLETE).unlink(missing_ok=True)
        return local

    def upload_checkpoint(self, run_dir: Path, folder: Path) -> None:
        import pyarrow.fs

        remote = self._path(run_dir.name, "checkpoints", folder.name)
        self.fs.create_dir(remote, recursive=True)
        pyarrow.fs.copy_files(str(folder), remote, destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{remote}/{COMPLETE}") as out:
            out.write(b"")
        kept = {p.name for p in checkpoints.list_checkpoints(run_dir / "checkpoints")}
        for info in self._listing(self._path(run_dir.name, "checkpoints")):
            if info.base_name.startswith(checkpoints.PREFIX) and info.base_name not in kept:
                self.fs.delete_dir(info.path)

    def upload_files(self, run_dir: Path) -> None:
        """The run folder's files (not its checkpoints)."""
        import pyarrow.fs

        self.fs.create_dir(self._path(run_dir.name), recursive=True)
        for file in run_dir.iterdir():
            if file.is_file():
                pyarrow.fs.copy_files(str(file), self._path(run_dir.name, file.name), destination_filesystem=self.fs)


def staging_dir(uri: str, rank: int) -> Path:
    """This worker's local folder for runs stored at ``uri``."""
    digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "plait-staging" / digest / f"rank-{rank}"


class StorageSync:
    """Registered on rank 0 when the runs folder is remote: uploads as the run goes.

    A runner plugin (``Plugins.register``): its ``plait_fit_end`` runs after the config's plugins'
    (end hooks run in reverse order) and uploads the files they wrote (plots, reports)."""

    def __init__(self, uri: str, source: str = "config") -> None:
        self.uri, self.source = uri, source

    @cached_property
    def remote(self) -> RemoteRuns:
        return RemoteRuns(self.uri, self.source)

    @hookimpl
    def plait_checkpoint_saved(self, state, path) -> None:
        self.remote.upload_checkpoint(state.run_dir, Path(path))
        self.remote.upload_files(state.run_dir)

    @hookimpl
    def plait_fit_end(self, state) -> None:
        self.remote.upload_files(state.run_dir)
