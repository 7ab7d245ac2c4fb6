"""The loop's helpers, one at a time, in one process: samplers, the epoch's loader, the LR
schedule, the training row, resume's metric rows, atomic files and the run stash."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from plait.core import hookspecs
from plait.core.data import ShardSampler, SkipSampler, epoch_loader, make_loader, move, only_modalities
from plait.core.distributed import unwrap
from plait.core.files import replaced_atomically, write_json_atomic
from plait.core.resume import forget_rows_after
from plait.core.stash import Stash, StashKey
from plait.core.step import MicroBatch, lr_factor, train_row


@pytest.mark.parametrize("length, world", [(10, 1), (10, 3), (2, 4), (0, 2)])
def test_shard_samplers_partition_the_split_exactly(length, world):
    shards = [list(ShardSampler(length, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(ShardSampler(length, rank, world)) for rank in range(world)] == [len(s) for s in shards]


def test_skip_sampler_passes_over_what_was_trained_on():
    assert list(SkipSampler(range(7), 3)) == [3, 4, 5, 6] and len(SkipSampler(range(7), 3)) == 4
    assert list(SkipSampler(range(2), 5)) == [] and len(SkipSampler(range(2), 5)) == 0


class _Numbers(torch.utils.data.Dataset):
    classes, modalities = ("x",), ("x",)

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> int:
        return index

    @staticmethod
    def collate_fn(items: list[int]) -> list[int]:
        return items


def test_an_epochs_shuffle_depends_on_the_epoch_only_and_a_resume_skips_its_batches():
    loader = make_loader(_Numbers(), batch_size=3, shuffle=True, seed=7, workers=0)
    first = list(epoch_loader(loader, 2, 7, 0))
    epoch_loader(loader, 5, 7, 0)  # another epoch in between changes nothing
    again = list(epoch_loader(loader, 2, 7, 0))
    assert first == again and sorted(i for b in first for i in b) == list(range(10))
    assert list(epoch_loader(loader, 3, 7, 0)) != first
    assert list(epoch_loader(loader, 2, 7, 2)) == first[2:]  # the same batches, after two


def test_lr_warms_up_linearly_then_follows_a_cosine_to_zero():
    assert [lr_factor(s, 4, 20, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, "cosine") == 1.0 and lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0)
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(15, 4, 20, "constant") == 1.0


def test_a_training_row_averages_each_term_over_the_batches_that_had_it():
    scheduler = SimpleNamespace(get_last_lr=lambda: [0.01])
    answers = {hookspecs.plait_train_metrics: {"p": {"extra": 3}}, hookspecs.plait_count_tokens: {"p": 12, "q": None}}
    plugins = SimpleNamespace(call_each=lambda hook, **kwargs: answers[hook])
    state = SimpleNamespace(plugins=plugins, scheduler=scheduler, world_size=1, tensor_parallel=1,
                            device=torch.device("cpu"))
    micro = [MicroBatch(4, torch.tensor(2.0), {"ce": torch.tensor(1.0), "pair": torch.tensor(0.5)}),
             MicroBatch(4, torch.tensor(4.0), {"ce": torch.tensor(3.0)})]  # no pair in this batch
    row = train_row(state, micro, window_samples=8, window_s=2.0)
    peaks = row.pop("peak_memory_mb")
    assert row == {"loss": 3.0, "ce": 2.0, "pair": 0.5, "extra": 3.0, "lr": 0.01, "samples_per_s": 4.0,
                   "tokens_per_s": 6.0}
    assert len(peaks) == 1 and peaks[0]["rss"] > 0  # one worker's peak resident set, in MB


def test_a_resume_forgets_the_rows_logged_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "split": "train"}) + "\n" for s in (1, 2, 3, 4)))
    forget_rows_after(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    forget_rows_after(tmp_path / "none.jsonl", 2)  # no file yet: nothing to do
    assert not (tmp_path / "none.jsonl").exists()


def test_an_atomic_write_leaves_the_old_file_or_the_new_one_never_half(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), replaced_atomically(target) as tmp:
        tmp.write_text('{"a": ')
        raise RuntimeError("killed while writing")
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    folder = tmp_path / "index"
    for marker in ("first", "second"):  # a folder another writer completed first is kept
        with replaced_atomically(folder) as tmp:
            tmp.mkdir()
            (tmp / marker).write_text("")
    assert [p.name for p in folder.iterdir()] == ["first"] and len(list(tmp_path.iterdir())) == 2


def test_the_stash_keeps_one_runs_objects_by_typed_key():
    teacher, average = StashKey[str](), StashKey[list[int]]()
    first, second = Stash(), Stash()
    first[teacher] = "run-a"
    assert teacher in first and teacher not in second and second.get(teacher, "none") == "none"
    assert first.setdefault(average, [1]) == [1] and first.setdefault(average, [2]) == [1]
    with pytest.raises(KeyError):
        second[average]


def test_batches_move_whole_and_hide_modalities():
    batch = {"label": torch.tensor([1, 2]), "present": {"text": torch.tensor([True, True]),
                                                       "audio": torch.tensor([True, False])}, "ids": ["a", "b"]}
    moved = move(batch, torch.device("cpu"))
    assert moved["ids"] == ["a", "b"] and torch.equal(moved["label"], batch["label"])
    audio_only = only_modalities(batch, {"audio"})
    assert not audio_only["present"]["text"].any() and audio_only["present"]["audio"].tolist() == [True, False]
    assert batch["present"]["text"].all()  # the original batch is left as it was


def test_unwrap_finds_the_model_inside_ddp_and_leaves_others_alone():
    inner = torch.nn.Linear(2, 2)
    assert unwrap(SimpleNamespace(module=inner)) is inner  # what DDP looks like from outside
    assert unwrap(inner) is inner
