"""Finding, importing and calling plugins.

Sources: entry points in group ``plait`` (the built-ins use this path too) and dotted
module paths named in YAML. ``PLAIT_PLUGINS_DENY`` (comma list) blocks names;
``PLAIT_PLUGINS_ALLOW`` (comma list), when set, admits only the built-ins and the names
it lists. A plugin that fails to import is reported with its name and error and breaks
only the runs that ask for it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, nearest
from .stash import Stash

__all__ = ["BUILTIN_PREFIX", "ENTRY_POINT_GROUP", "Hook", "PluginInfo", "Plugins", "discover", "hook_name",
           "list_plugins"]

ENTRY_POINT_GROUP = "plait"
BUILTIN_PREFIX = "plait.plugins."


@dataclass
class PluginInfo:
    """What ``plait plugins`` shows about one plugin."""

    name: str
    source: str  # "built-in", "entry point" or "path"
    module: str
    distribution: str | None = None
    version: str | None = None
    status: str = "available"  # available | loaded | failed | blocked
    error: str | None = None
    hooks: list[str] = field(default_factory=list)


def _env_list(variable: str) -> set[str] | None:
    raw = os.environ.get(variable)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def discover() -> dict[str, EntryPoint]:
    """Entry points of group ``plait`` by name; the first distribution to claim a name wins."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def _info_for(name: str, eps: dict[str, EntryPoint]) -> PluginInfo:
    ep = eps.get(name)
    if ep is None:
        return PluginInfo(name=name, source="path", module=name)
    dist = ep.dist
    builtin = ep.value.startswith(BUILTIN_PREFIX)
    return PluginInfo(
        name=name,
        source="built-in" if builtin else "entry point",
        module=ep.value,
        distribution=dist.name if dist else None,
        version=dist.version if dist else None,
    )


def blocked_reason(info: PluginInfo) -> str | None:
    """Why the allow/deny environment variables block this plugin, or None."""
    deny = _env_list("PLAIT_PLUGINS_DENY") or set()
    if info.name in deny:
        return "blocked by PLAIT_PLUGINS_DENY"
    allow = _env_list("PLAIT_PLUGINS_ALLOW")
    if allow is not None and info.source != "built-in" and info.name not in allow:
        return "not in PLAIT_PLUGINS_ALLOW"
    return None


def _import(info: PluginInfo) -> ModuleType:
    dist = f" from {info.distribution} {info.version}" if info.distribution else ""
    try:
        module = importlib.import_module(info.module.split(":")[0])
    except Exception as exc:  # any import failure is the plugin's, reported by name
        raise PluginError(
            f"plugin '{info.name}'{dist} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    check_api(f"plugin '{info.name}'{dist}", getattr(module, "PLAIT_API", None))
    return module


def check_api(who: str, wanted: str | None) -> None:
    """Refuse a plugin whose declared ``PLAIT_API`` range excludes this plait's hook contract."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    if wanted is None:
        return
    try:
        supported = SpecifierSet(str(wanted))
    except InvalidSpecifier:
        raise PluginError(f"{who}: PLAIT_API {wanted!r} is not a version range (e.g. '>=1.1,<2')") from None
    if hookspecs.API_VERSION not in supported:
        raise PluginError(f"{who} supports the plait plugin API {wanted}, but this plait has API "
                          f"{hookspecs.API_VERSION}: install a release of the plugin made for it, "
                          "or a plait it supports")


#: A hook as the loop calls it: the hookspec function itself (``hookspecs.plait_fit_start``), which
#: an editor follows to its contract; its name is accepted too, for plugins written before 1.4.
Hook = Callable[..., Any] | str


def hook_name(hook: Hook) -> str:
    return hook if isinstance(hook, str) else hook.__name__


def _call(impl: pluggy.HookImpl, hook: Hook, kwargs: dict[str, Any], ranges: bool = False) -> Any:
    try:
        if ranges:  # a profiler records: each call is a named range in its trace
            from torch.profiler import record_function

            with record_function(f"{impl.plugin_name}.{hook_name(hook)}"):
                return impl.function(*[kwargs[a] for a in impl.argnames])
        return impl.function(*[kwargs[a] for a in impl.argnames])
    except Exception as exc:
        exc.add_note(f"in plugin '{impl.plugin_name}', hook '{hook_name(hook)}'")
        raise


class Plugins:
    """The plugins of one run, in YAML order, and what they keep for the run (``stash``).

    Every call goes through this class, one implementation at a time, in the order
    ``plait plugins --order`` prints: *start* and first-result hooks in YAML order, *end* hooks
    (``hookspecs.REVERSED_HOOKS``) in reverse; ``tryfirst``/``trylast`` move an implementation to
    the front or back. pluggy's wrappers (``wrapper=True``, ``hookwrapper=True``) are refused when
    a plugin loads: there is no call of the whole chain for them to wrap.
    """

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.order: list[str] = []
        self.infos: dict[str, PluginInfo] = {}
        #: Per-run objects of the plugins (a distillation's teacher): ``plugins.stash[KEY]``.
        self.stash = Stash()
        #: True while a profiler records (the profile plugin): each plugin's hook call is a named range.
        self.profiled = False
        self._ordered: dict[Hook, list[pluggy.HookImpl]] = {}

    def load(self, names: Iterable[str]) -> Plugins:
        """Import and register ``names``; the first name runs first."""
        names = list(names)
        eps = discover()
        modules: list[tuple[str, ModuleType]] = []
        for name in names:
            info = _info_for(name, eps)
            reason = blocked_reason(info)
            if reason:
                raise PluginError(f"plugin '{name}' is {reason}")
            if name not in eps and importlib.util.find_spec(name.split(".")[0]) is None:
                raise PluginError(f"unknown plugin '{name}'{nearest(name, eps)}; `plait plugins` lists them")
            modules.append((name, _import(info)))
            self.infos[name] = info
        for name, module in modules:
            if self._pm.get_plugin(name) is None:
                self._add(module, name)
                self.order.append(name)
        for name in names:
            self.infos[name].status = "loaded"
        return self

    def register(self, plugin: object, name: str, source: str = "runner") -> None:
        """Add a plugin object for this run (a runner's progress forwarding, its storage sync). It
        runs before the config's plugins in start hooks and after them in end hooks: it wraps them."""
        self.infos[name] = PluginInfo(name=name, source=source, module=type(plugin).__module__, status="loaded")
        self._add(plugin, name)
        self.order.insert(0, name)

    def _add(self, plugin: object, name: str) -> None:
        self._pm.register(plugin, name=name)
        callers = self._pm.get_hookcallers(plugin) or []
        try:
            for caller in callers:
                self._check_hook(caller, name)
        except PluginError:
            self._pm.unregister(name=name)
            raise
        self.infos[name].hooks = sorted(caller.name for caller in callers)
        self._ordered.clear()

    @staticmethod
    def _check_hook(caller: pluggy.HookCaller, plugin_name: str) -> None:
        """Refuse an implementation of a hook that does not exist, and a pluggy wrapper."""
        if not caller.has_spec():
            known = [n for n in dir(hookspecs) if n.startswith("plait_")]
            raise PluginError(f"plugin '{plugin_name}' implements unknown hook '{caller.name}'"
                              f"{nearest(caller.name, known)}")
        if any(i.wrapper or i.hookwrapper for i in caller.get_hookimpls() if i.plugin_name == plugin_name):
            raise PluginError(f"plugin '{plugin_name}': '{caller.name}' is a pluggy wrapper, which plait does not "
                              "call (hooks run one plugin at a time); make it a plain @hookimpl")

    def implementers(self, hook: Hook) -> list[str]:
        """The plugins implementing ``hook``, in the order they are called."""
        return [impl.plugin_name for impl in self._in_order(hook)]

    def _in_order(self, hook: Hook) -> list[pluggy.HookImpl]:
        """``hook``'s implementations in calling order (kept until a plugin is added)."""
        found = self._ordered.get(hook)
        if found is None:
            name = hook_name(hook)
            position = {plugin: i for i, plugin in enumerate(self.order)}
            direction = -1 if name in hookspecs.REVERSED_HOOKS else 1
            found = self._ordered[hook] = sorted(
                getattr(self._pm.hook, name).get_hookimpls(),
                key=lambda i: (not i.tryfirst, i.trylast, direction * position.get(i.plugin_name, len(position))))
        return found

    def call_each(self, hook: Hook, **kwargs: Any) -> dict[str, Any]:
        """Call every implementation in its order; return {plugin name: result}.

        An exception gets a note naming the plugin and hook, so a traceback says who failed.
        """
        return {impl.plugin_name: _call(impl, hook, kwargs, self.profiled) for impl in self._in_order(hook)}

    def call_one(self, plugin_name: str, hook: Hook, **kwargs: Any) -> Any:
        """Call one plugin's implementation of a hook (None if it has none)."""
        for impl in self._in_order(hook):
            if impl.plugin_name == plugin_name:
                return _call(impl, hook, kwargs, self.profiled)
        return None

    def chain(self, hook: Hook, value_arg: str, **kwargs: Any) -> Any:
        """Pass ``kwargs[value_arg]`` through every implementation in order; None keeps it."""
        for impl in self._in_order(hook):
            result = _call(impl, hook, kwargs, self.profiled)
            if result is not None:
                kwargs[value_arg] = result
        return kwargs[value_arg]

    def first(self, hook: Hook, **kwargs: Any) -> Any:
        """The first non-None result of a first-result hook, or None when no plugin answered."""
        for impl in self._in_order(hook):
            result = _call(impl, hook, kwargs, self.profiled)
            if result is not None:
                return result
        return None


def list_plugins(extra: Iterable[str] = ()) -> list[PluginInfo]:
    """Every discoverable plugin (and ``extra`` dotted paths) with its import status."""
    eps = discover()
    infos = []
    for name in sorted(set(eps) | set(extra)):
        info = _info_for(name, eps)
        reason = blocked_reason(info)
        if reason:
            info.status, info.error = "blocked", reason
        else:
            try:  # the checks a run makes: it imports, its hooks exist, none is a wrapper
                alone = Plugins()
                alone.infos[name] = info
                alone._add(_import(info), name)
                info.status = "loaded"
            except PluginError as exc:
                info.status, info.error = "failed", str(exc)
        infos.append(info)
    return infos
