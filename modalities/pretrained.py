"""Pretrained towers from local folders: transformers model folders (``save_pretrained``'s layout) and
timm weight files, each mismatch one line that names the file.

Nothing here downloads: a folder is read as it is on disk (``local_files_only``), as in a cluster's pods
that have the weights in their image or on a mounted volume.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plait.core.errors import ConfigError

#: The weight files ``save_pretrained`` writes, in the order transformers looks for them.
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _quiet_transformers() -> None:
    """transformers 5 prints a load report table and progress bars for each folder; plait says what matters."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:200]


def hf_folder(folder: str | Path, key: str) -> tuple[Path, Path]:
    """``folder`` checked to be a transformers model folder: (the folder, its weight file)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}: model folder '{folder}' not found")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path / 'config.json'}: missing; {key} needs a transformers model folder "
                          "(config.json and its weights, as save_pretrained writes them)")
    weights = next((path / name for name in HF_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ConfigError(f"{path}: no weights beside config.json (one of {', '.join(HF_WEIGHTS)}); {key}")
    return path, weights


def load_hf_model(folder: str | Path, key: str) -> Any:
    """The ``transformers.AutoModel`` of a local folder, its weights all loaded: a config transformers
    cannot read, a weight of another shape than the config makes, or a file that will not load is a
    ``ConfigError`` naming the file."""
    from transformers import AutoConfig, AutoModel

    _quiet_transformers()
    path, weights = hf_folder(folder, key)
    config_file = path / "config.json"
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_file}: transformers cannot read this config ({_first_line(exc)}); {key}") from None
    try:
        model, info = AutoModel.from_pretrained(str(path), config=config, local_files_only=True,
                                                ignore_mismatched_sizes=True, output_loading_info=True)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"{weights}: cannot be loaded ({_first_line(exc)}); {key}") from None
    if info["mismatched_keys"]:
        name, saved, built = sorted(info["mismatched_keys"], key=str)[0]
        raise ConfigError(f"{weights}: '{name}' has shape {list(saved)} but {config_file} makes it {list(built)}"
                          f" ({len(info['mismatched_keys'])} weights differ); {key}")
    model.plait_pretrained = str(path)  # where the base weights came from (lora records it)
    return model


def hf_processor_config(folder: str | Path) -> dict[str, Any]:
    """The folder's ``preprocessor_config.json`` (image mean and std, audio normalisation), or {}."""
    file = Path(folder) / "preprocessor_config.json"
    if not file.is_file():
        return {}
    try:
        loaded: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: unreadable ({exc})") from None
    return loaded


def timm_weights(model_name: str, file: str | Path, key: str, **kwargs: Any) -> nn.Module:
    """timm's ``model_name`` with its weights from a local safetensors (or .pth) file, as timm loads a
    downloaded one (``pretrained_cfg_overlay``): the classifier dropped when ``num_classes`` differs, the
    first convolution adapted to ``in_chans``. A file of another architecture is one line naming it."""
    import timm

    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: weights file '{file}' not found")
    try:
        model: nn.Module = timm.create_model(model_name, pretrained=True,
                                             pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except RuntimeError as exc:  # load_state_dict: missing or unexpected keys, or shapes
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = "; ".join(lines[1:3]) or lines[0]
        raise ConfigError(f"{path}: does not fit timm's '{model_name}' ({detail[:240]}); {key}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be loaded ({_first_line(exc)}); {key}") from None
    setattr(model, "plait_pretrained", str(path))  # noqa: B010 - a plain attribute, not a submodule
    return model


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """A transformers model's layers, wherever its architecture keeps them (``layers``, ``encoder.layer``,
    ``encoder.layers``): FSDP units and checkpointed blocks."""
    for path in ("layers", "encoder.layer", "encoder.layers"):
        found: Any = model
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList) and len(found):
            return list(found)
    return []


def masked_frames_mean(hidden: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean of frames [B, T, D] over each row's first ``lengths`` frames (all of them without lengths)."""
    if lengths is None:
        return hidden.mean(dim=1)
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).unsqueeze(-1)
    weights = mask.to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
