"""The hook contract between plait and its plugins.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names are the
hooks below. Arguments are passed by name; an implementation may accept any subset of them.
Each hook is one of three kinds, said in its docstring:

- **each plugin**: every implementation runs, in the order of ``plugins:`` in the YAML;
- **each plugin, in reverse**: the *end* hooks (``REVERSED_HOOKS``) run last plugin first, so
  that a plugin that sets something up before the others tears it down after them;
- **first result wins**: plugins are asked in YAML order until one returns something not None.

``tryfirst=True``/``trylast=True`` on a ``@hookimpl`` move it to the front or the back;
pluggy's wrappers are refused when a plugin loads. ``plait plugins --order CONFIG`` prints
the order per hook; ``plait hooks NAME`` prints one hook's entry.

Where each hook fires in a training run (``plait.core.loop.fit``), in one process or in each
Ray Train worker; hooks marked *main process only* run on rank 0 alone. A test traces a real
run (gradient accumulation, a skipped step, a resume, two Ray workers) against this drawing:

.. code-block:: text

    fit(config, plugins):
        for split in "train", "val", "test":
            plait_build_dataset(split)            first result wins; "train" must exist
            if a plugin returned that split:
                plait_sample_transforms(split)    each plugin; transforms run in plugin order
        plait_build_model                         first result wins: the whole model, or None
        if no plugin built the whole model:
            for each modality of the data:
                plait_build_encoder(modality)     first result wins
            plait_build_fusion                    first result wins
            plait_build_head                      first result wins
        plait_configure_model                     each plugin, chained: each gets what the last returned
        plait_parameter_groups                    each plugin: how its parts train (frozen, lr, decay)
        if the run folder holds a checkpoint (a resume):
            plait_load_state_dict                 each plugin whose state the checkpoint holds
        plait_fit_start
        for each epoch:
            plait_epoch_start
            if the epoch has a batch to train:
                plait_batch_loaded                its first, as loaded (only if a plugin implements the hook)
            for each optimizer step:              run.grad_accumulation batches (fewer at an epoch's end)
                if a batch follows the step's first:
                    plait_batch_loaded            that one: each batch is shown one batch before its forward
                plait_batch_start                 once a step, with the step's first batch
                for each batch of the step:
                    if it is not the first and a batch follows it:
                        plait_batch_loaded        the batch after it
                    plait_loss_terms              after the forward; the terms' sum goes backward
                plait_after_backward              gradients summed over batches and workers, not clipped
                if every loss term and the gradient norm are finite:
                    plait_batch_end               in reverse; the optimizer stepped, state.step += 1
                    if state.step % run.log_every == 0:
                        plait_train_metrics
                        plait_count_tokens
                        plait_log_metrics(split="train")    main process only
                    if state.step % run.checkpoint_every == 0 and the epoch goes on:
                        plait_state_dict
                        plait_checkpoint_saved    main process only
                (else the step is skipped: gradients dropped, buffers restored, nothing logged)
            if there is a val split:
                for each batch of this worker's shard:
                    plait_eval_batch(split="val")
                plait_eval_metrics(split="val")
                plait_log_metrics(split="val")    main process only
            plait_epoch_end                       in reverse
            plait_state_dict                      the epoch's checkpoint
            plait_checkpoint_saved                main process only
        if there is a test split:
            for all modalities together ("fused"), then each modality alone:
                for each batch of this worker's shard:
                    plait_eval_batch(split="test")
                plait_eval_metrics(split="test")
        plait_fit_end                             in reverse

Outside ``fit``: ``plait_config_schema`` runs once per plugin whenever a config is resolved
(``plait.core.runs.prepare``); ``plait_teacher`` when distillation asks for a teacher;
``plait_compress`` in ``plait compress``; ``plait_export_model`` in ``plait export --format hf``;
``plait_runtime_env`` in ``plait launch``; ``plait_register_commands`` at every start of the CLI.

API history: 1.0 the first contract; 1.1 added ``plait_build_model``, ``plait_train_metrics``,
``plait_checkpoint_saved``, ``plait_teacher`` and the ``metrics`` argument of ``plait_eval_metrics``;
1.2 the ``plugins`` argument of ``plait_configure_model``; 1.3 ``plait_compress``; 1.4 the ``split``
and ``modalities`` arguments of ``plait_eval_batch`` and ``plait_eval_metrics``, and
``plugins.stash`` for per-run objects; 1.5 ``plait_parameter_groups`` and ``plait_export_model``;
1.6 ``plait_count_tokens`` (tokens/s in the training rows); 1.7 ``plait_batch_loaded`` (work on a batch
that runs while the batch before it trains).

Its length (over 400 lines) is deliberate: it is the whole contract, the drawing and one docstring a
hook, read top to bottom as the reference (``plait hooks``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from pydantic import BaseModel

    from .config import PlaitConfig
    from .manager import Plugins
    from .optim import ParameterGroup
    from .state import CompressJob, RunState

PROJECT = "plait"
#: The version of this hook contract. A plugin may declare the range it supports as a module
#: attribute, ``PLAIT_API = ">=1.1,<2"``; a plait outside that range refuses it by name.
#: Minor: hooks or arguments added; major: a hook removed or its meaning changed.
API_VERSION = "1.7"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The end hooks, called in reverse plugin order (see the module docstring).
REVERSED_HOOKS = frozenset({"plait_batch_end", "plait_epoch_end", "plait_fit_end"})

__all__ = ["API_VERSION", "REVERSED_HOOKS", "hookimpl"]


# --------------------------------------------------------------------- config
@hookspec
def plait_config_schema() -> type[BaseModel] | None:
    """Return the pydantic model of this plugin's options (its block under ``plugins:``).

    Each plugin, once per resolved config, before anything else. The validated options reach
    the plugin through ``config.options(ThatModel)``. A plugin without options returns None,
    and any option given to it is then an error.
    """


# ----------------------------------------------------------------------- data
@hookspec(firstresult=True)
def plait_build_dataset(config: PlaitConfig, split: str) -> Any:
    """Return the map-style data set for ``split``, or None. First result wins.

    :param config: the resolved config.
    :param split: "train", "val" or "test".

    Items are sample dicts: ``label`` (int) and one entry per modality (``text``: str,
    ``image``: float tensor [C, H, W], ``audio``: float tensor [T] at 16 kHz), None where the
    sample lacks that modality, plus an ``id`` (str) used in error messages. The data set has
    ``classes`` (list of class names), ``modalities`` (tuple of modality names it can provide),
    ``collate_fn`` (batches its samples; ``plait.modalities.batch.collate`` fits the sample
    format above) and optionally ``info`` (a JSON-able dict saved in ``run.json``, e.g. the
    image shape).
    """


@hookspec
def plait_sample_transforms(config: PlaitConfig, split: str) -> list[Callable[[dict[str, Any]], dict[str, Any]]] | None:
    """Return transforms applied to every sample of ``split``. Each plugin; the transforms run
    in plugin order.

    :param config: the resolved config.
    :param split: "train", "val" or "test".

    Each transform takes a sample dict and returns one. They run in DataLoader workers and Ray
    workers, so they must be picklable (module-level classes, not lambdas). Random ones draw from
    torch's CPU generator, which plait seeds for each training sample and view
    (``plait.core.data.view_seed``), so a view is the same wherever it is decoded. Augmentation and
    domain preprocessing live here. ``plait preprocess NAME`` applies a plugin's transforms
    (split ``test``) to JSONL lines; a transform with a ``preview_field`` attribute names the
    field ``--query TEXT --json`` prints (legal_rag: ``passages``).
    """


# ---------------------------------------------------------------------- model
@hookspec(firstresult=True)
def plait_build_model(config: PlaitConfig, modalities: tuple[str, ...], num_classes: int) -> torch.nn.Module | None:
    """Return the whole model, for a task that is not multimodal classification (a causal
    language model), or None to let the encoder, fusion and head hooks build it. First result wins.

    :param config: the resolved config.
    :param modalities: the training data set's modalities.
    :param num_classes: the number of classes (the vocabulary, for a language model).

    Its ``forward(batch)`` returns ``logits``: [B, classes], or [B, T, classes] scored against
    ``batch["label"]`` [B, T] where -100 marks positions not scored.
    """


@hookspec(firstresult=True)
def plait_build_encoder(modality: str, config: PlaitConfig) -> torch.nn.Module | None:
    """Return the encoder for ``modality``, or None if this plugin does not encode it. First
    result wins.

    :param modality: "text", "image" or "audio" (any name a data set provides).
    :param config: the resolved config.

    The module has an ``out_dim`` attribute and is called as ``encoder(inputs)``, where
    ``inputs`` is the collated dict of that modality (rows of samples that have it), and
    returns a float tensor [rows, out_dim].
    """


@hookspec(firstresult=True)
def plait_build_fusion(config: PlaitConfig, dims: dict[str, int]) -> torch.nn.Module | None:
    """Return the module that fuses per-modality embeddings into one vector. First result wins.

    :param config: the resolved config.
    :param dims: modality -> its encoder's ``out_dim``.

    Called as ``fusion(embeddings, present)`` with dicts keyed by modality (embeddings
    [B, dim] with zeros where absent; present bool [B]); returns a dict with at least
    ``fused`` [B, out_dim]. The module has an ``out_dim`` attribute.
    """


@hookspec(firstresult=True)
def plait_build_head(config: PlaitConfig, in_dim: int, num_classes: int) -> torch.nn.Module | None:
    """Return the module that maps the fused vector [B, in_dim] to logits [B, num_classes].
    First result wins.

    :param config: the resolved config.
    :param in_dim: the fusion module's ``out_dim``.
    :param num_classes: the number of classes.
    """


@hookspec
def plait_configure_model(model: torch.nn.Module, config: PlaitConfig, plugins: Plugins) -> torch.nn.Module | None:
    """Rewrite the assembled model: return a new model to replace it, or None after changing it
    in place. Each plugin, chained: each gets the model the one before returned.

    :param model: the model as built (not yet on the device, wrapped or sharded).
    :param config: the resolved config.
    :param plugins: the run's plugins: call other hooks (distillation asks for
        ``plait_teacher``), keep per-run objects in ``plugins.stash``.

    MoE swaps feed-forward blocks here; distillation adds its projections.
    """


@hookspec
def plait_parameter_groups(model: torch.nn.Module, config: PlaitConfig) -> list[ParameterGroup] | None:
    """Return how the parts of the model this plugin built train, or None. Each plugin, once the model is
    configured, before it is wrapped or sharded.

    :param model: the configured model (``plait_configure_model``'s result).
    :param config: the resolved config.

    Each ``plait.core.optim.ParameterGroup`` names a submodule and its ``lr_scale``, ``weight_decay``,
    ``freeze`` and ``unfreeze_at_step``; options that inherit ``plait.core.optim.TrainingControl`` make one
    with ``options.group(name, module)``. A frozen group gets no gradients; each group becomes AdamW
    parameter groups of its own. Two plugins claiming one module is an error.
    """


# ---------------------------------------------------------------------- train
@hookspec
def plait_fit_start(state: RunState) -> None:
    """Training is about to start: model, optimizer and data are built (and a resumed run's
    state restored). Each plugin.

    :param state: the run state; ``state.step`` is where training starts.
    """


@hookspec
def plait_epoch_start(state: RunState) -> None:
    """An epoch (``state.epoch``) is about to start. Each plugin.

    :param state: the run state.
    """


@hookspec
def plait_batch_loaded(state: RunState, batch: dict[str, Any]) -> None:
    """A training batch came from the loader, one batch ahead of the forward that uses it (the
    loop then holds it until the batch before it has been trained on). Each plugin, for every
    batch, only if some plugin implements this hook: start work on it elsewhere here (a teacher
    on other workers), so that it is ready when the batch's forward runs.

    :param state: the run state.
    :param batch: the batch as loaded, on the host (it moves to the device when its turn comes).
    """


@hookspec
def plait_batch_start(state: RunState, batch: dict[str, Any]) -> None:
    """An optimizer step is about to start: once a step, with its first batch (a step has
    ``run.grad_accumulation`` batches). A skipped step is tried again with the next batches,
    so the same ``state.step`` can start twice. Each plugin.

    :param state: the run state; ``state.step`` counts the steps done.
    :param batch: the step's first batch, on the device.
    """


@hookspec
def plait_loss_terms(state: RunState, batch: dict[str, Any], outputs: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Return named scalar loss terms for this batch, or None. Each plugin, for every batch.

    :param state: the run state.
    :param batch: the batch, on the device.
    :param outputs: what the model returned for it (``logits`` and the modules' extras).

    The loop sums all terms, backpropagates the sum and logs each term under its name. Two
    plugins returning the same name is an error.
    """


@hookspec
def plait_train_metrics(state: RunState) -> dict[str, float] | None:
    """Return values to log with this training row (every ``run.log_every`` steps), e.g. an
    average since the last row. Each plugin, on every worker; each value is averaged over the
    workers.

    :param state: the run state.
    """


@hookspec
def plait_count_tokens(state: RunState) -> int | None:
    """Return how many real (not padding) tokens this worker's training forwards have read since
    the last call, for the row's ``tokens_per_s``; None where the plugin reads no tokens. Each
    plugin, on every worker, when a training row is logged; the counts are summed.

    :param state: the run state.
    """


@hookspec
def plait_after_backward(state: RunState) -> None:
    """Gradients of the whole step exist (summed over its batches and averaged over the
    workers, unscaled under fp16) and are not clipped yet: inspect them here. The core then
    clips them to ``run.grad_clip`` and skips the step if they are not finite. Each plugin.

    :param state: the run state.
    """


@hookspec
def plait_batch_end(state: RunState, batch: dict[str, Any], outputs: dict[str, Any], loss: torch.Tensor) -> None:
    """The optimizer stepped and ``state.step`` counts it. Not called for a skipped step (a
    loss term or the gradient norm was not finite). Each plugin, in reverse.

    :param state: the run state.
    :param batch: the step's last batch.
    :param outputs: the model's outputs for that batch.
    :param loss: that batch's summed loss (not divided by the accumulation).
    """


@hookspec
def plait_epoch_end(state: RunState) -> None:
    """An epoch ended, before its checkpoint is written; ``state.metrics["val"]`` holds its
    validation metrics. Each plugin, in reverse.

    :param state: the run state.
    """


@hookspec
def plait_fit_end(state: RunState) -> None:
    """Training ended; ``state.metrics["test"]`` holds the test metrics by modality and
    ``state.metrics["run"]`` what ``metrics.json`` holds. Each plugin, in reverse.

    :param state: the run state.
    """


# ----------------------------------------------------------------------- eval
@hookspec
def plait_eval_batch(state: RunState, batch: dict[str, Any], outputs: dict[str, Any], split: str,
                     modalities: tuple[str, ...]) -> None:
    """An evaluation batch went through the model: accumulate custom metrics here. Each plugin.

    :param state: the run state.
    :param batch: the batch, on the device; modalities not evaluated are marked absent.
    :param outputs: the model's outputs.
    :param split: "val" or "test" (``plait eval`` evaluates "test", or its ``--data``).
    :param modalities: the modalities this pass uses: all of the model's, or one alone.
    """


@hookspec
def plait_eval_metrics(state: RunState, metrics: dict[str, float], split: str,
                       modalities: tuple[str, ...]) -> dict[str, float] | None:
    """Return extra metrics for the evaluation that just ended, merged into the results. Each plugin.

    :param state: the run state.
    :param metrics: the core's own (accuracy, loss, samples), already summed over workers.
    :param split: "val" or "test".
    :param modalities: the modalities this pass used (see ``plait_eval_batch``).
    """


# ----------------------------------------------------------------- checkpoint
@hookspec
def plait_state_dict(state: RunState) -> dict[str, Any] | None:
    """Return this plugin's state to save with a checkpoint (tensors and JSON values), or None.
    Each plugin, on every worker (rank 0's is saved).

    :param state: the run state.
    """


@hookspec
def plait_load_state_dict(state: RunState, data: dict[str, Any]) -> None:
    """Restore this plugin's state from what its ``plait_state_dict`` returned. Each plugin whose
    state the checkpoint holds, before ``plait_fit_start``.

    :param state: the run state, its step and epoch already restored.
    :param data: what this plugin's ``plait_state_dict`` returned.
    """


@hookspec
def plait_checkpoint_saved(state: RunState, path: Path) -> None:
    """A checkpoint folder is complete on disk: copy it elsewhere, announce it. Each plugin,
    main process only. Remote run folders (``run.runs_dir: s3://...``) upload it here.

    :param state: the run state.
    :param path: the checkpoint folder, ``checkpoints/step-N``.
    """


# --------------------------------------------------------------------- output
@hookspec
def plait_log_metrics(metrics: dict[str, Any], step: int, state: RunState) -> None:
    """Record a row of metrics (loggers: console, CSV, TensorBoard). Each plugin, main process only.

    :param metrics: ``split`` ("train" or "val"), ``step``, ``epoch`` and the values; the core
        has already appended the row to ``metrics.jsonl``.
    :param step: the optimizer steps done.
    :param state: the run state.
    """


# ---------------------------------------------------------------- compression
@hookspec
def plait_compress(model: torch.nn.Module, job: CompressJob) -> torch.nn.Module | None:
    """Return ``model`` compressed (quantized, pruned, distilled into a student...), or None to
    leave it as it is. Each plugin, chained: ``plait compress RUN_DIR [compress.yaml]`` hands each
    what the one before returned.

    :param model: the model so far (a copy of the trained one, for the first plugin).
    :param job: ``job.config`` holds the plugins' options (compress.yaml's blocks over the run's
        config); ``job.calibration_batches(n)`` gives validation batches; ``job.source`` is the
        trained run (a teacher).

    A plugin whose change must be redone when the model is rebuilt (quantized layers are made
    before the stored int8 weights load) records it in the new folder's config with
    ``job.set_plugin_options`` and redoes it in ``plait_configure_model``; ``job.notes`` lines go
    into report.md.
    """


@hookspec
def plait_export_model(model: torch.nn.Module, config: PlaitConfig) -> torch.nn.Module | None:
    """Return the trained model as ``plait export RUN --format hf`` writes it, or None to leave it. Each
    plugin, chained: each gets what the one before returned.

    :param model: the run's model (plain, on the CPU, its newest weights loaded).
    :param config: the run's config.

    ``lora`` merges its adapters into the base weights here, so each tower is written as a plain model of
    its kind. Each encoder is then written by its ``plait_save_native(folder)`` method (an HF folder, timm's
    files), or as safetensors where it has none.
    """


@hookspec(firstresult=True)
def plait_teacher(config: PlaitConfig) -> torch.nn.Module | None:
    """Return a frozen teacher for distillation (``eval()``, no gradients), or None. First result wins.

    :param config: the student's resolved config.

    Its ``forward(batch)`` takes the student's batches and returns a dict with ``logits``
    (and ``rows``, the batch rows they score, when not all), or no ``logits`` when it has no
    classification head; ``classes`` names its logits' classes in order (None without a head);
    ``model`` is the module that ``hidden`` paths are relative to; ``encoder(modality)`` is the
    module whose output ``embedding`` distillation matches. The ``distill`` plugin answers with
    a plait run folder's model or a transformers model folder.
    """


# --------------------------------------------------------------------- launch
@hookspec
def plait_runtime_env(config: PlaitConfig) -> dict[str, Any] | None:
    """Return what a Ray job of this config needs from this plugin, as a Ray runtime env
    fragment, or None. Each plugin; ``plait launch`` merges the fragments into the job's.

    :param config: the resolved config.

    Keys: ``pip`` (list of requirements), ``py_modules`` (local paths or wheels), ``env_vars`` (dict).
    """


# ------------------------------------------------------------------------ cli
@hookspec
def plait_register_commands(subparsers: Any) -> None:
    """Add subcommands to the ``plait`` CLI. Each installed plugin, at every start of the CLI;
    a plugin that raises here is reported and skipped.

    :param subparsers: argparse's subparsers action. Set ``func`` on a parser with
        ``parser.set_defaults(func=...)``; it receives the parsed arguments and returns an exit code.
    """
