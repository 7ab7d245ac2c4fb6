"""manifest: bring your own data as CSV, JSONL or Parquet, or as WebDataset-style tar shards.

A manifest's columns: ``image`` and ``audio`` (file paths, relative to the manifest's folder),
``text`` (inline text, or the path of a ``.txt`` file), ``label`` (class name or number), optional ``id``. Any modality
may be empty on any row. Rows are checked when the data set is built (files exist, a
label is there, at least one modality); files are decoded when a sample is read, and an
unreadable one is reported with its manifest row.

Tar shards (a ``.tar`` file, or a folder of them, given where a manifest would be): the members of one sample
share a key, the name before its first dot (``000123.png``, ``000123.txt``, ``000123.cls``): an image
(png, jpg, jpeg, webp, bmp), an audio file (wav, flac, ogg, mp3), ``txt`` text and the label in ``cls`` or
``label``. Only the member index is read when the data set is built; a sample's bytes are read from its shard
when the sample is.
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from torch.utils.data import Dataset

from plait.core.config import Options
from plait.core.data import label_order
from plait.core.errors import DataError, nearest
from plait.core.hookspecs import hookimpl
from plait.modalities import MODALITIES
from plait.modalities.audio import load_audio
from plait.modalities.batch import collate
from plait.modalities.image import load_image, parse_colour

FILE_COLUMNS = ("image", "audio")


class ManifestOptions(Options):
    train: str | None = Field(None, description="CSV, JSONL or Parquet manifest of the training split, or tar "
                              "shards (a .tar file or a folder of them)")
    val: str | None = None
    test: str | None = None
    classes: list[str] | None = Field(None, description="class names in label order; default: sorted labels")
    image_size: int = Field(32, ge=4)
    image_channels: Literal[1, 3] = Field(1, description="1: grayscale (luma), 3: RGB; the image encoder "
                                          "converts to its own in_chans either way")
    image_background: str = Field("white", description="colour that transparent pixels are composited over")
    audio_max_seconds: float = Field(60.0, gt=0, description="longer audio files are refused, naming the row")
    allow_outside_root: bool = Field(False, description="accept file paths that lead out of the manifest's "
                                     "folder (absolute paths, ../); refused by default, for manifests you did "
                                     "not write")

    @field_validator("image_background")
    @classmethod
    def _colour(cls, value: str) -> str:
        parse_colour(value)
        return value


COLUMNS = (*MODALITIES, "label", "id")
IMAGE_SUFFIXES = {"png", "jpg", "jpeg", "webp", "bmp"}
AUDIO_SUFFIXES = {"wav", "flac", "ogg", "mp3"}


@dataclass(frozen=True)
class TarMember:
    """Where a sample's file lies in a tar shard: read when the sample is."""

    tar: str
    offset: int
    size: int
    name: str

    def open(self) -> io.BytesIO:
        with open(self.tar, "rb") as shard:
            shard.seek(self.offset)
            data = io.BytesIO(shard.read(self.size))
        data.name = f"{self.tar}:{self.name}"
        return data


def _shard_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs of a tar shard or a folder of them; image and audio are ``TarMember`` s."""
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    if not shards:
        raise DataError(f"{path}: no .tar shards in the folder")
    rows: list[tuple[str, dict]] = []
    for shard in shards:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard, "r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)[-1]
                    key, _, suffix = name.partition(".")
                    suffix = suffix.lower()
                    row = samples.setdefault(key, {"id": key})
                    if suffix in IMAGE_SUFFIXES or suffix in AUDIO_SUFFIXES:
                        modality = "image" if suffix in IMAGE_SUFFIXES else "audio"
                        row[modality] = TarMember(str(shard), member.offset_data, member.size, member.name)
                    elif suffix in ("txt", "cls", "label"):
                        handle = archive.extractfile(member)
                        assert handle is not None  # a regular file
                        row["text" if suffix == "txt" else "label"] = handle.read().decode("utf-8").strip()
        except (tarfile.TarError, UnicodeDecodeError) as exc:
            raise DataError(f"{shard}: not a readable tar shard: {exc}") from None
        except OSError as exc:
            raise DataError(f"{shard}: cannot read shard: {exc.strerror or exc}") from None
        rows.extend((f"{shard}:{key}", row) for key, row in samples.items())
    return rows


def _parquet_rows(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    unknown = [c for c in table.column_names if c not in COLUMNS]
    if unknown:
        raise DataError(f"{path}: unknown column '{unknown[0]}'{nearest(unknown[0], COLUMNS)}")
    has_label = "label" in table.column_names
    if not has_label or not set(MODALITIES) & set(table.column_names):
        need = "an image, audio or text column" if has_label else "a 'label' column"
        raise DataError(f"{path}: the Parquet file has no {need} (its columns: {', '.join(table.column_names)})")
    return [(f"{path}:row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs of a CSV, JSONL or Parquet manifest, or of tar shards; ``where`` names the row in
    errors (``file:line``)."""
    if path.is_dir() or path.suffix == ".tar":
        return _shard_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    return [(f"{path}:{number}", row) for number, row in _text_rows(path)]


def _text_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a CSV or JSONL manifest."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read manifest: {exc}") from None
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON object: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))  # a quoted cell may hold line breaks
    if reader.fieldnames is None:
        return []
    unknown = [c for c in reader.fieldnames if c not in COLUMNS]
    if unknown:
        raise DataError(f"{path}: unknown column '{unknown[0]}'{nearest(unknown[0], COLUMNS)}")
    return [(reader.line_num, row) for row in reader]


class Manifest(Dataset):
    collate_fn = staticmethod(collate)

    def __init__(self, path: Path, options: ManifestOptions, classes: list[str] | None = None) -> None:
        self.path = path
        self.options = options
        self.background = parse_colour(options.image_background)
        rows = read_rows(path)
        if not rows:
            raise DataError(f"{path}: the manifest has no rows")
        self.rows = []
        root = path.parent.resolve()
        for where, row in rows:
            label = str(row.get("label") if row.get("label") is not None else "").strip()
            if not label:
                raise DataError(f"{where}: row has no label")
            entry: dict[str, Any] = {"id": str(row.get("id") or where), "label": label, "where": where}
            for modality in MODALITIES:
                value = row.get(modality)
                if isinstance(value, TarMember):  # a tar shard's member: nothing on disk to check
                    entry[modality] = value
                    continue
                value = str(value).strip() if value is not None else ""
                if "\x00" in value:
                    raise DataError(f"{where}: {modality} holds a NUL character, which no file name or text may have")
                text_file = modality == "text" and value.endswith(".txt") and (path.parent / value).is_file()
                if (text_file or (value and modality in FILE_COLUMNS)) and not options.allow_outside_root:
                    self._check_inside(root, value, f"{where}: {modality}")
                if text_file:
                    value = (path.parent / value).read_text(encoding="utf-8").strip()
                elif value and modality in FILE_COLUMNS:
                    file = (path.parent / value)
                    if not file.is_file():
                        raise DataError(f"{where}: {modality} file '{value}' not found (looked in {file.parent})")
                    value = str(file)
                entry[modality] = value or None
            if all(entry[m] is None for m in MODALITIES):
                raise DataError(f"{where}: row has no image, audio or text")
            self.rows.append(entry)
        self.classes = classes or sorted({r["label"] for r in self.rows}, key=label_order)
        index = {name: i for i, name in enumerate(self.classes)}
        for entry in self.rows:
            if entry["label"] not in index:
                raise DataError(f"{entry['where']}: unknown label '{entry['label']}'{nearest(entry['label'], index)}; "
                                f"classes are {self.classes}")
            entry["label"] = index[entry["label"]]
        self.modalities = tuple(m for m in MODALITIES if any(r[m] is not None for r in self.rows))
        self.info = {"image_shape": [options.image_channels, options.image_size, options.image_size]}

    @staticmethod
    def _check_inside(root: Path, value: str, where: str) -> None:
        target = (root / value).resolve()  # symlinks followed: a link out of the folder leads out too
        if not target.is_relative_to(root):
            raise DataError(f"{where} file '{value}' is outside the manifest's folder {root}; set "
                            "plugins.manifest.allow_outside_root: true if you trust this manifest")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        entry = self.rows[index]
        sample: dict[str, Any] = {"id": entry["id"], "label": entry["label"], "text": entry["text"], "image": None,
                                  "audio": None}
        try:
            if entry["image"]:
                size = self.options.image_size
                sample["image"] = load_image(_opened(entry["image"]), (size, size), self.options.image_channels,
                                             self.background)
            if entry["audio"]:
                sample["audio"] = load_audio(_opened(entry["audio"]), self.options.audio_max_seconds)
        except DataError as exc:
            raise DataError(f"{entry['where']}: {exc}") from None
        return sample


def _opened(value: str | TarMember) -> str | io.BytesIO:
    return value.open() if isinstance(value, TarMember) else value


@hookimpl
def plait_config_schema():
    return ManifestOptions


@hookimpl
def plait_build_dataset(config, split):
    options = config.options(ManifestOptions)
    path = getattr(options, split)
    if path is None:
        return None
    classes = options.classes
    if classes is None and split != "train" and options.train:  # label order of the training split
        labels = {str(row.get("label", "")).strip() for _, row in read_rows(Path(options.train))}
        classes = sorted(labels - {""}, key=label_order)
    return Manifest(Path(path), options, classes)
