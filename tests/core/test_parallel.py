"""The blocks modules declare, activation checkpointing over them, and FSDP units by name (one process;
tests/e2e/test_fsdp.py shards across two workers)."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from plait.core import parallel
from plait.core.config import FsdpSettings
from plait.core.errors import ConfigError, PluginError
from plait.core.loop import fit
from plait.core.runs import load
from plait.plugins.audio_encoder import AudioEncoder, AudioEncoderOptions
from plait.plugins.fusion import Fusion, FusionOptions
from plait.plugins.image_encoder import ImageEncoder, ImageEncoderOptions
from plait.plugins.text_encoder import TextEncoder, TextEncoderOptions
from plait.plugins.wiki_lm import CausalLM, WikiLMOptions
from plait.testing import TINY_PLUGINS, train_steps, write_config

TEXTS = ["the cat sat on the mat", "a dog barked twice", "seven", "nine and four"]


def _text_model(layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"text": TextEncoder(TextEncoderOptions(hidden=32, layers=layers, heads=2,
                                                                        dropout=0.1))})
    model.train()  # dropout on: the recomputation must draw the same masks
    return model


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model.zero_grad()
    model["text"]({"text": TEXTS}).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_modules_declare_their_blocks():
    model = torch.nn.ModuleDict({"text": TextEncoder(TextEncoderOptions(hidden=32, layers=3, heads=2)),
                                 "fusion": Fusion(FusionOptions(dim=32, heads=2, layers=2), {"text": 32})})
    names = [name for name, _ in parallel.blocks(model)]
    assert names == [*(f"text.model.encoder.layer.{i}" for i in range(3)), "fusion.mixer.layers.0",
                     "fusion.mixer.layers.1"]


@pytest.mark.parametrize("module, expected", [
    (lambda: AudioEncoder(AudioEncoderOptions(channels=[8, 16], dim=32)), ["cnn.0", "cnn.1"]),
    (lambda: ImageEncoder(ImageEncoderOptions(**TINY_PLUGINS["image_encoder"])),
     [f"model.layer{i}" for i in (1, 2, 3, 4)]),
    (lambda: CausalLM(WikiLMOptions(dim=32, heads=2, ffn=64, layers=2, seq_len=16)),
     ["blocks.layers.0", "blocks.layers.1"]),
])
def test_every_built_in_encoder_declares_its_blocks(module, expected):
    assert [name for name, _ in parallel.blocks(module())] == expected


def test_audio_weights_saved_before_the_cnn_had_blocks_still_load():
    saved = AudioEncoder(AudioEncoderOptions(channels=[8, 16], dim=32)).state_dict()
    flat = {re.sub(r"^cnn\.(\d)\.(\d)\.", lambda m: f"cnn.{int(m[1]) * 4 + int(m[2])}.", k): v
            for k, v in saved.items()}
    assert "cnn.5.weight" in flat  # the second block's batch norm, as it was named
    model = AudioEncoder(AudioEncoderOptions(channels=[8, 16], dim=32))
    model.load_state_dict(flat)
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


@pytest.mark.parametrize("mode, every, recomputed", [("full", 2, [0, 1, 2]), ("selective", 2, [1]),
                                                      ("selective", 1, [0, 1, 2])])
def test_activation_checkpointing_gives_bit_identical_gradients(mode, every, recomputed):
    plain = _gradients(_text_model())
    model = _text_model()
    names = parallel.checkpoint_activations(model, mode, every)
    assert names == [f"text.model.encoder.layer.{i}" for i in recomputed]
    checkpointed = _gradients(model)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)
    assert list(model.state_dict()) == list(_text_model().state_dict())  # checkpoints keep their names


def test_a_copy_of_a_checkpointed_model_recomputes_its_own_blocks():
    model = _text_model(layers=1)
    parallel.checkpoint_activations(model, "full")
    twin = copy.deepcopy(model)  # as EMA and distillation copy a model
    block = twin["text"].model.encoder.layer[0]
    assert block.forward.__self__ is block
    assert all(torch.equal(a, b) for a, b in zip(_gradients(model).values(), _gradients(twin).values(), strict=True))


def test_activation_checkpointing_without_declared_blocks_is_one_line():
    with pytest.raises(ConfigError, match="no module of the model declares its blocks"):
        parallel.checkpoint_activations(torch.nn.Sequential(torch.nn.Linear(2, 2)), "full")


def test_a_block_that_is_not_a_submodule_is_the_plugins_error():
    class Wrong(torch.nn.Module):
        def plait_blocks(self):
            return [torch.nn.Linear(2, 2)]

    with pytest.raises(PluginError, match=r"Wrong.plait_blocks\(\) returned a Linear that is not one of its"):
        parallel.blocks(Wrong())


def test_an_fsdp_unit_pattern_that_matches_nothing_is_one_line():
    model = _text_model(layers=1)
    with pytest.raises(ConfigError, match=r"scaling.fsdp.units: 'text.encoder.\*' matches no module"):
        parallel.shard(model, FsdpSettings(units=["text.encoder.*"]))


def test_a_run_with_activation_checkpointing_trains_the_same_weights(tmp_path):
    plugins = {"text_encoder": {**TINY_PLUGINS["text_encoder"], "layers": 2},
               "fusion": {**TINY_PLUGINS["fusion"], "layers": 2}}
    (tmp_path / "plain").mkdir()
    (tmp_path / "ac").mkdir()
    plain = train_steps(tmp_path / "plain", plugins, steps=3)
    checkpointed = train_steps(tmp_path / "ac", plugins, steps=3, activation_checkpointing="full")
    a, b = plain.model.state_dict(), checkpointed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    peaks = checkpointed.metrics["run"]["peak_memory_mb"]  # one per worker, in metrics.json as well
    assert len(peaks) == 1 and peaks[0]["rss"] > 100


def test_compile_on_the_cpu_without_a_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match=r"run.compile: torch.compile on the CPU needs a C\+\+ compiler"):
        parallel.compile_blocks(_text_model(layers=1), torch.device("cpu"))


def test_compiling_blocks_keeps_their_names():
    model = _text_model(layers=2)
    names = list(model.state_dict())
    assert parallel.compile_blocks(model, torch.device("cpu")) == ["text.model.encoder.layer.0",
                                                                   "text.model.encoder.layer.1"]
    assert list(model.state_dict()) == names


def test_compiled_blocks_cannot_also_recompute_batch_norms():
    model = torch.nn.ModuleDict({"image": ImageEncoder(ImageEncoderOptions(**TINY_PLUGINS["image_encoder"]))})
    parallel.checkpoint_activations(model, "full")
    with pytest.raises(ConfigError, match=r"run.compile with run.activation_checkpointing: block 'image.model.layer1' "
                                          "has batch norms"):
        parallel.compile_blocks(model, torch.device("cpu"))


@pytest.mark.slow
def test_the_first_compiled_step_is_announced_and_timed(tmp_path, capsys):
    lm = {"seq_len": 16, "dim": 32, "layers": 2, "heads": 2, "ffn": 64, "max_articles": 40}
    path = write_config(tmp_path, {"wiki_lm": lm, "progress": {}}, max_steps=2, batch_size=4, compile=True)
    fit(*load(path))
    err = " ".join(capsys.readouterr().err.split())  # as rich wraps it at the terminal's width
    assert parallel.COMPILING in err
    took = re.search(r"run.compile: the first step took (\d+\.\d) s, compilation included", err)
    assert took and float(took[1]) > 0.5, err[-2000:]
    assert err.index(parallel.COMPILING) < took.start()
