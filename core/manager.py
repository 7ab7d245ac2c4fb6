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
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import PluginError, nearest

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
    except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's, reported by name
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
                          f"{hookspecs.API_VERSION}: install a release of the plugin made for it, or a plait it supports")


def _call(impl: pluggy.HookImpl, hook_name: str, kwargs: dict[str, Any]) -> Any:
    try:
        return impl.function(*[kwargs[a] for a in impl.argnames])
    except Exception as exc:
        exc.add_note(f"in plugin '{impl.plugin_name}', hook '{hook_name}'")
        raise


class Plugins:
    """The plugins of one run, registered with pluggy in YAML order."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.order: list[str] = []
        self.infos: dict[str, PluginInfo] = {}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def load(self, names: Iterable[str]) -> "Plugins":
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
        # pluggy calls the last registered implementation first: register in reverse.
        for name, module in reversed(modules):
            if self.pm.get_plugin(name) is None:
                self.pm.register(module, name=name)
        self._check_hook_names()
        self.order.extend(names)
        for name in names:
            info = self.infos[name]
            info.status = "loaded"
            info.hooks = sorted(
                impl_name for impl_name in dir(self.pm.get_plugin(name)) if impl_name.startswith("plait_")
            )
        return self

    def _check_hook_names(self) -> None:
        known = [n for n in dir(hookspecs) if n.startswith("plait_")]
        for name, caller in self.pm.hook.__dict__.items():
            if name.startswith("plait_") and not caller.has_spec():
                owners = ", ".join(impl.plugin_name for impl in caller.get_hookimpls())
                raise PluginError(f"plugin '{owners}' implements unknown hook '{name}'{nearest(name, known)}")

    def implementers(self, hook_name: str) -> list[str]:
        """The plugins implementing ``hook_name``, in the order they are called."""
        return [impl.plugin_name for impl in self._impls_in_order(hook_name)]

    def _impls_in_order(self, hook_name: str) -> list[pluggy.HookImpl]:
        caller = getattr(self.pm.hook, hook_name)
        impls = [i for i in caller.get_hookimpls() if not (i.hookwrapper or i.wrapper)]
        # get_hookimpls lists the implementation pluggy calls last first.
        return impls if hook_name in hookspecs.REVERSED_HOOKS else impls[::-1]

    def call_each(self, hook_name: str, **kwargs: Any) -> dict[str, Any]:
        """Call every implementation in its order; return {plugin name: result}.

        An exception gets a note naming the plugin and hook, so a traceback says who failed.
        """

        return {impl.plugin_name: _call(impl, hook_name, kwargs) for impl in self._impls_in_order(hook_name)}

    def call_one(self, plugin_name: str, hook_name: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation of a hook (None if it has none)."""
        for impl in self._impls_in_order(hook_name):
            if impl.plugin_name == plugin_name:
                return _call(impl, hook_name, kwargs)
        return None

    def chain(self, hook_name: str, value_arg: str, **kwargs: Any) -> Any:
        """Pass ``kwargs[value_arg]`` through every implementation in order; None keeps it."""
        for impl in self._impls_in_order(hook_name):
            result = _call(impl, hook_name, kwargs)
            if result is not None:
                kwargs[value_arg] = result
        return kwargs[value_arg]

    def first(self, hook_name: str, **kwargs: Any) -> Any:
        """Result of a first-result hook, or None when no plugin answered."""
        return getattr(self.pm.hook, hook_name)(**kwargs)


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
            try:
                module = _import(info)
                info.status = "loaded"
                info.hooks = sorted(n for n in dir(module) if n.startswith("plait_"))
            except PluginError as exc:
                info.status, info.error = "failed", str(exc)
        infos.append(info)
    return infos
