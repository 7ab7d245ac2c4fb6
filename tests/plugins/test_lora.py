"""The lora plugin (peft) on a pretrained text tower made here with ``save_pretrained``: what trains, what a
checkpoint holds, exact resume, a resume on another base refused, QLoRA's NF4 base, DoRA, LoRA under
distillation, and ``plait export --format hf`` reloaded with plain transformers."""
import copy
import shutil

import pytest
import torch
from conftest import bert_folder
from safetensors.torch import load_file
from test_pretrained import hf_text_embeddings

from plait.core.checkpoint import weights_digest
from plait.core.distributed import unwrap
from plait.core.errors import ConfigError
from plait.core.runs import load_run
from plait.launch.export import export_hf
from plait.testing import TINY_PLUGINS, train_steps

pytestmark = pytest.mark.timeout(300)
TEXTS = ["seven", "drei", "a longer sentence about nothing"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp("base") / "bert")


def plugins(base, **lora):
    return {"text_encoder": {"pretrained": str(base), "max_length": 16},
            "lora": {"rank": 4, "alpha": 8, **lora}}


def trained(tmp_path, name, base, steps=2, **run):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    return train_steps(folder, plugins(base, **run.pop("lora", {})), steps=steps, **run), folder / "runs" / "tiny"


def text_weights(state):
    return {k: v for k, v in unwrap(state.model).state_dict().items() if k.startswith("encoders.text.")}


def test_adapters_train_the_base_stays_and_checkpoints_hold_only_what_trained(tmp_path, base):
    state, run_dir = trained(tmp_path, "run", base, steps=3)
    model = unwrap(state.model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and name.startswith("encoders.text.")}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert any(p.requires_grad for p in model.head.parameters())  # the other parts train as they would
    text = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoders.text."))
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) < 0.02 * text
    base_now = {k.replace(".base_layer", ""): v for k, v in text_weights(state).items() if "lora_" not in k}
    built = {f"encoders.text.model.{k}": v for k, v in
             __import__("transformers").AutoModel.from_pretrained(base).state_dict().items() if "pooler" not in k}
    assert weights_digest(base_now) == weights_digest(built)  # the frozen base, bitwise the folder's
    saved = load_file(str(run_dir / "checkpoints" / "step-00000003" / "model.safetensors"))
    text_saved = {k for k in saved if k.startswith("encoders.text.")}
    assert text_saved == trainable  # the adapters only, of the text tower
    assert any(k.startswith("head.") for k in saved) and any(k.startswith("encoders.image.") for k in saved)


def test_a_stopped_lora_run_resumes_bitwise(tmp_path, base):
    schedule = {"schedule": "constant", "checkpoint_every": 2}
    whole, _ = trained(tmp_path, "whole", base, steps=4, **schedule)
    trained(tmp_path, "stopped", base, steps=2, **schedule)
    resumed, _ = trained(tmp_path, "stopped", base, steps=4, **schedule)
    assert resumed.step == 4
    assert weights_digest(unwrap(resumed.model).state_dict()) == weights_digest(unwrap(whole.model).state_dict())


def test_resuming_on_another_base_is_an_error(tmp_path, base):
    other = tmp_path / "other"
    shutil.copytree(base, other)
    trained(tmp_path, "run", other, steps=2, checkpoint_every=2)
    weights = load_file(str(other / "model.safetensors"))
    weights["encoder.layer.0.output.dense.bias"] += 0.01  # the folder's weights changed under the run
    from safetensors.torch import save_file

    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"plugins.lora: the checkpoint's adapters were trained on another base"):
        trained(tmp_path, "run", other, steps=4)


def test_export_merges_the_adapters_and_reloads_with_plain_transformers(tmp_path, base):
    _, run_dir = trained(tmp_path, "run", base, steps=3, lr=3e-2)
    out = export_hf(run_dir)
    encoder = load_run(run_dir)[2].model.encoders["text"]
    with torch.no_grad():
        ours = encoder({"text": TEXTS})
    exported = hf_text_embeddings(out / "text_encoder", TEXTS)
    torch.testing.assert_close(exported, ours, atol=1e-5, rtol=0)
    plain = hf_text_embeddings(base, TEXTS)
    assert (exported - plain).abs().max() > 1e-4  # the adapters trained, and their change is in the export
    assert {p.name for p in out.iterdir()} >= {"text_encoder", "image_encoder", "audio_encoder", "fusion.safetensors",
                                                "head.safetensors", "README.md"}
    card = (out / "README.md").read_text()
    assert "## Metrics" in card and "| fused |" in card and "lora:" in card


def test_qlora_trains_on_an_nf4_base_and_exports(tmp_path, base):
    state, run_dir = trained(tmp_path, "run", base, steps=2, lora={"quantize_base": "nf4"})
    layer = unwrap(state.model).encoders["text"].model.encoder.layer[0]
    assert type(layer.attention.self.query.base_layer.weight).__name__ == "NF4Tensor"
    assert type(layer.intermediate.dense.weight).__name__ == "NF4Tensor"
    assert torch.isfinite(torch.tensor(state.metrics["train"]["loss"]))
    out = export_hf(run_dir)
    assert hf_text_embeddings(out / "text_encoder", TEXTS).isfinite().all()


def test_dora_and_a_fusion_target(tmp_path, base):
    lora = {"dora": True, "targets": ["encoders.text.*.query", "fusion.project.*.0"]}
    state, _ = trained(tmp_path, "run", base, steps=2, lora=lora)
    names = {n for n, p in unwrap(state.model).named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in names) and any(n.startswith("fusion.project.") for n in names)
    assert not any(n.startswith("fusion.mixer.") for n in names)  # the fusion holds a target: its base is frozen


def test_a_pattern_that_matches_nothing_is_one_line(tmp_path, base):
    with pytest.raises(ConfigError, match=r"^plugins.lora.targets: 'encoders.text.\*.qeury' matches no linear"):
        trained(tmp_path, "run", base, lora={"targets": ["encoders.text.*.qeury"]})


def test_lora_student_under_distillation(tmp_path, base):
    _, teacher = trained(tmp_path, "teacher", base, steps=2)
    student = copy.deepcopy(TINY_PLUGINS)
    folder = tmp_path / "student"
    folder.mkdir()
    state = train_steps(folder, {**student, **plugins(base), "distill": {"teacher": str(teacher), "alpha": 0.5},
                                 "fusion": {**student["fusion"], "ce_weight": 0.5}}, steps=2)
    assert "kd" in state.metrics["train"]
    assert all(".lora_" in n for n, p in unwrap(state.model).named_parameters()
               if p.requires_grad and n.startswith("encoders.text."))
