"""The hook contract between plait and its plugins.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names are
hooks below. Plugins run in the order of ``plugins:`` in the YAML: *start* hooks and
first-result hooks in that order, *end* hooks in reverse (like Composer's FILO), so a
plugin that sets something up first tears it down last.

Arguments are passed by name; an implementation may accept any subset of them.

API history: 1.0 the first contract; 1.1 added ``plait_build_model``, ``plait_train_metrics``,
``plait_checkpoint_saved``, ``plait_teacher`` and the ``metrics`` argument of ``plait_eval_metrics``;
1.2 the ``plugins`` argument of ``plait_configure_model``; 1.3 ``plait_compress``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from pydantic import BaseModel

    from .config import PlaitConfig
    from .manager import Plugins
    from .state import CompressJob, RunState

PROJECT = "plait"
#: The version of this hook contract. A plugin may declare the range it supports as a module
#: attribute, ``PLAIT_API = ">=1.1,<2"``; a plait outside that range refuses it by name.
#: Minor: hooks or arguments added; major: a hook removed or its meaning changed.
API_VERSION = "1.3"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# Hooks called in reverse plugin order (see module docstring).
REVERSED_HOOKS = frozenset(
    {"plait_batch_end", "plait_epoch_end", "plait_fit_end"}
)


# --------------------------------------------------------------------- config
@hookspec
def plait_config_schema() -> type[BaseModel] | None:
    """Return the pydantic model of this plugin's options (its block under ``plugins:``).

    Called once per plugin, before anything else. The validated options reach the
    plugin through ``config.options(ThatModel)``. A plugin without options returns
    None, and any option given to it is then an error.
    """


# ----------------------------------------------------------------------- data
@hookspec(firstresult=True)
def plait_build_dataset(config: PlaitConfig, split: str) -> Any:
    """Return the map-style data set for ``split`` ("train", "val" or "test"), or None.

    First non-None result wins. Items are sample dicts: ``label`` (int) and one entry per
    modality (``text``: str, ``image``: float tensor [C, H, W], ``audio``: float tensor [T]
    at 16 kHz), None where the sample lacks that modality, plus an ``id`` (str) used in
    error messages. The data set has ``classes`` (list of class names), ``modalities``
    (tuple of modality names it can provide), ``collate_fn`` (batches its samples;
    ``plait.modalities.batch.collate`` fits the sample format above) and optionally
    ``info`` (a JSON-able dict saved in ``run.json``, e.g. the image shape).
    """


@hookspec
def plait_sample_transforms(config: PlaitConfig, split: str) -> list[Callable[[dict], dict]] | None:
    """Return transforms applied to every sample of ``split``, in plugin order.

    Each transform takes a sample dict and returns one. They run in DataLoader workers
    and Ray workers, so they must be picklable (module-level classes, not lambdas).
    Augmentation and domain preprocessing live here. ``plait preprocess NAME`` applies a
    plugin's transforms (split ``test``) to JSONL lines; a transform with a ``preview_field``
    attribute names the field ``--query TEXT --json`` prints (legal_rag: ``passages``).
    """


# ---------------------------------------------------------------------- model
@hookspec(firstresult=True)
def plait_build_model(config: PlaitConfig, modalities: tuple[str, ...], num_classes: int) -> torch.nn.Module | None:
    """Return the whole model, for a task that is not multimodal classification (a causal
    language model); None lets the encoders, fusion and head plugins build it. Its
    ``forward(batch)`` returns ``logits``: [B, classes], or [B, T, classes] scored against
    ``batch["label"]`` [B, T] where -100 marks positions not scored.
    """


@hookspec(firstresult=True)
def plait_build_encoder(modality: str, config: PlaitConfig) -> torch.nn.Module | None:
    """Return the encoder for ``modality``, or None if this plugin does not encode it.

    First non-None result wins. The module has an ``out_dim`` attribute and is called
    as ``encoder(inputs)``, where ``inputs`` is the collated dict of that modality
    (rows of samples that have it), and returns a float tensor [rows, out_dim].
    """


@hookspec(firstresult=True)
def plait_build_fusion(config: PlaitConfig, dims: dict[str, int]) -> torch.nn.Module | None:
    """Return the module that fuses per-modality embeddings into one vector.

    ``dims`` maps modality -> encoder ``out_dim``. Called as
    ``fusion(embeddings, present)`` with dicts keyed by modality (embeddings
    [B, dim] with zeros where absent; present bool [B]); returns a dict with at least
    ``fused`` [B, out_dim]. The module has an ``out_dim`` attribute.
    """


@hookspec(firstresult=True)
def plait_build_head(config: PlaitConfig, in_dim: int, num_classes: int) -> torch.nn.Module | None:
    """Return the module that maps the fused vector [B, in_dim] to logits [B, num_classes]."""


@hookspec
def plait_configure_model(model: torch.nn.Module, config: PlaitConfig, plugins: Plugins) -> torch.nn.Module | None:
    """Rewrite the assembled model, in plugin order (MoE swaps feed-forward blocks here; distillation
    adds its projections and asks ``plugins`` for the teacher).

    Return a new model to replace it, or None after changing it in place.
    """


# ---------------------------------------------------------------------- train
@hookspec
def plait_fit_start(state: RunState) -> None:
    """Training is about to start: model, optimizer and data are built."""


@hookspec
def plait_epoch_start(state: RunState) -> None:
    """An epoch (``state.epoch``) is about to start."""


@hookspec
def plait_batch_start(state: RunState, batch: dict) -> None:
    """A training batch is about to go through the model."""


@hookspec
def plait_loss_terms(state: RunState, batch: dict, outputs: dict) -> dict[str, torch.Tensor] | None:
    """Return named scalar loss terms for this batch, or None.

    Every plugin may contribute; the loop sums all terms, backpropagates the sum and logs
    each term under its name. Two plugins returning the same name is an error.
    """


@hookspec
def plait_train_metrics(state: RunState) -> dict[str, float] | None:
    """Return values to log with this training row (every ``run.log_every`` steps), e.g. an
    average since the last row. Each worker's values are averaged over the workers."""


@hookspec
def plait_after_backward(state: RunState) -> None:
    """Gradients exist and the optimizer has not stepped yet (inspect or clip them here)."""


@hookspec
def plait_batch_end(state: RunState, batch: dict, outputs: dict, loss: torch.Tensor) -> None:
    """The optimizer stepped for this batch. Called in reverse plugin order."""


@hookspec
def plait_epoch_end(state: RunState) -> None:
    """An epoch ended; ``state.metrics`` holds its validation metrics. Reverse order."""


@hookspec
def plait_fit_end(state: RunState) -> None:
    """Training ended and test metrics are in ``state.metrics``. Reverse plugin order."""


# ----------------------------------------------------------------------- eval
@hookspec
def plait_eval_batch(state: RunState, batch: dict, outputs: dict) -> None:
    """An evaluation batch went through the model (accumulate custom metrics here)."""


@hookspec
def plait_eval_metrics(state: RunState, metrics: dict[str, float]) -> dict[str, float] | None:
    """Return extra metrics for the evaluation that just ended, merged into the results.

    ``metrics`` holds the core's own (accuracy, loss, samples), already summed over workers."""


# ----------------------------------------------------------------- checkpoint
@hookspec
def plait_state_dict(state: RunState) -> dict | None:
    """Return this plugin's state to save with a checkpoint (tensors and JSON values)."""


@hookspec
def plait_load_state_dict(state: RunState, data: dict) -> None:
    """Restore this plugin's state from what its ``plait_state_dict`` returned."""


@hookspec
def plait_checkpoint_saved(state: RunState, path: Path) -> None:
    """A checkpoint folder ``path`` is complete on disk (main process only): copy it
    elsewhere, announce it. Remote run folders (``run.runs_dir: s3://...``) upload it here."""


# --------------------------------------------------------------------- output
@hookspec
def plait_log_metrics(metrics: dict[str, Any], step: int, state: RunState) -> None:
    """Record a row of metrics (loggers: console, CSV, TensorBoard). Main process only.

    ``metrics`` has ``split`` ("train" or "val"), ``step``, ``epoch`` and the values; the
    core has already appended the row to ``metrics.jsonl``.
    """


# ---------------------------------------------------------------- compression
@hookspec
def plait_compress(model: torch.nn.Module, job: CompressJob) -> torch.nn.Module | None:
    """Return ``model`` compressed (quantized, pruned, distilled into a student...), or None to
    leave it as it is. ``plait compress RUN_DIR [compress.yaml]`` chains the plugins in order:
    each gets what the one before returned.

    ``job.config`` holds the plugins' options (compress.yaml's blocks over the run's config);
    ``job.calibration_batches(n)`` gives validation batches; ``job.source`` is the trained run
    (a teacher). A plugin whose change must be redone when the model is rebuilt (quantized layers
    are made before the stored int8 weights load) records it in the new folder's config with
    ``job.set_plugin_options`` and redoes it in ``plait_configure_model``; ``job.notes`` lines go
    into report.md.
    """


@hookspec(firstresult=True)
def plait_teacher(config: PlaitConfig) -> torch.nn.Module | None:
    """Return a frozen teacher for distillation (``eval()``, no gradients), or None.

    Its ``forward(batch)`` takes the student's batches and returns a dict with ``logits``
    (and ``rows``, the batch rows they score, when not all), or no ``logits`` when it has no
    classification head; ``classes`` names its logits' classes in order (None without a head);
    ``model`` is the module that ``hidden`` paths are relative to; ``encoder(modality)`` is the
    module whose output ``embedding`` distillation matches. The ``distill`` plugin answers with
    a plait run folder's model or a transformers model folder.
    """


# --------------------------------------------------------------------- launch
@hookspec
def plait_runtime_env(config: PlaitConfig) -> dict | None:
    """Return what a Ray job of this config needs from this plugin, as a Ray runtime env
    fragment: ``pip`` (list of requirements), ``py_modules`` (local paths or wheels),
    ``env_vars`` (dict). ``plait launch`` merges every plugin's fragment into the job's.
    """


# ------------------------------------------------------------------------ cli
@hookspec
def plait_register_commands(subparsers: Any) -> None:
    """Add subcommands to the ``plait`` CLI (``subparsers`` is argparse's).

    Called at every start of the CLI for each installed plugin that implements it; a
    plugin that raises here is reported and skipped. Set ``func`` on the parser with
    ``parser.set_defaults(func=...)``; it receives the parsed arguments and returns an exit code.
    """
