"""End to end: real plugins, real data, a few optimizer steps."""
import json

import numpy as np
import pytest
import soundfile
import torch

from plait.core.data import build_dataset, make_loader, move
from plait.core.loop import fit
from plait.core.runs import load, load_run
from plait.launch.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny spoken_digits run shared by the tests of this module."""
    import os

    import yaml
    from conftest import TINY_PLUGINS

    root = tmp_path_factory.mktemp("e2e")
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump({
        "run": {"name": "tiny", "runs_dir": str(root / "runs"), "epochs": 8, "batch_size": 32, "lr": 5e-3,
                "log_every": 1, "warmup_steps": 2},
        "plugins": {**TINY_PLUGINS, "progress": {}, "curves": {}},
    }, sort_keys=False))
    config, plugins = load(str(config_path), [])
    state = fit(config, plugins)
    assert os.environ["PLAIT_CACHE"]
    return config_path, config, plugins, state


def test_loss_falls(trained):
    *_, state = trained
    rows = [json.loads(line) for line in (state.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["ce"] for r in rows if r["split"] == "train"]
    assert len(losses) == state.step == 48
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:6])


def test_run_folder_holds_config_metrics_checkpoint_and_curves(trained):
    *_, state = trained
    folder = state.run_dir
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "run.json", "curves.png"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["test"]) == {"fused", "text", "image", "audio"}
    assert all(0 <= metrics["test"][k]["accuracy"] <= 1 for k in metrics["test"])
    assert metrics["world_size"] == 1 and metrics["samples_per_s"] > 0
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-00000042", "step-00000048"]


def test_checkpoint_reloads_to_the_same_predictions(trained):
    _, config, plugins, state = trained
    _, _, reloaded = load_run(state.run_dir)
    test_set = build_dataset(plugins, config, "test")
    batch = move(next(iter(make_loader(test_set, 64, False, 0, 0))), state.device)
    state.model.eval()
    reloaded.model.eval()
    with torch.no_grad():
        expected = state.model(batch)["logits"]
        actual = reloaded.model(batch)["logits"]
    assert torch.allclose(expected, actual, atol=1e-5)
    assert torch.equal(expected.argmax(-1), actual.argmax(-1))


def test_eval_json_on_a_folder_of_wav_and_ogg_files(trained, tmp_path, capsys):
    from plait.modalities.speech import Utterance, speak
    from plait.plugins.spoken_digits import WORDS

    *_, state = trained
    rows = ["audio,label"]
    rate, waves = speak([Utterance(word, "en-US+m3") for word in WORDS["en"].split()])
    for digit, wave in enumerate(waves):
        suffix = "ogg" if digit % 2 else "wav"
        soundfile.write(tmp_path / f"{digit}.{suffix}", wave, rate)
        rows.append(f"{digit}.{suffix},{digit}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    code = main(["eval", str(state.run_dir), "--data", str(tmp_path / "manifest.csv"), "--modalities", "audio",
                 "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["samples"] == 10 and result["modalities"] == ["audio"] and 0 <= result["accuracy"] <= 1


def test_eval_on_the_run_test_split_matches_fit(trained, capsys):
    *_, state = trained
    assert main(["eval", str(state.run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(state.metrics["test"]["fused"]["accuracy"])
    assert main(["eval", str(state.run_dir), "--json", "--modalities", "image"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(state.metrics["test"]["image"]["accuracy"])


def test_rerunning_a_finished_run_resumes_instead_of_retraining(trained, capsys):
    config_path, *_ , state = trained
    assert main(["train", str(config_path)]) == 0
    rows = (state.run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(r)["split"] == "train" for r in rows) == 48


def test_train_on_a_manifest_of_own_files(tmp_path, write_config):
    rng = np.random.default_rng(0)
    rows = ["image,audio,text,label"]
    from PIL import Image

    for i in range(24):
        label = i % 2
        Image.fromarray((rng.random((8, 8)) * 255 * (label + 1) / 2).astype(np.uint8)).save(tmp_path / f"{i}.png")
        soundfile.write(tmp_path / f"{i}.wav", np.sin(np.arange(4000) * (0.05 + 0.2 * label)).astype(np.float32) * .3,
                        16000)
        rows.append(f"{i}.png,{i}.wav,{'cat' if label else 'dog'} {i},{'cat' if label else 'dog'}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    from conftest import TINY_PLUGINS

    plugins = {"manifest": {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "train.csv")},
               **{k: v for k, v in TINY_PLUGINS.items() if k not in ("spoken_digits",)}}
    config, loaded = load(str(write_config(plugins, name="own", epochs=3)), [])
    state = fit(config, loaded)
    assert state.classes == ["cat", "dog"] and state.step == 3
    assert state.metrics["test"]["fused"]["samples"] == 24


def test_a_third_party_plugin_by_module_path_adds_a_loss_term(tmp_path, write_config, monkeypatch):
    """The plugin of the README's 'Writing a plugin' section, loaded by its module path."""
    (tmp_path / "my_l2_plugin.py").write_text(
        "from plait.core.config import Options\n"
        "from plait.core.hookspecs import hookimpl\n\n"
        "class MyOptions(Options):\n    weight: float = 0.1\n\n"
        "@hookimpl\ndef plait_config_schema():\n    return MyOptions\n\n"
        "@hookimpl\ndef plait_loss_terms(state, batch, outputs):\n"
        "    weight = state.config.options(MyOptions).weight\n"
        "    return {'l2_fused': weight * outputs['fused'].pow(2).mean()}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from conftest import TINY_PLUGINS

    config, plugins = load(str(write_config({**TINY_PLUGINS, "my_l2_plugin": {"weight": 0.5}}, name="l2",
                                            max_steps=2)), [])
    state = fit(config, plugins)
    rows = [json.loads(line) for line in (state.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and all(r["l2_fused"] > 0 for r in train)
    assert all(abs(r["loss"] - sum(r[k] for k in ("ce", "contrastive", "l2_fused") if k in r)) < 1e-4 for r in train)


def test_bf16_autocast_and_gradient_accumulation_train_on_cpu(write_config):
    config, plugins = load(str(write_config(name="bf16", epochs=1, batch_size=16, precision="bf16",
                                            grad_accumulation=3, log_every=1)), [])
    state = fit(config, plugins)
    assert state.batches_per_epoch == 12 and state.steps_per_epoch == state.step == 4  # 12 batches / 3 per step
    rows = [json.loads(line) for line in (state.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows if r["split"] == "train")


def test_fp16_needs_a_gpu(write_config, capsys):
    code = main(["train", str(write_config(name="fp16", precision="fp16")), "scaling.num_workers=0"])
    assert code == 2 and "fp16 needs a GPU" in capsys.readouterr().err
