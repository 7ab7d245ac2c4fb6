"""plait's kernel: hookspecs, plugin manager, config, run state, loop and checkpoints.

The core never imports a plugin, a modality or Ray; everything else reaches it through hooks.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("plait")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


def _quiet_torchao() -> None:
    """transformers imports torchao whenever it is installed (the ``quantize`` extra), in every process.
    torchao then loads CUDA kernels plait never calls (float8/MX; ``TORCHAO_FORCE_SKIP_LOADING_SO_FILES=0``
    loads them) and torch logs a notice about torchao's enums at each start; neither concerns plait's users,
    and the notices would break one-line errors."""
    import logging
    import os

    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    skipped_kernels = "Skipping import of cpp extensions"
    logging.getLogger("torchao").addFilter(lambda record: skipped_kernels not in record.getMessage())


_quiet_torchao()
