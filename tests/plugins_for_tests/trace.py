"""A test plugin: records every hook call of a run, in order, one JSON line per call in
``{path}.rank{R}.jsonl`` (R: this worker's rank). Put it first under ``plugins:`` so that it sees
every first-result hook before another plugin answers. Eval hooks and ``plait_log_metrics``
record their split."""
import json

import torch

from plait.core.config import Options
from plait.core.hookspecs import hookimpl


class TraceOptions(Options):
    path: str


def _record(config, hook: str, split: str | None = None) -> None:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    with open(f"{config.options(TraceOptions).path}.rank{rank}.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"hook": hook, "split": split}) + "\n")


@hookimpl
def plait_config_schema():
    return TraceOptions


@hookimpl
def plait_build_dataset(config, split):
    _record(config, "plait_build_dataset")


@hookimpl
def plait_sample_transforms(config, split):
    _record(config, "plait_sample_transforms")


@hookimpl
def plait_build_model(config):
    _record(config, "plait_build_model")


@hookimpl
def plait_build_encoder(modality, config):
    _record(config, "plait_build_encoder")


@hookimpl
def plait_build_fusion(config):
    _record(config, "plait_build_fusion")


@hookimpl
def plait_build_head(config):
    _record(config, "plait_build_head")


@hookimpl
def plait_configure_model(config):
    _record(config, "plait_configure_model")


@hookimpl
def plait_parameter_groups(config):
    _record(config, "plait_parameter_groups")


def _state_hook(name: str):
    def record(state):
        _record(state.config, name)

    record.__name__ = name
    return hookimpl(record)


plait_fit_start = _state_hook("plait_fit_start")
plait_epoch_start = _state_hook("plait_epoch_start")
plait_after_backward = _state_hook("plait_after_backward")
plait_epoch_end = _state_hook("plait_epoch_end")
plait_fit_end = _state_hook("plait_fit_end")
plait_train_metrics = _state_hook("plait_train_metrics")
plait_count_tokens = _state_hook("plait_count_tokens")
plait_checkpoint_saved = _state_hook("plait_checkpoint_saved")
plait_batch_loaded = _state_hook("plait_batch_loaded")
plait_batch_start = _state_hook("plait_batch_start")
plait_loss_terms = _state_hook("plait_loss_terms")
plait_batch_end = _state_hook("plait_batch_end")


@hookimpl
def plait_state_dict(state):
    _record(state.config, "plait_state_dict")
    return {"traced": True}  # something to restore, so that a resume calls plait_load_state_dict


@hookimpl
def plait_load_state_dict(state, data):
    _record(state.config, "plait_load_state_dict")


@hookimpl
def plait_log_metrics(metrics, state):
    _record(state.config, "plait_log_metrics", metrics["split"])


@hookimpl
def plait_eval_batch(state, split):
    _record(state.config, "plait_eval_batch", split)


@hookimpl
def plait_eval_metrics(state, split, modalities):
    _record(state.config, "plait_eval_metrics", split)
    return {"modalities_seen": len(modalities)}
