"""The architecture, read from the source with ``ast``: dependencies point launch -> plugins ->
modalities -> core; the core imports no plugin, modality, launcher or Ray; a plugin imports no other
plugin and not the launcher; and code outside the core uses only what a core module declares in
``__all__`` (the plugin API)."""
from __future__ import annotations

import ast
import importlib
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: source folder -> the package it installs as
PACKAGES = {"core": "plait.core", "modalities": "plait.modalities", "plugins": "plait.plugins",
            "launch": "plait.launch", "testing": "plait.testing"}
EXAMPLES = ["examples/plait-ema/plait_ema", "examples/plait-tensorboard/plait_tensorboard"]
#: what each layer must not import (prefixes of module names)
FORBIDDEN = {
    "plait.core": ("plait.modalities", "plait.plugins", "plait.launch", "plait.testing", "ray"),
    "plait.modalities": ("plait.plugins", "plait.launch", "plait.testing", "ray"),
    "plait.plugins": ("plait.launch", "plait.testing"),
    "plait.testing": (),
    "plait.launch": ("plait.testing",),
    "example": ("plait.plugins", "plait.launch", "plait.testing"),
}


def _module_name(path: Path, root: Path) -> tuple[str, str]:
    """(dotted module name, layer) of a source file."""
    relative = path.relative_to(root)
    if relative.parts[0] == "examples":
        return ".".join(relative.with_suffix("").parts[2:]), "example"
    package = PACKAGES[relative.parts[0]]
    stem = relative.with_suffix("").parts[1:]
    return ".".join([package, *[p for p in stem if p != "__init__"]]), package


def _plugin_of(module: str) -> str | None:
    """The built-in plugin a module belongs to ("plait.plugins.medical.phi" -> "medical")."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["plait", "plugins"] and len(parts) > 2 else None


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import, relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base, [alias.name for alias in node.names]))
    return found


def _declared(module: str) -> set[str] | None:
    """A core module's ``__all__`` (None for a package that is no core module)."""
    if not module.startswith("plait.core.") or module.count(".") != 2:
        return None
    return set(getattr(importlib.import_module(module), "__all__", []))


def violations(root: Path) -> list[str]:
    """Every breach of the layering in the source tree at ``root``, as 'file:line: what'."""
    files = [p for folder in PACKAGES for p in (root / folder).rglob("*.py")]
    files += [p for folder in EXAMPLES for p in (root / folder).rglob("*.py")]
    found = []
    for path in sorted(files):
        module, layer = _module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        core_aliases: dict[str, str] = {}  # a name bound to a core module -> that module
        where = path.relative_to(root)
        for line, imported, names in _imports(tree, module, path.name == "__init__.py"):
            for forbidden in FORBIDDEN[layer]:
                if imported == forbidden or imported.startswith(forbidden + "."):
                    found.append(f"{where}:{line}: {layer} imports {imported}")
            if layer in ("plait.plugins", "example") and imported.startswith("plait.plugins.") and not (
                    _plugin_of(imported) == _plugin_of(module)):  # a plugin package's own modules
                found.append(f"{where}:{line}: a plugin imports another plugin ({imported})")
            if layer in ("plait.plugins", "example") and imported == "plait.plugins":
                found.append(f"{where}:{line}: a plugin imports another plugin ({', '.join(names)})")
            if layer == "plait.core":
                continue
            if imported == "plait.core":
                core_aliases.update({name: f"plait.core.{name}" for name in names})
            declared = _declared(imported)
            if declared is not None:
                found += [f"{where}:{line}: {imported}.{name} is not in its __all__ (the plugin API)"
                          for name in names if name not in declared]
        for node in ast.walk(tree):  # checkpoint.latest(...) after `from plait.core import checkpoint`
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in core_aliases:
                target = core_aliases[node.value.id]
                declared = _declared(target)
                if declared is not None and node.attr not in declared and not node.attr.startswith("__") and not (
                        target == "plait.core.hookspecs" and node.attr.startswith("plait_")):
                    found.append(f"{where}:{node.lineno}: {target}.{node.attr} is not in its __all__ (the plugin API)")
    return found


def test_the_source_keeps_its_layers():
    assert violations(ROOT) == []


@pytest.mark.parametrize("file, line, expected", [
    ("plugins/fusion.py", "from plait.plugins.moe import MoELayer",
     "a plugin imports another plugin (plait.plugins.moe)"),
    ("plugins/fusion.py", "from . import moe", "a plugin imports another plugin (moe)"),
    ("plugins/medical/phi.py", "from plait.plugins.moe import MoELayer",
     "a plugin imports another plugin (plait.plugins.moe)"),
    ("plugins/medical/phi.py", "from .. import moe", "a plugin imports another plugin (moe)"),
    ("plugins/distill.py", "from plait.launch.evaluate import evaluate_run", "plait.plugins imports plait.launch"),
    ("core/loop.py", "import ray", "plait.core imports ray"),
    ("core/model.py", "from plait.modalities.text import masked_mean", "plait.core imports plait.modalities"),
    ("modalities/audio.py", "from plait.plugins import augment", "plait.modalities imports plait.plugins"),
    ("plugins/augment.py", "from plait.core.step import _forward", "plait.core.step._forward is not in its __all__"),
    ("plugins/curves.py", "from plait.core import checkpoint\nX = checkpoint._fsync_dir",
     "plait.core.checkpoint._fsync_dir is not in its __all__"),
])
def test_a_breach_is_reported_with_its_file_and_line(tmp_path, file, line, expected):
    for folder in [*PACKAGES, *EXAMPLES]:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / file
    target.write_text(target.read_text(encoding="utf-8") + "\n" + line + "\n", encoding="utf-8")
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{file}:") and expected in found[0], found
