"""Run folders in remote storage: ``run.runs_dir: s3://bucket/runs`` (or ``gs://``, ``hdfs://``,
``file://``: whatever ``pyarrow.fs`` reaches with the machine's credentials).

Each worker trains in a local staging folder. At its start the folder is filled from storage:
the run's small files and its newest complete checkpoint, so a run resumes wherever it is
started (a restarted worker on another node, another machine). Rank 0 uploads each checkpoint
beside training (``StorageSync``), marking it complete only once every file is up (object
stores cannot rename a folder atomically), prunes what ``run.keep_checkpoints`` pruned
locally, and uploads the run's other files (metrics, config, plots) with each checkpoint and
at the end.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from functools import cached_property
from pathlib import Path
from typing import Any

from plait.core import checkpoint as checkpoints
from plait.core.errors import ConfigError, PlaitError
from plait.core.hookspecs import hookimpl


class StorageError(PlaitError):
    """A checkpoint or file could not be uploaded to the runs folder's storage."""


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
        """A clear error now rather than a failed upload after the first epoch. The probe's name is
        unique: every node of a cluster probes the same folder at once."""
        probe = self._path(f".plait-write-test-{uuid.uuid4().hex}")
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

    def read_bytes(self, name: str, *parts: str) -> bytes:
        """A file of run ``name`` (``parts``: its path inside the run folder)."""
        with self.fs.open_input_stream(self._path(name, *parts)) as stream:
            data: bytes = stream.read()
        return data

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

    def upload_checkpoint(self, name: str, folder: Path, kept: set[str]) -> None:
        """Upload checkpoint ``folder`` of run ``name``, its complete marker last; then delete the run's
        uploaded checkpoints not in ``kept`` (what ``run.keep_checkpoints`` left locally)."""
        import pyarrow.fs

        remote = self._path(name, "checkpoints", folder.name)
        self.fs.create_dir(remote, recursive=True)
        pyarrow.fs.copy_files(str(folder), remote, destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{remote}/{COMPLETE}") as out:
            out.write(b"")
        for info in self._listing(self._path(name, "checkpoints")):
            if info.base_name.startswith(checkpoints.PREFIX) and info.base_name not in kept:
                self.fs.delete_dir(info.path)

    def upload_files(self, name: str, folder: Path) -> None:
        """The files (not the checkpoints) of run ``name``, from ``folder``."""
        import pyarrow.fs

        self.fs.create_dir(self._path(name), recursive=True)
        for file in folder.iterdir():
            if file.is_file():
                pyarrow.fs.copy_files(str(file), self._path(name, file.name), destination_filesystem=self.fs)


def staging_dir(uri: str, rank: int) -> Path:
    """This worker's local folder for runs stored at ``uri``."""
    digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "plait-staging" / digest / f"rank-{rank}"


def snapshot(run_dir: Path, saved: Path, into: Path) -> Path:
    """The run's files as they are now and the checkpoint folder ``saved``, in ``into``: what an upload
    sends while training goes on. The checkpoint's files are hard links (a checkpoint is never written
    into once complete, and ``run.keep_checkpoints`` may delete it before its upload ends); the small
    files are copies, since training appends to ``metrics.jsonl``."""
    shutil.rmtree(into, ignore_errors=True)
    target = into / "checkpoints" / saved.name
    target.parent.mkdir(parents=True)
    shutil.copytree(saved, target, copy_function=_link_or_copy)
    for file in run_dir.iterdir():
        if file.is_file():
            shutil.copy2(file, into / file.name)
    return target


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, destination)


class StorageSync:
    """Registered on rank 0 when the runs folder is remote: uploads as the run goes, beside training.

    Each checkpoint goes up in a background thread from a snapshot of the run folder, so a step never
    waits for storage; at most one upload is in flight (the next checkpoint waits for the one before,
    which bounds the memory and the staging disk), and a failed upload is raised at the next checkpoint
    or at the end. A checkpoint counts only once its complete marker, written last, is up.

    A runner plugin (``Plugins.register``): its ``plait_fit_end`` runs after the config's plugins'
    (end hooks run in reverse order) and uploads the files they wrote (plots, reports)."""

    def __init__(self, uri: str, source: str = "config") -> None:
        self.uri, self.source = uri, source
        self._upload: threading.Thread | None = None
        self._failed: BaseException | None = None

    @cached_property
    def remote(self) -> RemoteRuns:
        return RemoteRuns(self.uri, self.source)

    def wait(self) -> None:
        """Until the upload in flight, if any, is done; raise its error."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise StorageError(f"{self.source}: run.runs_dir: uploading to {self.uri} failed: "
                               f"{type(failed).__name__}: {failed}") from failed

    def drain(self) -> None:
        """On a run that failed: let the upload in flight finish (its checkpoint is whole and is where the
        run resumes), logging rather than raising its own error, which would hide the run's."""
        try:
            self.wait()
        except StorageError as exc:
            logging.getLogger("plait").error("%s", exc)

    def _send(self, name: str, staged: Path, folder: Path, kept: set[str]) -> None:
        try:
            self.remote.upload_checkpoint(name, folder, kept)
            self.remote.upload_files(name, staged)
        except BaseException as exc:  # noqa: BLE001 - raised in the training thread by wait()
            self._failed = exc
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    @hookimpl
    def plait_checkpoint_saved(self, state, path) -> None:
        self.wait()
        run_dir = state.run_dir
        staged = run_dir.parent / f".upload-{run_dir.name}"
        folder = snapshot(run_dir, Path(path), staged)
        kept = {p.name for p in checkpoints.list_checkpoints(run_dir / "checkpoints")}
        self._upload = threading.Thread(target=self._send, args=(run_dir.name, staged, folder, kept),
                                        name="plait-upload", daemon=True)
        self._upload.start()

    @hookimpl
    def plait_fit_end(self, state) -> None:
        self.wait()
        self.remote.upload_files(state.run_dir.name, state.run_dir)
