"""A test plugin: stops the run (an exception in every worker) before optimizer step ``step + 1``,
as a crash or a kill would."""
from plait.core.config import Options
from plait.core.distributed import barrier
from plait.core.hookspecs import hookimpl


class StopAtOptions(Options):
    step: int


@hookimpl
def plait_config_schema():
    return StopAtOptions


@hookimpl
def plait_batch_start(state, batch):
    step = state.config.options(StopAtOptions).step
    if state.step == step:
        # Rank 0 may still be writing checkpoint ``step``; a rank that raised first would get it killed
        # and the resume would start a checkpoint earlier than the test expects. (No-op in one process.)
        barrier()
        raise RuntimeError(f"stopped at step {step}")
