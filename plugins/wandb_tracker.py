"""Logs a run to Weights & Biases: the resolved config, every metrics row, the test metrics in
the summary. Offline by default (``mode: offline``): the run lands in ``RUN_DIR/wandb`` and
``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later. Rank 0 only; a resumed run
continues its W&B run (its id is kept in the run folder).

    plugins:
      ...
      wandb: {project: digits}              # mode: online to send it as it trains
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Literal

import yaml
from pydantic import Field

from plait.core.config import Options
from plait.core.files import write_json_atomic
from plait.core.hookspecs import hookimpl
from plait.core.report import numbers
from plait.core.stash import StashKey

log = logging.getLogger("plait")

RUN_RECORD = "wandb.json"  # the run folder's record of its W&B run id


class WandbOptions(Options):
    project: str = Field("plait", description="the W&B project")
    entity: str | None = Field(None, description="the W&B team or user (online)")
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline: write RUN_DIR/wandb "
                                                           "only (wandb sync uploads it); online: send as it trains")
    system_metrics: bool = Field(False, description="let wandb sample CPU, GPU and memory use in the background")
    tags: list[str] = Field(default_factory=list)


RUN = StashKey[Any]()
OWNS_SESSION = StashKey[bool]()  # no other W&B run was active in this process when the fit began


@hookimpl
def plait_config_schema():
    return WandbOptions


@hookimpl
def plait_fit_start(state):
    if not state.is_main:
        return
    import wandb

    options = state.config.options(WandbOptions)
    record = state.run_dir / RUN_RECORD
    run_id = json.loads(record.read_text())["run_id"] if record.exists() else uuid.uuid4().hex[:12]
    active = wandb.run
    settings = wandb.Settings(silent=True, console="off", x_disable_stats=not options.system_metrics,
                              disable_git=True, disable_code=True)
    run = wandb.init(project=options.project, entity=options.entity, mode=options.mode, dir=str(state.run_dir),
                     name=state.config.run.name, id=run_id, resume="allow", tags=options.tags,
                     config=yaml.safe_load(state.config.to_yaml()), settings=settings)
    write_json_atomic(record, {"run_id": run_id, "mode": options.mode})
    state.plugins.stash[RUN] = run
    state.plugins.stash[OWNS_SESSION] = active is None
    log.info("wandb: run %s (%s) in %s", run_id, options.mode, state.run_dir / "wandb")


@hookimpl
def plait_log_metrics(metrics, step, state):
    run = state.plugins.stash.get(RUN)
    if run is not None:
        values = numbers({k: v for k, v in metrics.items() if k not in ("step", "split")},
                         prefix=metrics.get("split", "train"))
        run.log(values, step=step)


@hookimpl(trylast=True)
def plait_fit_end(state):
    run = state.plugins.stash.get(RUN)
    if run is None:
        return
    results = {k: v for k, v in state.metrics.get("run", {}).items() if k not in ("test", "val")}
    run.summary.update({**numbers(state.metrics.get("test", {}), "test"), **numbers(results, "run")})
    run.finish()
    if state.plugins.stash.get(OWNS_SESSION):
        import wandb

        # run.finish() only tells wandb-core the run is over; it writes and closes the run file after that,
        # and its atexit teardown does not run in Ray's worker processes. Wait for it, so the offline run is
        # complete (ready for wandb sync) when the fit returns.
        wandb.teardown()
