"""A test plugin: each rank appends to ``path`` which samples every micro-batch of a step trained on, with
the attempt it belongs to (a restarted or resized run is a new attempt), and can slow each step down so
that a test can act in the middle of an epoch."""
import json
import os
import time
import uuid

from plait.core.config import Options
from plait.core.distributed import all_gather
from plait.core.hookspecs import hookimpl


class SampleLogOptions(Options):
    path: str
    seconds_per_step: float | dict[int, float] = 0.0  # or by world size


attempt: dict = {}


@hookimpl
def plait_config_schema():
    return SampleLogOptions


@hookimpl
def plait_fit_start(state):
    # one id for all ranks of this attempt, and where it resumed
    attempt.update(id=all_gather(uuid.uuid4().hex)[0], started=all_gather(time.time())[0], resumed_at=state.step)


@hookimpl
def plait_loss_terms(state, batch, outputs):
    if state.model.training:
        row = {**attempt, "step": state.step + 1, "epoch": state.epoch, "rank": state.rank,
               "world_size": state.world_size, "ids": batch["sample_index"].tolist()}
        with open(state.config.options(SampleLogOptions).path, "a") as out:  # one short write: appended whole
            out.write(json.dumps(row) + "\n")
            out.flush()
            os.fsync(out.fileno())
    return None


@hookimpl
def plait_batch_end(state, batch, outputs, loss):
    seconds = state.config.options(SampleLogOptions).seconds_per_step
    time.sleep(seconds.get(state.world_size, 0.0) if isinstance(seconds, dict) else seconds)


def counted_rows(path) -> list[dict]:
    """The rows that count: each step's from the last attempt that took it (a restart trains again the
    steps after the checkpoint it resumes from)."""
    rows = [json.loads(line) for line in open(path)]
    last: dict[int, str] = {}
    for row in sorted(rows, key=lambda r: r["started"]):
        last[row["step"]] = row["id"]
    return [row for row in rows if last[row["step"]] == row["id"]]


def trained(path, epochs: int) -> dict[int, list[int]]:
    """The samples each epoch trained on, counting each step once."""
    by_epoch: dict[int, list[int]] = {e: [] for e in range(epochs)}
    for row in counted_rows(path):
        by_epoch[row["epoch"]].extend(row["ids"])
    return by_epoch
