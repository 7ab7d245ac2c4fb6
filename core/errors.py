"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class PlaitError(Exception):
    """Base of every error caused by input (config, data, plugins) rather than by a bug."""


class ConfigError(PlaitError):
    """A config file, key or value is wrong. The message names the file and the key path."""


class PluginError(PlaitError):
    """A plugin cannot be found, imported or used. The message names the plugin."""


class DataError(PlaitError):
    """A data set, row or file is missing, empty or unreadable. The message names it."""


def nearest(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of choices, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
