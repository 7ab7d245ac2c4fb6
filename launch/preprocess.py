"""``plait preprocess NAME``: one plugin's sample transform over a JSONL file (or one ``--query``), so that users
see what the model will see.

Every input line gives exactly one output line: the input object with the fields the transform added, or, for a
line that cannot be used (not JSON, not an object, no ``text`` string, a transform error), ``{"line": N, "error":
...}``. Bytes that are not UTF-8 are replaced (U+FFFD) and the line says so in ``warnings``. The output file is
written to a temporary name and renamed, so it is never half there.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import yaml

from plait.core import hookspecs
from plait.core.errors import ConfigError, DataError, PluginError
from plait.core.files import replaced_atomically
from plait.core.runs import prepare

ALIASES = {"legal": "legal_rag"}  # the command's short names for plugins


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
    """The file's lines, without line ends; a final newline does not make an extra, empty line."""
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


def run_preprocess(name: str, options: dict[str, Any], input_path: str | None, output_path: str | None,
                   query: str | None, as_json: bool) -> int:
    plugin, transforms = build_transforms(name, options)
    if query is not None:
        result = apply(transforms, {"text": query})
        field = next((t.preview_field for t in transforms if hasattr(t, "preview_field")), None)
        shown = result[field] if as_json and field else {k: v for k, v in result.items() if k != "text" or not as_json}
        print(json.dumps(shown, ensure_ascii=False, indent=None if as_json else 1))
        return 0
    if input_path is None:
        raise ConfigError("plait preprocess: give --input FILE.jsonl (or --query TEXT)")
    source = Path(input_path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise DataError(f"{source}: cannot read: {exc.strerror or exc}") from None
    lines = input_lines(data)
    failed: list[int] = []
    replaced = 0
    with _output(output_path) as out:
        for number, raw in enumerate(_progress(lines, f"{plugin}: {source.name}", output_path), start=1):
            record, status = transform_line(number, raw, transforms)
            if status == "error":
                failed.append(number)
            replaced += status == "replaced"
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = f"plait: preprocess {name}: {len(lines)} line(s) from {source}"
    if output_path and output_path != "-":
        summary += f" -> {output_path}"
    if replaced:
        summary += f"; {replaced} not UTF-8 (bytes replaced, see 'warnings')"
    if failed:
        shown = ", ".join(map(str, failed[:10])) + (" ..." if len(failed) > 10 else "")
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


def _progress(items: list[bytes], label: str, output_path: str | None) -> Iterator[bytes]:
    """A progress bar on stderr when writing to a file from a terminal."""
    if output_path in (None, "-") or not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=len(items))
        for item in items:
            yield item
            progress.advance(task)
