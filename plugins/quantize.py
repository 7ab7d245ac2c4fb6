"""Quantization: int8 (dynamic or calibrated static), torchao weight-only int8/int4, fp16/bf16 casts,
and quantization-aware training.

Backends are chosen by feature detection, never assumed:

- ``dynamic_int8``: Linear layers get int8 weights (per output channel) and activations quantized
  per batch. ``engine: auto`` times one of the model's own Linear layers under every quantized
  engine this PyTorch offers (x86, fbgemm, onednn, ...) and under torchao's ``quantize_``, and keeps
  the fastest: on CPUs with AVX-512 VNNI or AMX, onednn is several times faster than fp32; on AVX2
  ones, x86/fbgemm; torchao's CPU int8 path is slower than fp32 on both.
- ``static_int8``: Conv2d (after folding each following BatchNorm into it) and Linear layers run in
  int8 with activation ranges calibrated on validation batches; for the CNN encoders this is where
  the time goes.
- ``weight_only_int8`` / ``weight_only_int4``: torchao, for GPU inference (int4 needs CUDA kernels).
- ``fp16`` / ``bf16``: a cast, for GPU inference (bf16 also runs fast on CPUs with AMX).

With ``qat: true`` in a training config the Linear layers train with torchao's fake quantization
(int8 per-channel weights, int8 per-token activations); ``plait compress`` converts them at the end.

Quantized layers keep plain tensors in their state dict (int8 values, scales, zero points; torchao's
allow-listed JSON metadata for its tensors), so a compressed run folder is ordinary safetensors:
``plait compress`` writes ``converted: true`` into its config, and rebuilding the model from it
quantizes the structure first and then loads the stored int8 weights. Nothing is unpickled.

    plait compress runs/digits                 # the quantize plugin with its defaults
    plait compress runs/digits compress.yaml   # plugins: {quantize: {backend: static_int8}}

Its length (over 400 lines) is deliberate: a built-in plugin is one module, and each backend's
building, training and reloading must agree with the others on how quantized layers are stored.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import types
import warnings
from collections.abc import Iterable
from typing import Any, Literal, cast

import torch
from pydantic import Field
from torch import nn

from plait.core.config import Options
from plait.core.errors import ConfigError, DataError
from plait.core.hookspecs import hookimpl
from plait.core.model import median_forward_ms

log = logging.getLogger("plait.quantize")

Backend = Literal["dynamic_int8", "static_int8", "weight_only_int8", "weight_only_int4", "fp16", "bf16"]
TORCHAO = "torchao"


class QuantizeOptions(Options):
    backend: Backend = "dynamic_int8"
    engine: str = Field("auto", description="int8 kernels: auto (time each on this device and keep the "
                        "fastest), a torch.backends.quantized engine (x86, fbgemm, onednn, qnnpack) or torchao "
                        "(dynamic_int8 only)")
    skip: list[str] = Field([], description="module paths (and everything under them) left in float, "
                            "e.g. head")
    calibration_batches: int = Field(8, ge=1, description="validation batches that calibrate static_int8")
    qat: bool = Field(False, description="train with fake quantization (torchao QAT); plait compress converts")
    converted: bool = Field(False, description="set by plait compress: the model is built quantized and its "
                            "int8 weights come from the checkpoint")


# ------------------------------------------------------------ plain-tensor state
_DTYPES = {"torch.qint8": torch.qint8, "torch.quint8": torch.quint8, "torch.qint32": torch.qint32,
           "torch.float16": torch.float16}


def _encode(key: str, value: Any, out: dict[str, Any]) -> None:
    """Write ``value`` (a quantized tensor, a torchao tensor, a packed (weight, bias) tuple, a dtype)
    into ``out`` as plain tensors under ``key#...`` names."""
    if value is None:  # a quantized layer without bias
        out[f"{key}#none"] = torch.zeros(0)
    elif isinstance(value, torch.dtype):
        out[f"{key}#dtype={value}"] = torch.zeros(0)
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            if item is not None:
                _encode(f"{key}#{i}", item, out)
    elif isinstance(value, torch.Tensor) and value.is_quantized:
        out[f"{key}#int"] = value.int_repr()
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[f"{key}#scale"] = value.q_per_channel_scales().float()
            out[f"{key}#zero_point"] = value.q_per_channel_zero_points()
            out[f"{key}#axis{value.q_per_channel_axis()}"] = torch.zeros(0)
        else:
            out[f"{key}#scale"] = torch.tensor(value.q_scale(), dtype=torch.float64)
            out[f"{key}#zero_point"] = torch.tensor(value.q_zero_point())
    elif type(value) is not torch.Tensor and type(value) is not nn.Parameter and isinstance(value, torch.Tensor):
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, metadata = flatten_tensor_state_dict({key: value})
        out.update({f"{key}#ao#{name}": tensor for name, tensor in tensors.items()})
        out[f"{key}#torchao"] = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    else:
        out[key] = value


def _decode(key: str, entries: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``_encode`` for one original ``key``; ``entries`` maps the suffix after ``key#``."""
    if set(entries) == {""}:
        return entries[""]
    if set(entries) == {"none"}:
        return None
    if "torchao" in entries:
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        metadata = json.loads(bytes(entries["torchao"].to(torch.uint8).tolist()).decode())
        tensors = {name[3:]: t for name, t in entries.items() if name.startswith("ao#")}
        restored = unflatten_tensor_state_dict(tensors, metadata)
        restored = restored[0] if isinstance(restored, tuple) else restored
        return restored[key]
    dtype = [name for name in entries if name.startswith("dtype=")]
    if dtype:
        return _DTYPES[dtype[0][len("dtype="):]]
    if "int" in entries:
        values = entries["int"]  # its dtype (int8, uint8, int32) gives the quantized one
        axis = [name for name in entries if name.startswith("axis")]
        if axis:
            return torch._make_per_channel_quantized_tensor(
                values, entries["scale"].double(), entries["zero_point"].long(), int(axis[0][4:]))
        return torch._make_per_tensor_quantized_tensor(values, float(entries["scale"]), int(entries["zero_point"]))
    items: dict[int, dict[str, torch.Tensor]] = {}  # a packed (weight, bias) tuple: "0#int", "1", ...
    for name, tensor in entries.items():
        index, _, rest = name.partition("#")
        items.setdefault(int(index), {})[rest] = tensor
    return (_decode(f"{key}#0", items[0]), _decode(f"{key}#1", items[1]) if 1 in items else None)


def _save_plain(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        value = state_dict[key]
        if value is None or isinstance(value, (tuple, torch.dtype)) or (isinstance(value, torch.Tensor) and (
                value.is_quantized or type(value) not in (torch.Tensor, nn.Parameter))):
            del state_dict[key]
            _encode(key, value, state_dict)


def _load_plain(self: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *args: Any) -> None:
    """``_load_from_state_dict`` of a module made by ``keep_plain_state``: decode, then load as its class does.
    (A load pre-hook would run too late: torch's quantized modules read their keys before calling it.)"""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in state_dict if k.startswith(prefix) and "#" in k]:
        base, _, suffix = key.partition("#")
        grouped.setdefault(base, {})[suffix] = state_dict.pop(key)
    for base, entries in grouped.items():
        try:
            state_dict[base] = _decode(base, entries)
        except (KeyError, ValueError, IndexError, RuntimeError, TypeError) as exc:
            raise DataError(f"{base}: the stored quantized weights are malformed ({type(exc).__name__}: {exc}); "
                            f"found entries {sorted(entries)[:6]}") from None
    # safetensors keeps no per-module versions; without one torch's quantized modules expect an old layout
    local_metadata.setdefault("version", getattr(type(self), "_version", 1))
    type(self)._load_from_state_dict(self, state_dict, prefix, local_metadata, *args)


def keep_plain_state(module: nn.Module) -> None:
    """Make ``module``'s state dict plain tensors (and read them back), whatever it holds."""
    module.register_state_dict_post_hook(_save_plain)
    cast(Any, module).plait_quantized = True  # an attribute nn.Module does not declare
    for part in module.modules():  # a bound method: deepcopy rebinds it to the copy
        cast(Any, part)._load_from_state_dict = types.MethodType(_load_plain, part)


def quantized_layers(model: nn.Module) -> list[str]:
    """Paths of the layers ``quantize`` changed."""
    return [name for name, m in model.named_modules() if getattr(m, "plait_quantized", False)]


# ------------------------------------------------------------------ which layers
def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def layer_paths(model: nn.Module, kinds: tuple[type, ...], skip: list[str]) -> list[str]:
    """Paths of the layers of exactly these types, outside ``skip`` and outside attention blocks
    (nn.MultiheadAttention reads its projections' weights directly; a quantized one would be bypassed)."""
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return [name for name, m in model.named_modules()
            if type(m) in kinds and not _under(name, skip) and not _under(name, attention)]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def fold_batch_norms(model: nn.Module, skip: list[str]) -> None:
    """Fold each BatchNorm2d into the Conv2d registered just before it (eval mode), the BatchNorm
    becoming an Identity. Registration order is taken as call order (true of Sequential blocks and
    timm's ResNets); ``static_int8`` checks the outputs did not change."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for path, module in list(model.named_modules()):
        names = list(module._modules)
        for first, second in itertools.pairwise(names):
            conv, norm = module._modules[first], module._modules[second]
            where = f"{path}.{first}" if path else first
            if type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and not _under(where, skip):
                module._modules[first] = fuse_conv_bn_eval(conv.eval(), norm.eval())
                module._modules[second] = nn.Identity()


# ------------------------------------------------------------------ backends
def _torch_engines() -> list[str]:
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def _dynamic_int8(model: nn.Module, paths: list[str], engine: str) -> None:
    if engine == TORCHAO:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda _, fqn: fqn in paths)
    else:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        torch.backends.quantized.engine = engine
        quantize_dynamic(model, dict.fromkeys(paths, per_channel_dynamic_qconfig), inplace=True)


def _static_int8(model: nn.Module, paths: list[str], engine: str, calibration: list[dict] | None) -> None:
    from torch.ao.quantization import QuantWrapper, convert, get_default_qconfig, prepare

    torch.backends.quantized.engine = engine
    for path in paths:
        wrapper = QuantWrapper(model.get_submodule(path))
        wrapper.qconfig = get_default_qconfig(engine)
        _replace(model, path, wrapper)
    prepare(model, inplace=True)
    with torch.inference_mode():
        for batch in calibration or []:
            model(batch)
    convert(model, inplace=True)


def _weight_only(model: nn.Module, paths: list[str], bits: int) -> None:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig()
    quantize_(model, config, filter_fn=lambda _, fqn: fqn in paths)


def _cast(model: nn.Module, dtype: torch.dtype, skip: list[str]) -> list[str]:
    """Weights of Linear, Conv and Embedding layers in ``dtype``; the forward runs under autocast so
    float inputs and the fp32 front ends (log-mel) meet them in the right type."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    paths = [name for name, m in model.named_modules() if isinstance(m, kinds) and not _under(name, skip)]
    for path in paths:
        model.get_submodule(path).to(dtype)
    device_type = next(model.parameters()).device.type
    forward = model.forward

    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            outputs = forward(*args, **kwargs)
        return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()}

    model.forward = autocast_forward
    return paths


def quantize(model: nn.Module, options: QuantizeOptions, engine: str, calibration: list[dict] | None) -> list[str]:
    """Quantize ``model`` in place with ``options.backend`` on ``engine``; return the layers changed.
    Without ``calibration`` (rebuilding a compressed run) only the structure is made, for the
    stored weights to be loaded into."""
    backend, skip = options.backend, options.skip
    if backend in ("fp16", "bf16"):
        return _cast(model, getattr(torch, "float16" if backend == "fp16" else "bfloat16"), skip)
    if backend == "static_int8":
        fold_batch_norms(model, skip)
        paths = layer_paths(model, (nn.Linear, nn.Conv2d), skip)
    else:
        paths = layer_paths(model, (nn.Linear,), skip)
    if not paths:
        kinds = "Linear or Conv2d" if backend == "static_int8" else "Linear"
        hint = "; static_int8 quantizes Conv2d layers too" if backend != "static_int8" else ""
        raise ConfigError(f"quantize: backend {backend} quantizes {kinds} layers and the model has none outside "
                          f"skip {skip}{hint}")
    with warnings.catch_warnings():
        # torch.ao's eager int8 modules warn that they are deprecated (pytorch/pytorch#184982; the
        # README says why plait still uses them), and, rebuilding without calibration, that
        # observers saw no data (the checkpoint holds the ranges)
        warnings.simplefilter("ignore", UserWarning)
        if backend == "dynamic_int8":
            _dynamic_int8(model, paths, engine)
        elif backend == "static_int8":
            _static_int8(model, paths, engine, calibration)
        else:
            _weight_only(model, paths, 8 if backend == "weight_only_int8" else 4)
    for path in paths:
        keep_plain_state(model.get_submodule(path))
    if any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules()):
        # the fused fast path reads the float weights of linear1/linear2 directly
        torch.backends.mha.set_fastpath_enabled(False)
    return paths


# ------------------------------------------------------------------ engines
def _torchao_available() -> bool:
    try:  # (plait.core keeps torchao's import quiet)
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


def engines_for(backend: str) -> list[str]:
    """The int8 engines ``backend`` can use on this machine."""
    if backend == "dynamic_int8":
        return _torch_engines() + ([TORCHAO] if _torchao_available() else [])
    return _torch_engines() if backend == "static_int8" else []


def pick_engine(model: nn.Module, options: QuantizeOptions, calibration: list[dict]) -> tuple[str, dict[str, float]]:
    """The engine to quantize with, and the latencies (ms) that chose it when ``engine: auto``."""
    available = engines_for(options.backend)
    if options.backend not in ("dynamic_int8", "static_int8"):
        return "", {}
    if options.engine != "auto":
        if options.engine not in available:
            raise ConfigError(f"quantize: engine '{options.engine}' is not available for {options.backend} on this "
                              f"machine; available: {available} (or auto)")
        return options.engine, {}
    timings = {}
    for engine in available:
        trial = copy.deepcopy(model)
        quantize(trial, options, engine, calibration)
        timings[engine] = round(median_forward_ms(trial, calibration[0]), 2)  # one thread, as report.md
    return min(timings, key=timings.__getitem__), timings


def _restore_engine(options: QuantizeOptions) -> str:
    """The engine a compressed run was made with, or the first available one if this machine lacks it."""
    available = engines_for(options.backend)
    if options.engine in available or not available:
        return options.engine
    log.warning("quantize: engine %s (the run's) is not available here; using %s", options.engine, available[0])
    return available[0]


def _check_backend(options: QuantizeOptions, device: torch.device) -> QuantizeOptions:
    """Feature detection for the torchao backends: a clear error, or a warning and the backend used instead."""
    if options.backend.startswith("weight_only") and not _torchao_available():
        raise ConfigError(f"quantize: backend {options.backend} needs torchao (pip install 'plait[quantize]')")
    if options.backend == "weight_only_int4":
        try:
            _weight_only(nn.Sequential(nn.Linear(256, 256)).to(device), ["0"], 4)
        except Exception as exc:  # noqa: BLE001 - any failure means: not on this device
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("quantize: weight_only_int4 is not available on %s (%s); using weight_only_int8 instead",
                        device.type, reason)
            options = options.model_copy(update={"backend": "weight_only_int8"})
    if options.backend.startswith("weight_only") and device.type == "cpu":
        log.warning("quantize: %s is meant for GPU inference; on a CPU it saves memory but is not faster than "
                    "fp32 (dynamic_int8 is the fast CPU backend)", options.backend)
    return options


def prepare_qat(model: nn.Module, skip: list[str]) -> list[str]:
    """Fake-quantize the Linear layers as dynamic_int8 will quantize them: int8 per-channel symmetric
    weights, int8 per-token asymmetric activations (torchao QAT, a base config it supports)."""
    if not _torchao_available():
        raise ConfigError("quantize: qat needs torchao (pip install 'plait[quantize]')")
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, quantize_
    from torchao.quantization.qat import QATConfig

    paths = layer_paths(model, (nn.Linear,), skip)
    if not paths:
        raise ConfigError(f"quantize: qat fake-quantizes Linear layers and the model has none outside skip {skip}")
    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    quantize_(model, QATConfig(base, step="prepare"), filter_fn=lambda _, fqn: fqn in paths)
    return paths


def _convert_qat(model: nn.Module) -> int:
    """Swap fake-quantized layers back to plain ones (their weights are the trained float weights)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    count = sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    if count:
        quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, _: isinstance(m, FakeQuantizedLinear))
    return count


# ------------------------------------------------------------------ hooks
@hookimpl
def plait_config_schema():
    return QuantizeOptions


@hookimpl
def plait_configure_model(model, config):
    options = config.options(QuantizeOptions)
    if options.converted:
        model.eval()  # folding BatchNorm and converting observed layers are inference-time steps
        quantize(model, options, _restore_engine(options), None)
    elif options.qat:
        prepare_qat(model, options.skip)
    return model


@hookimpl
def plait_compress(model, job):
    options = job.config.options(QuantizeOptions)
    if options.converted:
        raise ConfigError(f"quantize: {job.source_dir} is quantized already ({options.backend})")
    device = next(model.parameters()).device
    options = _check_backend(options, device)
    qat_layers = _convert_qat(model) if options.qat else 0
    calibration = job.calibration_batches(options.calibration_batches)
    engine, timings = pick_engine(model, options, calibration)
    reference = _outputs(model, calibration[0]) if options.backend == "static_int8" else None
    floats = sum(p.numel() for p in model.parameters())
    layers = quantize(model, options, engine, calibration)
    share = 1 - sum(p.numel() for p in model.parameters()) / floats  # torch.ao int8 layers hold no float weights
    if reference is not None:
        _check_close(reference, _outputs(model, calibration[0]))
    block = {**options.model_dump(exclude_defaults=True), "backend": options.backend, "engine": engine or "auto",
             "converted": True, "qat": False}
    job.set_plugin_options("quantize", block)
    lines = [f"backend {options.backend}" + (f", engine {engine}" if engine else ""),
             f"{len(layers)} layers quantized" + (f" (trained with fake quantization: {qat_layers})" if qat_layers
                                                  else "")
             + (f", holding {share:.0%} of the model's weights: the rest (embedding tables, normalisation, layers "
                "left in float) bounds the speed-up and the size" if engine not in ("", TORCHAO) else "")]
    if timings:
        lines.append("engine chosen by timing the whole model, one thread, ms: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(timings.items(), key=lambda kv: kv[1])))
    job.notes.extend(lines)
    return model


def _outputs(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(batch)["logits"].float()


def _check_close(reference: torch.Tensor, quantized: torch.Tensor, min_agreement: float = 0.9) -> None:
    """static_int8 folds BatchNorm by registration order; a model that calls them otherwise would
    disagree wildly with itself, which this catches."""
    agreement = (reference.argmax(-1) == quantized.argmax(-1)).float().mean().item()
    if agreement < min_agreement:
        raise ConfigError(f"quantize: static_int8 changed {1 - agreement:.0%} of the predictions on a calibration "
                          "batch; leave the layers that break it in float with skip: [...], or use dynamic_int8")
