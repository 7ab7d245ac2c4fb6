"""YAML config: loading (``include:``, dotted overrides) and validation with pydantic.

The core validates ``run:`` and ``scaling:``; each plugin validates its own block under
``plugins:`` with the model it returns from ``plait_config_schema``. Every error names the
file, the key path and, for a misspelt key, the nearest valid one.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError, nearest

__all__ = ["DataSettings", "DataSource", "FsdpSettings", "Options", "PlaitConfig", "RunSettings", "ScalingSettings",
           "load_config", "merge", "resolve", "with_plugin_options"]

M = TypeVar("M", bound=BaseModel)


class Options(BaseModel):
    """Base for option models: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class RunSettings(Options):
    name: str = "run"
    seed: int = 0
    epochs: int = Field(5, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(64, ge=1)
    # absent or null: batch_size (filled in below), so that the resolved settings always hold a number
    eval_batch_size: int = Field(64, ge=1, description="default: batch_size, so that evaluating never needs "
                                 "more memory than a training step")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    runs_dir: str = Field("runs", description="a folder, or a storage URI (s3://, gs://, file://...)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loader_workers: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="optimizer steps between checkpoints "
                                         "(besides every epoch's end)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    checkpoint_format: Literal["full", "sharded"] = Field(
        "full", description="full: rank 0 gathers the whole model and optimizer into model.safetensors; sharded: "
        "each worker writes its own shards (torch.distributed.checkpoint), nothing is gathered, and the run "
        "resumes on any number of workers (`plait export` writes model.safetensors for eval and compress)")
    grad_accumulation: int = Field(1, ge=1, description="batches per optimizer step")
    peak_tflops: float | None = Field(None, gt=0, description="each device's peak TFLOP/s at run.precision, what "
                                      "MFU divides by (default: the GPU data-sheet table, or on the CPU a matmul "
                                      "measured once)")
    max_nonfinite_steps: int = Field(10, ge=0, description="optimizer steps skipped for a NaN/Inf loss or "
                                     "gradient before the run stops (0: stop at the first)")
    init_from: str | None = Field(None, description="a run folder whose newest weights start this run "
                                  "(fine-tuning); a run resuming from its own checkpoint ignores it")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="recompute the activations of the blocks the modules declare in the backward pass "
        "instead of keeping them: every block (full), or every activation_checkpointing_every-th (selective)")
    activation_checkpointing_every: int = Field(2, ge=1, description="selective: which blocks are recomputed")
    compile: bool = Field(False, description="compile each block the modules declare with torch.compile "
                          "(regional compilation; the whole model where none is declared)")

    @model_validator(mode="before")
    @classmethod
    def _null_eval_batch_size(cls, data: Any) -> Any:
        """``eval_batch_size: null`` means the default, as leaving it out does."""
        if isinstance(data, dict) and "eval_batch_size" in data and data["eval_batch_size"] is None:
            return {k: v for k, v in data.items() if k != "eval_batch_size"}
        return data

    @model_validator(mode="after")
    def _eval_batch_size(self) -> RunSettings:
        if "eval_batch_size" not in self.model_fields_set:
            self.eval_batch_size = self.batch_size
        return self


class FsdpSettings(Options):
    """How FSDP2 (``fully_shard``) splits the model when ``scaling.strategy`` is fsdp."""

    units: Literal["blocks", "modules"] | list[str] = Field(
        "blocks", description="blocks: each block a module declares (a transformer layer, a CNN stage) is a unit, "
        "then each encoder and the fusion; modules: each encoder and the fusion only; or a list of module name "
        "patterns (fnmatch), each of which must match")
    reshard_after_forward: bool = Field(True, description="free a unit's gathered weights after its forward and "
                                        "gather them again for the backward (less memory, more communication)")
    param_dtype: Literal["float32", "bfloat16"] = Field("float32", description="the dtype of gathered weights "
                                                        "in forward and backward")
    reduce_dtype: Literal["float32", "bfloat16"] = Field("float32", description="the dtype gradients are "
                                                         "reduced in")


class ScalingSettings(Options):
    """How the launcher runs the loop (plait.launch maps these to Ray Train's configs)."""

    num_workers: int | tuple[int, int] = Field(
        0, description="Ray Train workers; 0 runs in-process (Ray Train local mode); [min, max]: elastic, as many "
        "workers as the cluster has room for, from min to max, with the global batch kept (gradient accumulation)")
    elastic_resize_interval_s: float = Field(60.0, gt=0, description="elastic: how often a running job looks for "
                                             "room to grow to more workers (Ray Train's resize monitor)")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="how the data-parallel replicas keep their "
                                             "weights in step: ddp (all of them, gradients all-reduced) or fsdp")
    fsdp: FsdpSettings = FsdpSettings()
    data_parallel: Literal["auto"] | int = Field(
        "auto", description="replicas that each see their own batches; auto: the workers left over by "
        "tensor_parallel (num_workers / tensor_parallel)")
    tensor_parallel: int = Field(1, ge=1, description="workers that split each matrix of a module with a "
                                 "tensor-parallel plan (Megatron-style columns and rows), all seeing the same batches")
    expert_parallel: int = Field(1, ge=1, description="data-parallel workers that split each MoE layer's experts "
                                 "between them, sending tokens to their experts with an all-to-all")
    find_unused_parameters: Literal["auto"] | bool = Field(
        "auto", description="DDP's search for parameters a step left without a gradient; auto: only where a "
        "module of the model says it can leave some unused")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts Ray may make (-1: no limit)")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _worker_range(cls, value: Any) -> Any:
        """A count, or ``[min, max]`` with ``1 <= min <= max``."""
        if isinstance(value, bool):
            raise ValueError("expected a worker count or [min, max]")
        if isinstance(value, int):
            if value < 0:
                raise ValueError("a worker count is 0 (in-process) or more")
            return value
        if (not isinstance(value, list | tuple) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ValueError("expected a worker count or an elastic range [min, max]")
        low, high = value
        if not 1 <= low <= high:
            raise ValueError("an elastic range [min, max] needs 1 <= min <= max")
        return (low, high) if low < high else low

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def max_workers(self) -> int:
        """The most workers the run uses: the count, or the top of the elastic range."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers


class DataSource(Options):
    """One source of a training mixture: ``{manifest: a.csv, weight: 0.7}`` is the ``manifest`` plugin's training
    split read from ``a.csv``; ``{spoken_digits: {languages: [en]}, weight: 0.3}`` another plugin's with those
    options (over its options under ``plugins:``)."""

    plugin: str
    options: dict[str, Any] = {}
    weight: float = 1.0
    name: str = ""  # how metrics.jsonl names it: ``name:`` if given, else the plugin and its file

    @model_validator(mode="before")
    @classmethod
    def _one_plugin(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("a source is a mapping such as {manifest: a.csv, weight: 0.5}")
        if "plugin" in data:
            return data
        rest = {k: v for k, v in data.items() if k not in ("weight", "name")}
        if len(rest) != 1:
            raise ValueError(f"a source names one data set plugin beside weight and name, got {sorted(rest) or 'none'}")
        (plugin, value), = rest.items()
        options = {"train": value} if isinstance(value, str) else dict(value or {})
        name = data.get("name") or (f"{plugin}:{value}" if isinstance(value, str) else plugin)
        return {"plugin": plugin, "options": options, "weight": data.get("weight", 1.0), "name": name}

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        if not value >= 0:
            raise ValueError("a source's weight is 0 or more")
        return value


class DataSettings(Options):
    """Where training batches come from: a torch DataLoader in each worker (``engine: torch``), or Ray Data,
    decoding on CPU workers of their own and streaming to the training workers (``engine: ray``)."""

    engine: Literal["torch", "ray"] = Field("torch", description="torch: each worker decodes its own batches "
                                            "(small local sets); ray: Ray Data decodes on separate CPU workers")
    cpus: float = Field(1.0, gt=0, description="engine ray: the CPUs of the decoding workers, all together")
    prefetch_batches: int = Field(2, ge=0, description="engine ray: batches each training worker holds ready")
    views: int = Field(0, ge=0, description="augmented views per training sample: epoch e sees view e % views "
                       "(0: a new view every epoch); a teacher's cache stores that many")
    sources: list[DataSource] | None = Field(None, description="a training mixture: [{manifest: a.csv, weight: "
                                             "0.7}, {manifest: b.csv, weight: 0.3}], drawn by weight each epoch")

    @field_validator("sources")
    @classmethod
    def _positive_weights(cls, sources: list[DataSource] | None) -> list[DataSource] | None:
        if sources is not None:
            if not sources:
                raise ValueError("give at least one source, or leave data.sources out")
            total = sum(s.weight for s in sources)
            if not total > 0:
                raise ValueError(f"the sources' weights sum to {total:g}; they must sum to a positive number")
            names = [s.name for s in sources]
            if len(set(names)) < len(names):
                raise ValueError(f"two sources are both named '{next(n for n in names if names.count(n) > 1)}'; "
                                 "give them name:")
        return sources


class PlaitConfig(BaseModel):
    """The resolved config of one run. Plugins read their options with ``options(Model)``."""

    model_config = ConfigDict(extra="forbid")

    run: RunSettings = RunSettings()
    scaling: ScalingSettings = ScalingSettings()
    data: DataSettings = DataSettings()
    plugins: dict[str, dict[str, Any]] = {}
    source: str = Field("<config>", exclude=True)
    _options: dict[str, BaseModel] = PrivateAttr(default_factory=dict)

    def options(self, model: type[M]) -> M:
        """The validated options of the plugin whose schema is ``model``."""
        for value in self._options.values():
            if type(value) is model:
                return value
        raise ConfigError(f"{self.source}: no plugin with options {model.__name__} is configured")

    def to_dict(self) -> dict[str, Any]:
        """Everything, defaults included: what ``config.yaml`` in the run folder holds."""
        plugins = {}
        for name, raw in self.plugins.items():
            opts = self._options.get(name)
            plugins[name] = opts.model_dump(mode="json") if opts is not None else dict(raw)
        return {
            "run": self.run.model_dump(mode="json"),
            "scaling": self.scaling.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json", exclude={"sources"} if self.data.sources is None else set()),
            "plugins": plugins,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


TOP_LEVEL_KEYS = ("include", "run", "scaling", "data", "plugins")
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``top`` replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` with its ``include:`` files merged beneath it (relative to the file)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"{path}: include cycle: {chain}")
    data = _read_yaml(path)
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include: expected a file name or a list of file names")
    merged: dict[str, Any] = {}
    for include in includes:
        merged = merge(merged, load_raw(path.parent / include, (*_seen, path)))
    return merge(merged, data)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` in place; the value is parsed as YAML (``8``, ``true``, ``[a, b]``)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{override}': expected key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"override '{override}': '{where}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _field_names(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Valid keys at ``loc`` inside ``model`` (for 'did you mean')."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(exc: ValidationError, model: type[BaseModel], source: str, prefix: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        keypath = ".".join(str(p) for p in (*([prefix] if prefix else []), *loc))
        if err["type"] == "extra_forbidden":
            hint = nearest(str(loc[-1]), _field_names(model, loc[:-1]))
            lines.append(f"{keypath}: unknown option{hint}")
        else:
            message = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
            lines.append(f"{keypath}: {message} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(lines)


def validate(model: type[M], data: Any, source: str, prefix: str = "") -> M:
    """``model.model_validate(data)`` with an error that names the file and key path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, model, source, prefix)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw merged dict of ``path`` with includes and overrides, checked at the top level."""
    data = load_raw(path)
    for override in overrides:
        apply_override(data, override)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{path}: unknown top-level key '{key}'{nearest(key, TOP_LEVEL_KEYS)}")
    plugins = data.get("plugins") or {}
    if not isinstance(plugins, dict):
        raise ConfigError(f"{path}: plugins: expected a mapping of plugin name -> options")
    for name, options in plugins.items():
        if options is None:
            plugins[name] = {}
        elif not isinstance(options, dict):
            raise ConfigError(f"{path}: plugins.{name}: expected a mapping of options, got {options!r}")
    data["plugins"] = plugins
    return data


def resolve(data: dict[str, Any], schemas: dict[str, type[BaseModel] | None], source: str) -> PlaitConfig:
    """Validate the raw dict against the core schema and each plugin's ``schemas[name]``."""
    config = validate(
        PlaitConfig,
        {"run": data.get("run") or {}, "scaling": data.get("scaling") or {}, "data": data.get("data") or {},
         "plugins": data["plugins"]},
        source,
    )
    config.source = source
    for name, raw in config.plugins.items():
        schema = schemas.get(name)
        if schema is None:
            if raw:
                raise ConfigError(f"{source}: plugins.{name}: this plugin takes no options (got {sorted(raw)})")
            continue
        config._options[name] = validate(schema, raw, source, prefix=f"plugins.{name}")
    for i, spec in enumerate(config.data.sources or []):
        if spec.plugin not in config.plugins:
            raise ConfigError(f"{source}: data.sources.{i}: plugin '{spec.plugin}' is not under plugins:"
                              f"{nearest(spec.plugin, config.plugins)}")
        schema = schemas.get(spec.plugin)
        if schema is None and spec.options:
            raise ConfigError(f"{source}: data.sources.{i}: plugin '{spec.plugin}' takes no options")
        with_plugin_options(config, spec.plugin, spec.options, schema, f"data.sources.{i}")  # checked now
    return config


def with_plugin_options(config: PlaitConfig, plugin: str, options: dict[str, Any], schema: type[BaseModel] | None,
                        where: str) -> PlaitConfig:
    """``config`` with ``options`` over the plugin's own under ``plugins:`` (a mixture's source)."""
    copied = config.model_copy()
    copied._options = dict(config._options)
    if schema is not None:
        copied._options[plugin] = validate(schema, merge(config.plugins[plugin], options), config.source, where)
    return copied
