"""plait's kernel: hookspecs, plugin manager, config, run state, loop and checkpoints.

The core never imports a plugin, a modality or Ray; everything else reaches it through hooks.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("plait")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

#: Version of the hook contract (core/hookspecs.py). Bumped when a hook changes incompatibly.
HOOK_API_VERSION = 1
