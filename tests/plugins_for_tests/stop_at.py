"""A test plugin: stops the run (an exception in every worker) before optimizer step ``step + 1``,
as a crash or a kill would."""
from plait.core.config import Options
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
        raise RuntimeError(f"stopped at step {step}")
