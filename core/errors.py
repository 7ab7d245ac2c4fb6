"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""

from collections.abc import Iterable

__all__ = ["ConfigError", "DataError", "PlaitError", "PluginError", "nearest"]


class PlaitError(Exception):
    """Base of every error caused by input (config, data, plugins) rather than by a bug.

    Its message is one line whatever it quotes: line breaks in a user's key, path or value are
    shown escaped (a YAML key "a\\nb" must not make the error two lines, or forge a second one)."""

    def __str__(self) -> str:
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class ConfigError(PlaitError):
    """A config file, key or value is wrong. The message names the file and the key path."""


class PluginError(PlaitError):
    """A plugin cannot be found, imported or used. The message names the plugin."""


class DataError(PlaitError):
    """A data set, row or file is missing, empty or unreadable. The message names it."""


def nearest(word: object, choices: Iterable[object]) -> str:
    """' (did you mean X?)' for the closest of choices, or '' when nothing is close. Anything a
    YAML file may hold as a key (None, a number) is compared as text."""
    import difflib

    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
