"""Augmented views: a training sample's transforms draw from a seed of the run, the sample and the view, so the
view is the same wherever and whenever it is decoded (DataLoader workers or not, a resume, a teacher's cache)."""
import pytest
import torch
import yaml

from plait.core.data import TRANSFORM_SEED, EpochKeys, LoaderBatches, build_dataset, make_loader, view_seed
from plait.core.runs import load
from plait.testing import TINY_PLUGINS, write_config

pytestmark = pytest.mark.timeout(300)


def training_set(tmp_path, views=0, seed=0):
    path = write_config(tmp_path, dict(TINY_PLUGINS), seed=seed)
    raw = yaml.safe_load(path.read_text())
    raw["data"] = {"views": views}
    path.write_text(yaml.safe_dump(raw))
    config, plugins = load(path)
    return build_dataset(plugins, config, "train")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def test_a_view_depends_on_the_run_seed_the_sample_and_the_epochs_view_only(tmp_path):
    dataset = training_set(tmp_path, views=2)
    audio = next(i for i in range(len(dataset)) if dataset.base[i].get("audio") is not None)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = dataset[(audio, 0)]
    assert torch.equal(torch.get_rng_state(), before)  # the run's own random stream is untouched
    assert same(first, dataset[(audio, 0)]) and same(first, dataset[(audio, 2)])  # views: 2, so epoch 2 is view 0
    assert not torch.equal(first["audio"], dataset[(audio, 1)]["audio"])  # augment on: view 1 is another draw
    assert first[TRANSFORM_SEED] == view_seed(0, audio, 0) == dataset[(audio, 4)][TRANSFORM_SEED]
    fresh = training_set(tmp_path, views=0)
    assert not torch.equal(fresh[(audio, 0)]["audio"], fresh[(audio, 2)]["audio"])  # views 0: a new view every epoch
    other_seed = training_set(tmp_path, views=2, seed=1)
    assert not torch.equal(other_seed[(audio, 0)]["audio"], first["audio"])


def by_sample(batches) -> dict:
    """(epoch, sample index) -> (transform seed, waveform, image, text) of each sample read."""
    found = {}
    for epoch, batch in batches:
        for row, index in enumerate(batch["sample_index"].tolist()):
            length = int(batch["inputs"]["audio"]["lengths"][row])  # rows are padded to their batch's longest
            found[(epoch, index)] = (int(batch[TRANSFORM_SEED][row]), batch["inputs"]["audio"]["audio"][row, :length],
                                     batch["inputs"]["image"]["image"][row], batch["inputs"]["text"]["text"][row])
    return found


def test_dataloader_workers_decode_the_same_views_as_the_main_process(tmp_path):
    dataset = training_set(tmp_path)
    read = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as DataLoader workers run: the same draws then give the same bits (resampling, FFTs)
    try:
        for workers in (0, 2):
            loader = LoaderBatches(make_loader(dataset, 32, True, 0, workers), seed=0)
            assert isinstance(loader.loader.sampler, EpochKeys)
            read[workers] = by_sample((epoch, b) for epoch in (0, 1) for b in loader.epoch(epoch, skip=0))
        # a resumed epoch (two batches done) reads the very views the run it continues read
        resumed = by_sample((1, b) for b in LoaderBatches(make_loader(dataset, 32, True, 0, 0), seed=0).epoch(1, 2))
    finally:
        torch.set_num_threads(threads)
    assert read[0].keys() == read[2].keys() and len(read[0]) == 2 * len(dataset)
    for key, (seed, wave, image, text) in read[0].items():
        other = read[2][key]
        assert seed == other[0] == view_seed(0, key[1], key[0])
        assert torch.equal(wave, other[1]) and torch.equal(image, other[2]) and text == other[3], key
    assert len(resumed) == len(dataset) - 2 * 32
    for key, (seed, wave, image, text) in resumed.items():
        first = read[0][key]
        assert seed == first[0] and torch.equal(wave, first[1]) and torch.equal(image, first[2]) and text == first[3]
