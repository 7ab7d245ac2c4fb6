"""Data sets and loaders: the plugins' data set with their sample transforms, the samplers that
shard evaluation exactly and resume an epoch in its middle, and batches moved to a device."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import hookspecs
from .config import PlaitConfig
from .errors import DataError, PluginError
from .manager import Plugins

__all__ = ["SAMPLE_INDEX", "ShardSampler", "SkipSampler", "TransformedDataset", "build_dataset", "epoch_loader",
           "make_loader", "move", "only_modalities"]


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: an exact partition (no padding, unlike
    DistributedSampler), so that metrics summed over workers count each sample once."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipSampler(Sampler[int]):
    """The indices of ``sampler`` after the first ``skip``: resume in the middle of an epoch
    without loading the samples already trained on."""

    def __init__(self, sampler: Any, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


SAMPLE_INDEX = "sample_index"  # each batch's positions in its data set: which samples a step trained on


class TransformedDataset(Dataset[dict[str, Any]]):
    """A data set whose samples pass through the plugins' sample transforms; it carries the
    attributes the loop reads from the plugin's data set (``plait_build_dataset``). Its batches
    hold ``batch["sample_index"]``, the samples' positions in the data set, beside what the
    plugin's collate makes."""

    def __init__(self, base: Any, transforms: list[Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
        self.base = base
        self.transforms = transforms
        self.classes: list[str] = list(base.classes)
        self.modalities: tuple[str, ...] = tuple(base.modalities)
        self.plugin_collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = base.collate_fn
        self.info: dict[str, Any] = getattr(base, "info", {})

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = self.base[index]
        for transform in self.transforms:
            sample = transform(sample)
        return {**sample, SAMPLE_INDEX: index}

    def collate_fn(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        indices = torch.tensor([sample.pop(SAMPLE_INDEX) for sample in samples])
        return {**self.plugin_collate(samples), SAMPLE_INDEX: indices}


def build_dataset(plugins: Plugins, config: PlaitConfig, split: str) -> TransformedDataset | None:
    """The ``split`` data set with its transforms, or None when no plugin has that split."""
    dataset = plugins.first(hookspecs.plait_build_dataset, config=config, split=split)
    if dataset is None:
        if split == "train":
            raise PluginError("no plugin provides a data set; add one (spoken_digits, manifest) to plugins:")
        return None
    for attribute in ("classes", "modalities", "collate_fn"):
        if not hasattr(dataset, attribute):
            raise PluginError(f"the {split} data set {type(dataset).__name__} has no '{attribute}' attribute")
    if len(dataset) == 0:
        raise DataError(f"the {split} split of {type(dataset).__name__} is empty")
    transforms = [t for result in plugins.call_each(hookspecs.plait_sample_transforms, config=config,
                                                    split=split).values() for t in (result or [])]
    return TransformedDataset(dataset, transforms)


def make_loader(dataset: TransformedDataset, batch_size: int, shuffle: bool, seed: int, workers: int,
                sampler: Sampler[int] | None = None) -> DataLoader[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        collate_fn=dataset.collate_fn, num_workers=workers, generator=generator, persistent_workers=workers > 0,
    )


def epoch_loader(loader: DataLoader[Any], epoch: int, seed: int, skip_batches: int) -> DataLoader[Any]:
    """The training loader positioned for ``epoch``: its shuffle depends only on the seed
    and the epoch, and ``skip_batches`` already trained on are passed over."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed + epoch)
    if not skip_batches:
        return loader
    assert loader.batch_size is not None and isinstance(sampler, Sized)  # plait's loaders batch by size
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=SkipSampler(sampler, skip_batches *
                      loader.batch_size), collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator)  # the loader draws its worker seed from it: same RNG use


def move(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    return batch


def only_modalities(batch: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    """``batch`` as if its samples had only the modalities in ``keep``."""
    present = {m: (mask if m in keep else torch.zeros_like(mask)) for m, mask in batch["present"].items()}
    return {**batch, "present": present}
