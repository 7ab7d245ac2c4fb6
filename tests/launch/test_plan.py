"""`plait plan`: a config's per-worker memory, from a model built on the meta device where it can be."""
from __future__ import annotations

import copy

import pytest

from plait.core.errors import ConfigError
from plait.core.runs import load
from plait.launch.cli import main
from plait.launch.plan import parse_size, plan
from plait.testing import TINY_PLUGINS, write_config


@pytest.mark.parametrize("text, size", [("24GiB", 24 * 2**30), ("80 GB", 80 * 10**9), ("512m", 512 * 2**20),
                                         ("1.5TiB", int(1.5 * 2**40)), ("4096", 4096)])
def test_sizes_are_read_in_their_units(text, size):
    assert parse_size(text) == size


def test_a_device_memory_that_is_not_a_size_is_one_line(tmp_path, capsys):
    path = write_config(tmp_path, copy.deepcopy(TINY_PLUGINS))
    assert main(["plan", str(path), "--device-memory", "lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "plait: error: --device-memory: 'lots' is not a size (give one such as 24GiB, 80GB or 512MiB)"
    with pytest.raises(ConfigError):
        parse_size("12 parsecs")


def _plan(tmp_path, name, *overrides, memory=None):
    path = write_config(tmp_path, copy.deepcopy(TINY_PLUGINS), name=name, batch_size=16)
    return plan(*load(str(path), list(overrides)), memory)


def test_fsdp_holds_a_share_of_the_state_and_checkpointing_fewer_activations(tmp_path):
    ddp = _plan(tmp_path, "ddp", "scaling.num_workers=2")
    fsdp = _plan(tmp_path, "fsdp", "scaling.num_workers=2", "scaling.strategy=fsdp")
    checkpointed = _plan(tmp_path, "ac", "run.activation_checkpointing=full")
    state = ("parameters", "gradients", "optimizer")
    for key in state:
        assert fsdp["per_worker_bytes"][key] == ddp["per_worker_bytes"][key] // 2
    assert ddp["per_worker_bytes"]["optimizer"] == 2 * ddp["per_worker_bytes"]["gradients"]  # AdamW's moments
    assert fsdp["units"][:2] == ["encoders.text.model.encoder.layer.0", "encoders.image.model.layer1"]
    assert ddp["units"] == [] and ddp["per_worker_bytes"]["gathered_unit"] == 0
    assert 0 < checkpointed["per_worker_bytes"]["activations"] < ddp["per_worker_bytes"]["activations"]
    assert _plan(tmp_path, "small", memory=2**20)["fits"] is False and ddp["fits"] is True


def test_activations_include_the_loss_and_the_backward(tmp_path):
    # a language model over MiniLM's 30,522 pieces: its logits, the loss's log-softmax and their
    # gradients are each batch x length x vocabulary floats, and most of its activations
    lm = {"tokenizer": "wordpiece", "seq_len": 16, "dim": 32, "layers": 1, "heads": 2, "ffn": 64, "max_articles": 40}
    path = write_config(tmp_path, {"wiki_lm": lm}, name="lm", batch_size=4)
    result = plan(*load(str(path), []))
    logits = 4 * 16 * 30522 * 4
    assert 3 * logits < result["per_worker_bytes"]["activations"] < 6 * logits
    assert result["built_on"] == "meta" and result["blocks"] == 1


def test_the_large_example_is_bert_base_sized_and_sharded_per_block():
    from pathlib import Path

    source = Path(__file__).parents[2] / "examples" / "large" / "large.yaml"
    result = plan(*load(str(source), ["plugins.wiki_lm.max_articles=40"]))
    assert 100e6 < result["parameters"] < 120e6 and result["workers"] == 2 and result["strategy"] == "fsdp"
    assert result["units"] == [f"blocks.layers.{i}" for i in range(12)]
    sizes = result["per_worker_bytes"]
    assert sizes["parameters"] == result["parameters"] * 4 // 2  # fp32, half on each worker
    whole_model = _plan_of(source, "run.activation_checkpointing=none")
    assert sizes["activations"] < whole_model["per_worker_bytes"]["activations"] / 2  # checkpointed blocks


def _plan_of(source, *overrides):
    return plan(*load(str(source), ["plugins.wiki_lm.max_articles=40", *overrides]))


def test_a_tensor_parallel_plan_says_what_is_split_and_holds_less(tmp_path, capsys):
    whole = _plan(tmp_path, "dp", "scaling.num_workers=2")
    split = _plan(tmp_path, "tp", "scaling.num_workers=2", "scaling.tensor_parallel=2")
    layout = split["tensor_parallel"]
    assert layout["size"] == 2 and split["mesh"] == {"data_parallel": 1, "tensor_parallel": 2, "expert_parallel": 1}
    assert set(layout["split"]) == {"encoders.text", "fusion"}
    assert layout["split"]["fusion"]["mixer.layers.0.self_attn"] == "HeadParallel"
    assert layout["split"]["encoders.text"]["model.encoder.layer.0.attention.self.query"] == "ColwiseParallel"
    assert {"encoders.image", "encoders.audio", "head"} <= set(layout["whole"])
    held, all_of_it = split["per_worker_bytes"]["parameters"], whole["per_worker_bytes"]["parameters"]
    assert held < all_of_it  # the text encoder (its vocabulary too) and the fusion layers are halved
    from plait.launch.plan import print_plan

    print_plan("tiny.yaml", split)
    out = capsys.readouterr().out
    assert "tensor parallel 2: fusion:" in out and "HeadParallel" in out
    assert "whole on every worker: " in out and "encoders.image" in out
