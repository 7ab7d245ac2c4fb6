"""Per-run objects of plugins, typed: ``plugins.stash[KEY]`` (after pytest's ``config.stash``).

A plugin's module lives as long as the process, and one process may train several runs (``plait
compress`` trains a distilled student inside the compression run; tests train many): what
belongs to one run (a teacher, a running average) goes in the stash of that run's ``Plugins``,
never in a module global or class attribute::

    TEACHER = StashKey[Teacher]()

    @hookimpl
    def plait_configure_model(model, config, plugins):
        plugins.stash[TEACHER] = Teacher(...)

    @hookimpl
    def plait_fit_start(state):
        teacher = state.plugins.stash[TEACHER]
"""
from __future__ import annotations

from typing import Any, Generic, TypeVar, cast, overload

__all__ = ["Stash", "StashKey"]

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key of one type of value; each instance is its own key."""

    __slots__ = ()


class Stash:
    """What the plugins keep for one run, by ``StashKey``."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._values[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._values[key])

    @overload
    def get(self, key: StashKey[T]) -> T | None: ...

    @overload
    def get(self, key: StashKey[T], default: D) -> T | D: ...

    def get(self, key: StashKey[Any], default: object = None) -> object:
        return self._values.get(key, default)

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._values.setdefault(key, default))

    def __contains__(self, key: StashKey[Any]) -> bool:
        return key in self._values
