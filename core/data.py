"""Data sets and loaders: the plugins' data set with their sample transforms, a mixture of several
sources drawn by weight, the orders in which each data replica reads an epoch, the samplers that
shard evaluation exactly and resume an epoch in its middle, and batches moved to a device.

``TrainBatches`` is what the loop reads training batches from: a DataLoader here (``LoaderBatches``),
or what a runner supplies instead (``Distributed.train_batches``: Ray Data, in ``plait.launch``).
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import hookspecs
from .config import PlaitConfig, with_plugin_options
from .errors import DataError, PluginError
from .manager import Plugins

__all__ = [
    "SAMPLE_INDEX",
    "TRANSFORM_SEED",
    "EpochKeys",
    "LoaderBatches",
    "MixedDataset",
    "MixtureSampler",
    "SampleKey",
    "ShardSampler",
    "SkipSampler",
    "TrainBatches",
    "TransformedDataset",
    "batches_of",
    "build_dataset",
    "epoch_loader",
    "epoch_sampler",
    "label_order",
    "make_loader",
    "move",
    "only_modalities",
    "source_shares",
    "view_seed",
]


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
TRANSFORM_SEED = "transform_seed"  # the seed each sample's transforms drew from: which augmented view it is

#: a training sample's key: (its position in the data set, the epoch that reads it)
SampleKey = tuple[int, int]


def view_seed(seed: int, index: int, view: int) -> int:
    """The seed of view ``view`` of sample ``index``: what its sample transforms draw from, wherever it is
    decoded (a DataLoader worker, a Ray Data actor, a teacher's cache)."""
    return ((seed * 1_000_003 + view) * 2_147_483_647 + index) % 2**63


class TransformedDataset(Dataset[dict[str, Any]]):
    """A data set whose samples pass through the plugins' sample transforms; it carries the
    attributes the loop reads from the plugin's data set (``plait_build_dataset``). Its batches
    hold ``batch["sample_index"]``, the samples' positions in the data set, and
    ``batch["transform_seed"]``, beside what the plugin's collate makes.

    A sample is read by its position, or by ``(position, epoch)`` (``SampleKey``, as ``EpochKeys`` gives
    them). Its transforms draw from torch's CPU generator seeded by ``view_seed`` for the epoch's view:
    ``epoch % views``, or the epoch itself when ``views`` is 0 (a new view every epoch; without transforms
    there is one view, 0). So a sample's augmented view depends only on the run's seed, the sample and the
    view: not on which worker decodes it, in what order, or whether the run was resumed; and a teacher can
    be run on the very views the student will see."""

    def __init__(self, base: Any, transforms: list[Callable[[dict[str, Any]], dict[str, Any]]], seed: int = 0,
                 views: int = 0) -> None:
        self.base = base
        self.transforms = transforms
        self.seed, self.views = seed, views
        self.classes: list[str] = list(base.classes)
        self.modalities: tuple[str, ...] = tuple(base.modalities)
        self.plugin_collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = base.collate_fn
        self.info: dict[str, Any] = getattr(base, "info", {})

    def __len__(self) -> int:
        return len(self.base)

    def view_of(self, epoch: int) -> int:
        """Which view of its samples ``epoch`` reads: there is only one without transforms."""
        if not self.transforms:
            return 0
        return epoch % self.views if self.views else epoch

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        seed = view_seed(self.seed, index, self.view_of(epoch))
        sample: dict[str, Any] = self.base[index]
        if self.transforms:
            with torch.random.fork_rng(devices=[]):  # the run's own random stream (dropout...) is left as it was
                torch.default_generator.manual_seed(seed)
                for transform in self.transforms:
                    sample = transform(sample)
        return {**sample, SAMPLE_INDEX: index, TRANSFORM_SEED: seed}

    def collate_fn(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        indices = torch.tensor([sample.pop(SAMPLE_INDEX) for sample in samples])
        seeds = torch.tensor([sample.pop(TRANSFORM_SEED) for sample in samples])
        return {**self.plugin_collate(samples), SAMPLE_INDEX: indices, TRANSFORM_SEED: seeds}


class EpochKeys(Sampler[SampleKey]):
    """A sampler's positions as ``SampleKey``s of the epoch it was last set to (``set_epoch``, which it
    passes on), so that each sample's transforms know which view to draw. It runs in the main process,
    also when DataLoader workers decode."""

    def __init__(self, sampler: Any) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[SampleKey]:
        return ((int(index), self.epoch) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def label_order(label: str) -> tuple[int, int, str]:
    """How class names sort: numbers by value, before names in alphabetical order."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


class MixedDataset(Dataset[dict[str, Any]]):
    """Several sources' training sets as one: their samples in turn (source 0's, then 1's, ...), labels mapped
    onto the union of their class names, modalities the union of theirs. Which samples an epoch draws, and
    how many of each source, is ``MixtureSampler``'s."""

    def __init__(self, sources: list[Any], names: list[str], weights: list[float]) -> None:
        self.sources, self.names, self.weights = sources, names, weights
        self.sizes = [len(source) for source in sources]
        self.offsets = list(itertools.accumulate(self.sizes, initial=0))
        same = all(list(source.classes) == list(sources[0].classes) for source in sources)
        self.classes: list[str] = (list(sources[0].classes) if same else
                                   sorted({str(c) for source in sources for c in source.classes}, key=label_order))
        index = {name: i for i, name in enumerate(self.classes)}
        self.label_maps = [[index[str(c)] for c in source.classes] for source in sources]
        self.modalities = tuple(dict.fromkeys(m for source in sources for m in source.modalities))
        self.collate_fn = sources[0].collate_fn
        self.info: dict[str, Any] = getattr(sources[0], "info", {})

    def __len__(self) -> int:
        return self.offsets[-1]

    def source_of(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return bisect.bisect_right(self.offsets, index) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = self.source_of(index)
        sample = dict(self.sources[source][index - self.offsets[source]])
        sample["label"] = self.label_maps[source][int(sample["label"])]
        return sample


class MixtureSampler(Sampler[int]):
    """One data replica's order of an epoch of a ``MixedDataset``: the epoch holds as many samples as all the
    sources together, shared out by weight (largest remainders: the shares are the weights to one sample).
    Each source gives its share from a fresh shuffle of its samples (again and again if its share is larger),
    the whole is shuffled, and replica r reads positions r, r + n, ... (padded to a multiple of n, as
    DistributedSampler is). Everything depends only on the seed and the epoch (``set_epoch``)."""

    def __init__(self, dataset: MixedDataset, seed: int, replica: int = 0, replicas: int = 1) -> None:
        self.dataset, self.seed, self.replica, self.replicas, self.epoch = dataset, seed, replica, replicas, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def counts(self) -> list[int]:
        weights, total = self.dataset.weights, len(self.dataset)
        exact = [total * w / sum(weights) for w in weights]
        counts = [math.floor(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
            counts[i] += 1
        return counts

    def epoch_order(self) -> list[int]:
        """Every replica's samples of the epoch, in the order they are read."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        drawn: list[int] = []
        for source, count in enumerate(self.counts()):
            size, offset = self.dataset.sizes[source], self.dataset.offsets[source]
            while count > 0:
                take = torch.randperm(size, generator=generator)[:count] + offset
                drawn.extend(take.tolist())
                count -= len(take)
        return [drawn[i] for i in torch.randperm(len(drawn), generator=generator).tolist()]

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        per_replica = math.ceil(len(order) / self.replicas)
        order += order[: per_replica * self.replicas - len(order)]
        return iter(order[self.replica::self.replicas])

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.replicas)


def epoch_sampler(dataset: TransformedDataset, seed: int, replica: int,
                  replicas: int) -> MixtureSampler | DistributedSampler[Any]:
    """The order in which data replica ``replica`` of ``replicas`` reads an epoch (``set_epoch`` chooses which):
    ``MixtureSampler``'s for a mixture, DistributedSampler's shuffle otherwise."""
    if isinstance(dataset.base, MixedDataset):
        return MixtureSampler(dataset.base, seed, replica, replicas)
    return DistributedSampler(dataset, num_replicas=replicas, rank=replica, shuffle=True, seed=seed)


def batches_of(sampler: Sampler[int], batch_size: int, epoch: int) -> list[list[int]]:
    """The epoch's batches of ``sampler``, as lists of sample indices."""
    cast_sampler: Any = sampler
    cast_sampler.set_epoch(epoch)
    order = list(iter(sampler))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def source_shares(dataset: TransformedDataset, seed: int, epoch: int) -> dict[str, Any] | None:
    """How many samples of each source the epoch draws, and their shares (None: not a mixture)."""
    if not isinstance(dataset.base, MixedDataset):
        return None
    mixture = dataset.base
    sampler = MixtureSampler(mixture, seed)
    sampler.set_epoch(epoch)
    counts = [0] * len(mixture.sources)
    for index in sampler.epoch_order():
        counts[mixture.source_of(index)] += 1
    total = sum(counts)
    return {"samples": dict(zip(mixture.names, counts, strict=True)),
            "shares": {name: round(count / total, 4) for name, count in zip(mixture.names, counts, strict=True)}}


def _checked(dataset: Any, split: str, what: str) -> Any:
    if dataset is None:
        return None
    for attribute in ("classes", "modalities", "collate_fn"):
        if not hasattr(dataset, attribute):
            raise PluginError(f"the {split} data set {type(dataset).__name__} has no '{attribute}' attribute")
    if len(dataset) == 0:
        raise DataError(f"the {split} split of {what or type(dataset).__name__} is empty")
    return dataset


def _mixture(plugins: Plugins, config: PlaitConfig) -> MixedDataset:
    sources = []
    for i, spec in enumerate(config.data.sources or []):
        schema = plugins.call_one(spec.plugin, hookspecs.plait_config_schema)
        source_config = with_plugin_options(config, spec.plugin, spec.options, schema, f"data.sources.{i}")
        dataset = plugins.call_one(spec.plugin, hookspecs.plait_build_dataset, config=source_config, split="train")
        if dataset is None:
            raise DataError(f"{config.source}: data.sources.{i} ({spec.name}): the plugin gave no training set")
        sources.append(_checked(dataset, "train", f"data.sources.{i} ({spec.name})"))
    return MixedDataset(sources, [s.name for s in config.data.sources or []],
                        [s.weight for s in config.data.sources or []])


def build_dataset(plugins: Plugins, config: PlaitConfig, split: str) -> TransformedDataset | None:
    """The ``split`` data set with its transforms, or None when no plugin has that split; the training split
    is the mixture of ``data.sources`` when there are sources."""
    if split == "train" and config.data.sources:
        dataset: Any = _mixture(plugins, config)
    else:
        dataset = _checked(plugins.first(hookspecs.plait_build_dataset, config=config, split=split), split, "")
    if dataset is None:
        if split == "train":
            raise PluginError("no plugin provides a data set; add one (spoken_digits, manifest) to plugins:")
        return None
    transforms = [t for result in plugins.call_each(hookspecs.plait_sample_transforms, config=config,
                                                    split=split).values() for t in (result or [])]
    return TransformedDataset(dataset, transforms, config.run.seed, config.data.views)


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


class TrainBatches(Protocol):
    """The training batches of one worker: ``len`` is its batches per epoch, ``epoch(e, skip)`` the batches of
    epoch ``e`` after the first ``skip`` (a resume), each a collated batch with ``sample_index``."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, skip: int) -> Iterable[dict[str, Any]]: ...


@dataclass
class LoaderBatches:
    """``TrainBatches`` from a DataLoader: each worker decodes its own samples. The loader's sampler
    (whichever the runner chose) is wrapped in ``EpochKeys``, so that samples are read by epoch."""

    loader: DataLoader[dict[str, Any]]
    seed: int

    def __post_init__(self) -> None:
        loader = self.loader
        if not isinstance(loader.sampler, EpochKeys):
            self.loader = DataLoader(
                loader.dataset, batch_size=loader.batch_size, sampler=EpochKeys(loader.sampler),
                collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                persistent_workers=loader.num_workers > 0)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, skip: int) -> Iterable[dict[str, Any]]:
        return epoch_loader(self.loader, epoch, self.seed, skip)


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
