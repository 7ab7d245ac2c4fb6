"""Quantization and ``plait compress``: plain-tensor state, predictions kept, reloads, QAT, the
distill -> quantize chain, bad input."""
import json
import logging

import pytest
import torch
import yaml
from conftest import TINY_PLUGINS
from safetensors.torch import load_file, save_file
from torch import nn

from plait.core.data import build_dataset, make_loader
from plait.core.errors import ConfigError, DataError
from plait.core.loop import fit
from plait.core.runs import load, load_run, prepare
from plait.launch.cli import main
from plait.launch.compress import compress_run
from plait.plugins.quantize import QuantizeOptions, _check_backend, engines_for, pick_engine, quantize, quantized_layers

#: fp32 and int8 must give the same class for at least this share of a fixed test batch
AGREEMENT = 0.9
#: Epochs for the model every compress test starts from. Two left it at chance (accuracy 0.09), with logits so near
#: ties that int8 rounding flipped a quarter of the predictions on one CI machine and none here; ten reach 0.83, so
#: agreement measures the quantizer and not the noise.
TRAINED_EPOCHS = 10


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)).eval()


class _DictModel(nn.Module):
    """Takes and returns dicts, as plait models do (for the quantizer's calibration and timing)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, batch: dict) -> dict:
        return {"logits": self.body(batch["x"])}


@pytest.mark.parametrize("backend", ["dynamic_int8", "static_int8", "weight_only_int8"])
def test_a_quantized_state_dict_is_plain_tensors_and_reloads_to_the_same_outputs(tmp_path, backend):
    x = torch.randn(16, 64)
    model = _DictModel(_mlp())
    engine = (engines_for(backend) or [""])[0]
    quantize(model, QuantizeOptions(backend=backend), engine, [{"x": x}])
    state = model.state_dict()
    assert all(type(t) is torch.Tensor and not t.is_quantized for t in state.values())
    assert quantized_layers(model) == ["body.0", "body.2"]
    assert {t.dtype for k, t in state.items() if k.endswith("#int") or "qdata" in k} == {torch.int8}
    save_file(state, str(tmp_path / "model.safetensors"))

    rebuilt = _DictModel(_mlp())
    for p in rebuilt.parameters():  # other weights, so only the file can make the outputs equal
        nn.init.normal_(p)
    quantize(rebuilt, QuantizeOptions(backend=backend), engine, None)
    rebuilt.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    with torch.inference_mode():
        assert torch.equal(model({"x": x})["logits"], rebuilt({"x": x})["logits"])


def test_bad_input_gets_a_clear_error_or_a_warning_that_says_what_was_done(caplog):
    convs_only = _DictModel(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    with pytest.raises(ConfigError, match="quantizes Linear layers and the model has none.*static_int8"):
        quantize(convs_only, QuantizeOptions(backend="dynamic_int8"), engines_for("dynamic_int8")[0], None)
    with pytest.raises(ConfigError, match="none outside skip"):
        quantize(_DictModel(_mlp()), QuantizeOptions(skip=["body"]), engines_for("dynamic_int8")[0], None)
    with pytest.raises(ConfigError, match="engine 'avx9' is not available.*available: \\["):
        pick_engine(_DictModel(_mlp()), QuantizeOptions(engine="avx9"), [{"x": torch.randn(2, 64)}])
    with pytest.raises(ConfigError, match="plugins.quantize.backend"):
        prepare({"plugins": {"quantize": {"backend": "int3"}}}, "compress.yaml")
    caplog.set_level(logging.WARNING, logger="plait.quantize")
    chosen = _check_backend(QuantizeOptions(backend="weight_only_int4"), torch.device("cpu"))
    if chosen.backend == "weight_only_int8":  # no int4 kernels here: said so, and int8 used instead
        assert "weight_only_int4 is not available on cpu" in caplog.text and "using weight_only_int8" in caplog.text
    else:
        assert chosen.backend == "weight_only_int4"
    assert "meant for GPU inference" in caplog.text  # weight-only on a CPU: saves memory, not time


def test_engine_auto_times_every_engine_and_keeps_the_fastest():
    batch = {"x": torch.randn(32, 64)}
    engine, timings = pick_engine(_DictModel(_mlp()), QuantizeOptions(), [batch])
    assert set(timings) == set(engines_for("dynamic_int8"))
    assert timings[engine] == min(timings.values())


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    from plait.testing import write_config

    folder = tmp_path_factory.mktemp("fp32")
    return fit(*load(str(write_config(folder, TINY_PLUGINS, name="fp32", epochs=TRAINED_EPOCHS)), [])).run_dir


def _spec(tmp_path, plugins: dict, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": name}, "plugins": plugins}))
    return str(path)


def _logits(run_dir):
    config, plugins, state = load_run(run_dir)
    batch = next(iter(make_loader(build_dataset(plugins, config, "test"), 64, False, 0, 0)))
    with torch.inference_mode():
        return state.model(batch)["logits"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dynamic_int8", "static_int8", "bf16"])
def test_compress_keeps_the_predictions_and_the_folder_reloads_to_the_same_outputs(trained_dir, tmp_path, backend):
    result = compress_run(trained_dir, _spec(tmp_path, {"quantize": {"backend": backend}}, f"tiny-{backend}"))
    out = trained_dir.parent / f"tiny-{backend}"
    assert result["run_dir"] == str(out)
    fp32, compressed = _logits(trained_dir), _logits(out)
    assert torch.equal(compressed, _logits(out))  # a second reload: the same outputs
    agreement = (fp32.argmax(-1) == compressed.argmax(-1)).float().mean().item()
    assert agreement >= AGREEMENT, agreement
    before, after = result["before"]["accuracy"]["fused"], result["after"]["accuracy"]["fused"]
    assert after["accuracy"] >= before["accuracy"] - 0.05, (before, after)
    if backend != "bf16":
        assert result["after"]["size_mib"] < result["before"]["size_mib"]
    saved = yaml.safe_load((out / "config.yaml").read_text())["plugins"]["quantize"]
    assert saved["converted"] and saved["backend"] == backend
    report = (out / "report.md").read_text()
    assert f"backend {backend}" in report and "| latency batch 32 (ms) |" in report
    for modality in ("fused", "text", "image", "audio"):
        before, after = result["before"]["accuracy"][modality], result["after"]["accuracy"][modality]
        assert f"| {modality} | {before['accuracy']:.4f} | {after['accuracy']:.4f} |" in report
    assert json.loads((out / "run.json").read_text())["compressed_from"] == str(trained_dir.resolve())
    with pytest.raises(ConfigError, match="exists already"):  # never overwritten
        compress_run(trained_dir, _spec(tmp_path, {"quantize": {"backend": backend}}, f"tiny-{backend}"))


@pytest.mark.slow
def test_qat_fine_tunes_with_fake_quantization_and_compress_converts_it(trained_dir, tmp_path, write_config):
    from torchao.quantization.qat import FakeQuantizedLinear

    plugins = {**TINY_PLUGINS, "quantize": {"qat": True}}
    state = fit(*load(str(write_config(plugins, name="qat", max_steps=2, lr=1e-12, init_from=str(trained_dir))), []))
    assert any(isinstance(m, FakeQuantizedLinear) for m in state.model.modules())
    # init_from: it started from the fp32 run's weights (a 1e-12 learning rate leaves them there)
    fp32 = load_run(trained_dir)[2].model
    assert set(state.model.state_dict()) == set(fp32.state_dict())  # no fake-quantization state: plain weights
    weights = dict(fp32.named_parameters())  # (BatchNorm's running statistics did move)
    assert all(torch.allclose(p, weights[k], atol=1e-6) for k, p in state.model.named_parameters())

    result = compress_run(state.run_dir)  # no compress.yaml: the run's own quantize block, converted
    assert any("trained with fake quantization" in note for note in result["notes"])
    out = state.run_dir.parent / "qat-compressed"
    _, _, reloaded = load_run(out)
    assert not any(isinstance(m, FakeQuantizedLinear) for m in reloaded.model.modules())
    assert quantized_layers(reloaded.model)


@pytest.mark.slow
def test_distill_then_quantize_runs_from_one_compress_yaml(trained_dir, tmp_path, capsys):
    student = {"text_encoder": {"hidden": 16, "layers": 1, "heads": 2}, "audio_encoder": {"channels": [4, 8],
                                                                                          "dim": 16}}
    spec = _spec(tmp_path, {"distill": {"student": student, "student_run": {"max_steps": 4}, "temperature": 2.0},
                            "quantize": {"backend": "dynamic_int8"}}, "tiny-small-int8")
    assert main(["compress", str(trained_dir), spec, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = trained_dir.parent / "tiny-small-int8"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert "distill" not in config["plugins"] and config["plugins"]["quantize"]["converted"]
    assert config["plugins"]["text_encoder"]["hidden"] == 16
    assert result["after"]["parameters"] < result["before"]["parameters"]
    assert (trained_dir.parent / "tiny-small-int8-student" / "report.md").is_file()  # the distillation's own
    assert any(note.startswith("distilled into a student") for note in result["notes"])
    _, _, reloaded = load_run(out)
    assert quantized_layers(reloaded.model) and reloaded.model.encoders["text"].model.config.hidden_size == 16


def test_a_malformed_quantized_file_is_one_clear_error_naming_the_weight():
    model = _DictModel(_mlp())
    engine = engines_for("dynamic_int8")[0]
    quantize(model, QuantizeOptions(), engine, None)
    state = model.state_dict()
    state["body.0._packed_params.dtype#dtype=torch.evil"] = state.pop("body.0._packed_params.dtype#dtype=torch.qint8")
    with pytest.raises(DataError, match="body.0._packed_params.dtype: the stored quantized weights are malformed"):
        model.load_state_dict(state)


def test_compress_of_a_folder_that_is_no_run_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"plait: error: {tmp_path / 'nowhere'}: no such run folder"
    assert main(["compress", str(tmp_path)]) == 2
    assert "not a plait run folder (no config.yaml)" in capsys.readouterr().err
