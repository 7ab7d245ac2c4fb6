"""``plait preprocess NAME``: one plugin's sample transform over JSONL or Parquet input (or one ``--query``), so
that users see what the model will see, and so that a corpus can be prepared once, ahead of training.

Every input row gives exactly one output line, in input order: the input object with the fields the transform
added, or, for a row that cannot be used (not JSON, not an object, no ``text`` string, a transform error),
``{"line": N, "error": ...}`` (with ``"file"`` too when the input is a folder). Bytes that are not UTF-8 are
replaced (U+FFFD) and the line says so in ``warnings``. Output appears whole or not at all: a file is written
to a temporary name and renamed, and so is ``--ray``'s folder of parts.

The input is read in chunks (``Chunk``: a byte range of a JSONL file, a slice of a Parquet row group), one
after the other here, or all at once across a Ray cluster with ``--ray`` (``plait.launch.preprocess_ray``),
where chunk N becomes ``part-N.jsonl``: the parts, concatenated, are this command's one-process output.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml

from plait.core import hookspecs
from plait.core.errors import ConfigError, DataError, PluginError
from plait.core.files import replaced_atomically
from plait.core.runs import prepare

ALIASES = {"legal": "legal_rag"}  # the command's short names for plugins
ROWS_PER_CHUNK = 2_000
INPUT_SUFFIXES = (".jsonl", ".parquet")
_BLOCK = 16 << 20  # bytes read at a time while finding where chunks of a JSONL file end


def option_pairs(tokens: list[str]) -> dict[str, Any]:
    """``--corpus DIR --k 5`` and ``k=5`` -> {'corpus': 'DIR', 'k': 5} (values read as YAML)."""
    options: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--") and "=" in token:
            key, value = token[2:].split("=", 1)
        elif token.startswith("--"):
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ConfigError(f"plait preprocess: option {token} needs a value")
            key, value = token[2:], tokens[i + 1]
            i += 1
        elif "=" in token:
            key, value = token.split("=", 1)
        else:
            raise ConfigError(f"plait preprocess: unexpected argument '{token}' (options are --key value or key=value)")
        options[key.replace("-", "_")] = yaml.safe_load(value) if value else value
        i += 1
    return options


def build_transforms(name: str, options: dict[str, Any]) -> tuple[str, list[Callable[[dict], dict]]]:
    plugin = ALIASES.get(name, name)
    config, plugins = prepare({"plugins": {plugin: options}}, f"plait preprocess {name}")
    transforms = plugins.call_one(plugin, hookspecs.plait_sample_transforms, config=config, split="test") or []
    if not transforms:
        raise PluginError(f"plugin '{plugin}' has no sample transform (plait_sample_transforms) to preprocess with")
    return plugin, transforms


def apply(transforms: list[Callable[[dict], dict]], sample: dict) -> dict:
    for transform in transforms:
        sample = transform(sample)
    return sample


def input_lines(data: bytes) -> list[bytes]:
    """The lines of ``data``, without line ends; a final newline does not make an extra, empty line."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [line.rstrip(b"\r") for line in lines]


def transform_line(number: int, raw: bytes, transforms: list[Callable[[dict], dict]]) -> tuple[dict, str]:
    """One line's output object and what became of it: 'ok', 'replaced' (not UTF-8) or 'error'."""
    try:
        line, status = raw.decode("utf-8"), "ok"
    except UnicodeDecodeError as exc:
        line, status = raw.decode("utf-8", errors="replace"), "replaced"
        warning = (f"not UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start}); undecodable bytes were "
                   "replaced by U+FFFD")
    if not line.strip():
        return {"line": number, "error": "empty line"}, "error"
    try:
        sample = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"line": number, "error": f"not JSON: {exc.msg} (column {exc.colno})"}, "error"
    if not isinstance(sample, dict):
        return {"line": number, "error": f"expected a JSON object, got {type(sample).__name__}"}, "error"
    if not isinstance(sample.get("text"), str):
        return {"line": number, "error": "no 'text' field holding a string"}, "error"
    try:
        result = apply(transforms, sample)
    except Exception as exc:  # noqa: BLE001 - one bad line must not stop the file
        return {"line": number, "error": f"{type(exc).__name__}: {exc}"}, "error"
    if status == "replaced":
        result["warnings"] = [warning]
    return result, status


# ------------------------------------------------------------------------------------------------ chunks


@dataclass(frozen=True)
class Chunk:
    """Rows ``first_line`` .. ``first_line + lines - 1`` of one input file: bytes ``offset`` .. ``offset + size``
    of a JSONL file, or rows ``row`` .. of row group ``row_group`` of a Parquet file. ``name`` is how error
    rows name the file (empty for a one-file input)."""

    file: str
    name: str
    kind: str  # "jsonl" or "parquet"
    first_line: int
    lines: int
    offset: int = 0
    size: int = 0
    row_group: int = 0
    row: int = 0


@dataclass
class Transformed:
    """A chunk's output: its JSON lines, and which of its rows could not be used or were not UTF-8."""

    text: str
    lines: int
    failed: list[str] = field(default_factory=list)
    replaced: int = 0


def plan_chunks(source: Path, rows_per_chunk: int = ROWS_PER_CHUNK) -> list[Chunk]:
    """``source`` (a JSONL or Parquet file, or a folder of them, read in name order) in chunks of at most
    ``rows_per_chunk`` rows, in input order."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
        if not files:
            raise DataError(f"{source}: no .jsonl or .parquet files in the folder")
        return [c for f in files for c in _chunks_of(f, str(f.relative_to(source)), rows_per_chunk)]
    return _chunks_of(source, "", rows_per_chunk)


def _chunks_of(path: Path, name: str, rows_per_chunk: int) -> list[Chunk]:
    if path.suffix == ".parquet":
        return _parquet_chunks(path, name, rows_per_chunk)
    try:
        return _jsonl_chunks(path, name, rows_per_chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _jsonl_chunks(path: Path, name: str, rows_per_chunk: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    start = read = pending = 0  # where the open chunk starts, bytes read, lines ended since ``start``
    last = b"\n"
    with open(path, "rb") as file:
        while block := file.read(_BLOCK):
            ends = (np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + read + 1).tolist()  # after each b"\n"
            while pending + len(ends) >= rows_per_chunk:
                cut = ends[rows_per_chunk - pending - 1]
                ends = ends[rows_per_chunk - pending:]
                chunks.append(_jsonl_chunk(path, name, chunks, start, cut, rows_per_chunk))
                start, pending = cut, 0
            pending += len(ends)
            read += len(block)
            last = block[-1:]
    if read > start:  # the rest; a last line without its newline still counts
        chunks.append(_jsonl_chunk(path, name, chunks, start, read, pending + (last != b"\n")))
    return chunks


def _jsonl_chunk(path: Path, name: str, before: list[Chunk], start: int, end: int, lines: int) -> Chunk:
    first = before[-1].first_line + before[-1].lines if before else 1
    return Chunk(str(path), name, "jsonl", first, lines, offset=start, size=end - start)


def _parquet_chunks(path: Path, name: str, rows_per_chunk: int) -> list[Chunk]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    if "text" not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(parquet.schema_arrow.names)})")
    chunks, first = [], 1
    for group in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        for row in range(0, rows, rows_per_chunk):
            count = min(rows_per_chunk, rows - row)
            chunks.append(Chunk(str(path), name, "parquet", first, count, row_group=group, row=row))
            first += count
    return chunks


def read_lines(chunk: Chunk) -> list[bytes]:
    """A chunk's rows as JSON lines (a Parquet row becomes the JSON object of its columns)."""
    if chunk.kind == "jsonl":
        with open(chunk.file, "rb") as file:
            file.seek(chunk.offset)
            return input_lines(file.read(chunk.size))
    import pyarrow.parquet as pq

    table = pq.ParquetFile(chunk.file).read_row_group(chunk.row_group).slice(chunk.row, chunk.lines)
    return [json.dumps(row, ensure_ascii=False, default=str).encode() for row in table.to_pylist()]


def transform_chunk(chunk: Chunk, transforms: list[Callable[[dict], dict]]) -> Transformed:
    lines, failed, replaced = [], [], 0
    for number, raw in enumerate(read_lines(chunk), start=chunk.first_line):
        record, status = transform_line(number, raw, transforms)
        if status == "error":
            failed.append(f"{chunk.name}:{number}" if chunk.name else str(number))
            record = {"file": chunk.name, **record} if chunk.name else record
        replaced += status == "replaced"
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return Transformed("".join(lines), len(lines), failed, replaced)


# ------------------------------------------------------------------------------------------------ the command


def run_preprocess(name: str, options: dict[str, Any], input_path: str | None, output_path: str | None,
                   query: str | None, as_json: bool, on_ray: bool = False, address: str | None = None,
                   cpus: int | None = None, rows_per_part: int = ROWS_PER_CHUNK) -> int:
    plugin, transforms = build_transforms(name, options)
    if query is not None:
        result = apply(transforms, {"text": query})
        field_name = next((t.preview_field for t in transforms if hasattr(t, "preview_field")), None)
        shown = (result[field_name] if as_json and field_name else
                 {k: v for k, v in result.items() if k != "text" or not as_json})
        print(json.dumps(shown, ensure_ascii=False, indent=None if as_json else 1))
        return 0
    if input_path is None:
        raise ConfigError("plait preprocess: give --input FILE.jsonl|FILE.parquet|FOLDER (or --query TEXT)")
    if on_ray and output_path in (None, "-"):
        raise ConfigError("plait preprocess --ray: give --output FOLDER (the parts part-00000.jsonl ... go there)")
    if on_ray and Path(str(output_path)).exists():
        raise ConfigError(f"plait preprocess --ray: {output_path} exists; remove it or give another --output")
    if rows_per_part < 1:
        raise ConfigError(f"plait preprocess: --rows-per-part must be at least 1, not {rows_per_part}")
    source = Path(input_path)
    if not source.exists():
        raise DataError(f"{source}: cannot read: No such file or directory")
    # one process: small chunks, for the progress line; Ray: a part file each
    chunks = plan_chunks(source, rows_per_part if on_ray else min(rows_per_part, 1_000))
    total = sum(c.lines for c in chunks)
    results: list[Transformed] = []
    with RowsProgress(total, f"{plugin}: {source.name}", quiet=output_path in (None, "-")) as progress:
        def done(result: Transformed) -> None:
            results.append(Transformed("", result.lines, result.failed, result.replaced))  # the text is written
            progress.advance(result.lines)

        if on_ray:
            from plait.launch.preprocess_ray import transform_on_ray

            transform_on_ray(plugin, options, chunks, Path(str(output_path)), cpus, address, done)
        else:
            with _output(output_path) as out:
                for chunk in chunks:
                    transformed = transform_chunk(chunk, transforms)
                    out.write(transformed.text)
                    done(transformed)
    return _summary(name, source, output_path, results, progress.elapsed)


def _summary(name: str, source: Path, output_path: str | None, results: list[Transformed], seconds: float) -> int:
    lines = sum(r.lines for r in results)
    failed = [n for r in results for n in r.failed]
    replaced = sum(r.replaced for r in results)
    summary = f"plait: preprocess {name}: {lines} line(s) from {source}"
    if output_path and output_path != "-":
        summary += f" -> {output_path}"
    summary += f" in {seconds:.1f} s ({lines / max(seconds, 1e-9):,.0f} rows/s)"
    if replaced:
        summary += f"; {replaced} not UTF-8 (bytes replaced, see 'warnings')"
    if failed:
        shown = ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else "")
        summary += f"; {len(failed)} line(s) could not be used (lines {shown}; their output lines carry 'error')"
    print(summary, file=sys.stderr)
    return 1 if failed else 0


@contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    """stdout, or a file that appears (by rename) only once it is complete."""
    if path in (None, "-"):
        yield sys.stdout
        return
    with replaced_atomically(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as file:
        yield file


class RowsProgress:
    """Rows done and rows/s on stderr: a bar on a terminal, else a line every ``every_s`` seconds (a job's log).
    Nothing when ``quiet`` (the output is stdout)."""

    def __init__(self, total: int, label: str, quiet: bool = False, every_s: float = 10.0) -> None:
        self.total, self.label, self.quiet, self.every_s = total, label, quiet, every_s
        self.done, self.started = 0, time.monotonic()
        self.last_line = self.started
        self.bar: Any = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __enter__(self) -> RowsProgress:
        if not self.quiet and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed:,}/{task.total:,} rows"),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, rate="")
        return self

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        rate = f"{self.done / max(now - self.started, 1e-9):,.0f} rows/s"
        if self.bar is not None:
            self.bar.update(self.task, advance=rows, rate=rate)
        elif not self.quiet and now - self.last_line >= self.every_s:
            self.last_line = now
            share = self.done / max(self.total, 1)
            print(f"plait: {self.label}: {self.done:,} of {self.total:,} rows ({share:.0%}), {rate}", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
