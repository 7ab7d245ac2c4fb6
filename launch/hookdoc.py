"""The hook reference (``plait hooks``, ``docs/hooks.md``) from the hookspecs' own docstrings,
and the order plugins run in per hook (``plait plugins --order``)."""
from __future__ import annotations

import inspect

from plait.core import hookspecs
from plait.core.errors import PluginError, nearest
from plait.core.manager import Plugins


def hook_names() -> list[str]:
    """Every hook, in the order the hookspecs define them."""
    functions = inspect.getmembers(hookspecs, inspect.isfunction)
    specs = [(fn.__code__.co_firstlineno, name) for name, fn in functions if name.startswith("plait_")]
    return [name for _, name in sorted(specs)]


def _entry(name: str) -> str:
    function = getattr(hookspecs, name)
    options = getattr(function, "plait_spec", {}) or {}
    kind = ["first result: the first plugin (in YAML order) that returns non-None wins"] if options.get("firstresult") \
        else ["reverse plugin order"] if name in hookspecs.REVERSED_HOOKS else ["plugin order"]
    signature = str(inspect.signature(function)).replace("'", "")
    return f"### `{name}{signature}`\n\n*{kind[0]}*\n\n{inspect.cleandoc(function.__doc__ or '')}\n"


def hook_reference(name: str | None = None) -> str:
    """Markdown: one hook's entry, or the whole reference."""
    names = hook_names()
    if name is not None:
        if name not in names:
            raise PluginError(f"no hook '{name}'{nearest(name, names)}; `plait hooks` lists them")
        return _entry(name)
    intro = inspect.cleandoc(hookspecs.__doc__ or "")
    header = (f"# Hook reference (plugin API {hookspecs.API_VERSION})\n\n"
              "Generated from `core/hookspecs.py` by `plait hooks > docs/hooks.md`; a test keeps it in sync.\n\n")
    return header + intro + "\n\n" + "\n".join(_entry(n) for n in names)


def hook_order(plugins: Plugins) -> dict[str, list[str]]:
    """For each hook some loaded plugin implements: the plugins, in the order they are called."""
    return {name: found for name in hook_names() if (found := plugins.implementers(name))}
