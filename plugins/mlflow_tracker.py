"""Logs a run to MLflow: the resolved config as params, every metrics row, the run folder's files
and the final model as artifacts. Rank 0 only; a resumed run continues its MLflow run.

    plugins:
      ...
      mlflow: {}                                         # RUNS/mlflow.db (SQLite), RUNS/mlartifacts
      mlflow: {tracking_uri: http://127.0.0.1:5000}      # or a tracking server

Then ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` (or the server's page) shows it.
Metrics go through MLflow's asynchronous logging, so a step never waits for the store.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from plait.core import checkpoint
from plait.core.config import Options
from plait.core.errors import ConfigError
from plait.core.files import write_json_atomic
from plait.core.hookspecs import hookimpl
from plait.core.report import flatten, numbers
from plait.core.runs import artifacts
from plait.core.stash import StashKey

log = logging.getLogger("plait")

#: The run folder's record of its MLflow run, so that a resume continues it.
RUN_RECORD = "mlflow.json"
PARAMS_PER_CALL = 100  # MLflow's limit of params in one log_batch


class MlflowOptions(Options):
    tracking_uri: str | None = Field(None, description="an MLflow tracking URI (http://host:port, sqlite:///file.db, "
                                     "databricks...); default: sqlite:///RUNS/mlflow.db beside the run folders")
    experiment: str = Field("plait", description="the MLflow experiment the run goes in (created if missing)")
    log_model: bool = Field(True, description="log the newest checkpoint (the final model) as the artifact 'model'")
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags on the MLflow run")


class _Tracking:
    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri
        self.queued: list[Any] = []  # MLflow's RunOperations of the rows not yet known to be sent


TRACKING = StashKey[_Tracking]()


@hookimpl
def plait_config_schema():
    return MlflowOptions


def tracking_uri(options: MlflowOptions, run_dir: Path) -> str:
    return options.tracking_uri or f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"


@hookimpl
def plait_fit_start(state):
    if not state.is_main:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    options = state.config.options(MlflowOptions)
    uri = tracking_uri(options, state.run_dir)
    record = state.run_dir / RUN_RECORD
    client = MlflowClient(tracking_uri=uri)
    try:
        if record.exists() and json.loads(record.read_text())["tracking_uri"] == uri:
            run_id = json.loads(record.read_text())["run_id"]
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "plait.resumed_at_step", str(state.step))
        else:
            run_id = _create_run(client, options, state, uri)
            write_json_atomic(record, {"tracking_uri": uri, "run_id": run_id})
    except MlflowException as exc:
        first_line = str(exc.message).splitlines()[0][:300]
        raise ConfigError(f"plugins.mlflow: the tracking store {uri} refused the run: {first_line}") from None
    state.plugins.stash[TRACKING] = _Tracking(client, run_id, uri)
    log.info("mlflow: run %s in %s", run_id, uri)


def _create_run(client: Any, options: MlflowOptions, state: Any, uri: str) -> str:
    from mlflow.entities import Param

    experiment = client.get_experiment_by_name(options.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        artifact_location = None
        if uri.startswith("sqlite:///") and options.tracking_uri is None:  # the default store: artifacts beside it
            artifact_location = (state.run_dir.parent / "mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(options.experiment, artifact_location=artifact_location)
    tags = {"plait.run_dir": str(state.run_dir), "plait.world_size": str(state.world_size), **options.tags}
    run = client.create_run(experiment_id, run_name=state.config.run.name, tags=tags)
    params = [Param(key, str(value)) for key, value in flatten(yaml.safe_load(state.config.to_yaml())).items()]
    for start in range(0, len(params), PARAMS_PER_CALL):
        client.log_batch(run.info.run_id, params=params[start:start + PARAMS_PER_CALL])
    return str(run.info.run_id)


@hookimpl
def plait_log_metrics(metrics, step, state):
    tracking = state.plugins.stash.get(TRACKING)
    if tracking is None:
        return
    _log(tracking, numbers({k: v for k, v in metrics.items() if k not in ("step", "split")},
                           prefix=metrics.get("split", "train")), step)


def _log(tracking: _Tracking, values: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    tracking.queued.append(tracking.client.log_batch(  # queued: MLflow's background threads send it
        tracking.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()], synchronous=False))


@hookimpl(trylast=True)  # after every other plugin's fit_end: curves.png and the like exist by then
def plait_fit_end(state):
    tracking = state.plugins.stash.get(TRACKING)
    if tracking is None:
        return
    run = {k: v for k, v in state.metrics.get("run", {}).items() if k not in ("test", "val")}
    _log(tracking, {**numbers(state.metrics.get("test", {}), "test"), **numbers(run, "run")}, state.step)
    for queued in tracking.queued:  # every row is in the store before the run is marked finished
        queued.wait()
    client, run_id = tracking.client, tracking.run_id
    for path in artifacts(state.run_dir):
        if path.is_dir():
            client.log_artifacts(run_id, str(path), path.name)
        else:
            client.log_artifact(run_id, str(path))
    newest = checkpoint.latest(state.run_dir / "checkpoints")
    if state.config.options(MlflowOptions).log_model and newest is not None:
        client.log_artifacts(run_id, str(newest), "model")
    client.set_terminated(run_id)
