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
    kind = "first result wins" if options.get("firstresult") \
        else "each plugin, in reverse" if name in hookspecs.REVERSED_HOOKS else "each plugin"
    signature = str(inspect.signature(function)).replace("'", "")
    return f"### `{name}{signature}`\n\n*{kind}*\n\n{inspect.cleandoc(function.__doc__ or '')}\n"


def hook_reference(name: str | None = None) -> str:
    """Markdown: one hook's entry, or the whole reference."""
    names = hook_names()
    if name is not None:
        if name not in names:
            raise PluginError(f"no hook '{name}'{nearest(name, names)}; `plait hooks` lists them")
        return _entry(name)
    intro = _fenced(inspect.cleandoc(hookspecs.__doc__ or ""))
    header = (f"# Hook reference (plugin API {hookspecs.API_VERSION})\n\n"
              "Generated from `core/hookspecs.py` by `plait hooks > docs/hooks.md`; a test keeps it in sync.\n\n")
    return header + intro + "\n\n" + "\n".join(_entry(n) for n in names)


def _fenced(text: str) -> str:
    """The docstring's ``.. code-block:: text`` (the loop's drawing) as a markdown code fence."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.strip() == ".. code-block:: text":
            out.append("```text")
            inside = True
        elif inside and line and not line.startswith(" "):  # the block ends
            while out[-1] == "":
                out.pop()
            out += ["```", "", line]
            inside = False
        elif inside:
            if line or out[-1] != "```text":
                out.append(line[4:])
        else:
            out.append(line)
    return "\n".join(out)


def hook_order(plugins: Plugins) -> dict[str, list[str]]:
    """For each hook some loaded plugin implements: the plugins, in the order they are called."""
    return {name: found for name in hook_names() if (found := plugins.implementers(name))}
