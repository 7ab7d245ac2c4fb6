"""Distillation: the loss by hand, a frozen teacher, cross-modal students, resume, bad input."""
import json
import math

import pytest
import torch
from conftest import TINY_PLUGINS
from safetensors.torch import load_file

from plait.core import checkpoint
from plait.core.errors import ConfigError
from plait.core.loop import fit
from plait.core.runs import load
from plait.modalities.text import minilm_folder
from plait.plugins.distill import TEACHER, RunTeacher, TeacherStore, embedding_loss, hidden_loss, kd_loss

STUDENT = {  # audio only: cross-modal from the fused teacher
    "spoken_digits": TINY_PLUGINS["spoken_digits"],
    "audio_encoder": {"channels": [4, 8], "dim": 16},
    "fusion": {"dim": 16, "heads": 2, "ce_weight": 0.5},
}


def test_kd_loss_is_the_hand_computed_value_and_scales_with_t_squared():
    student, teacher = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[2.0, 0.0, 1.0]])
    for temperature in (1.0, 2.0, 4.0):
        p = [math.exp(t / temperature) for t in teacher[0].tolist()]
        q = [math.exp(s / temperature) for s in student[0].tolist()]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        assert kd_loss(student, teacher, temperature, alpha=1.0).item() == pytest.approx(temperature**2 * kl, rel=1e-5)
        assert kd_loss(student, teacher, temperature, alpha=0.25).item() == pytest.approx(0.25 * temperature**2 * kl,
                                                                                          rel=1e-5)
    assert kd_loss(teacher, teacher, 3.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_hidden_loss_counts_real_tokens_only_and_embedding_loss_ignores_scale():
    student, teacher = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert hidden_loss(student, teacher, mask).item() == pytest.approx(1.0)
    padded = teacher.clone()
    padded[mask == 0] = 100.0  # what padding holds does not count
    assert hidden_loss(student, padded, mask).item() == pytest.approx(1.0)
    assert hidden_loss(student, padded).item() > 1.0  # without a mask it does
    assert hidden_loss(torch.full((2, 4), 3.0), torch.ones(2, 4)).item() == pytest.approx(4.0)
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert embedding_loss(a, 5 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_loss(a[:1], torch.tensor([[0.0, 2.0]])).item() == pytest.approx(1.0)
    assert embedding_loss(a[:1], -a[:1]).item() == pytest.approx(2.0)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from plait.testing import write_config

    folder = tmp_path_factory.mktemp("teacher")
    state = fit(*load(str(write_config(folder, TINY_PLUGINS, name="teacher", epochs=2)), []))
    return state.run_dir


@pytest.mark.slow
def test_a_fused_teacher_trains_an_audio_student_and_stays_frozen(write_config, teacher_dir):
    before = load_file(str(checkpoint.latest(teacher_dir / "checkpoints") / "model.safetensors"))
    state = fit(*load(str(write_config({**STUDENT, "distill": {"teacher": str(teacher_dir)}}, name="student",
                                       log_every=1)), []))
    teacher = state.plugins.stash[TEACHER].model
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    after = {k: v.cpu() for k, v in teacher.model.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # not a single weight moved
    assert set(state.modalities) == {"audio"} and set(teacher.model.encoders) == {"text", "image", "audio"}
    assert state.metrics["train"]["kd"] > 0
    report = (state.run_dir / "report.md").read_text()
    assert "| teacher |" in report and "| student (distilled) |" in report
    assert f"{state.metrics['test']['fused']['accuracy']:.4f}" in report


@pytest.mark.slow
def test_a_stopped_distillation_resumes_exactly_and_refuses_another_teacher(write_config, teacher_dir, tmp_path):
    # with projections (hidden states, embedding): their weights and optimizer state resume too
    plugins = {**STUDENT, "distill": {"teacher": str(teacher_dir), "embedding": 1.0, "embedding_modalities": ["audio"],
                                      "hidden": [{"student": "encoders.audio.cnn", "teacher": "encoders.audio.cnn"}]}}
    settings = {"epochs": 2, "checkpoint_every": 4}
    whole = fit(*load(str(write_config(plugins, name="kd-whole", **settings)), []))
    assert whole.metrics["train"]["hidden"] > 0 and whole.metrics["train"]["embedding"] > 0  # both were matched
    with pytest.raises(RuntimeError, match="stopped at step 5"):
        fit(*load(str(write_config({**plugins, "stop_at": {"step": 5}}, name="kd-split", **settings)), []))
    resumed = fit(*load(str(write_config(plugins, name="kd-split", **settings)), []))
    a = load_file(str(checkpoint.latest(whole.run_dir / "checkpoints") / "model.safetensors"))
    b = load_file(str(checkpoint.latest(resumed.run_dir / "checkpoints") / "model.safetensors"))
    assert {"distill.hidden0.linear.weight", "distill.embedding_audio.linear.weight"} <= set(a)
    assert all(torch.equal(a[k], b[k]) for k in a)

    other = tmp_path / "other-teacher"
    import shutil

    shutil.copytree(teacher_dir, other)
    newest = checkpoint.latest(other / "checkpoints") / "model.safetensors"
    weights = load_file(str(newest))
    from safetensors.torch import save_file

    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, str(newest))
    with pytest.raises(ConfigError, match="distilled from .* but the teacher is now"):
        changed = {**plugins, "distill": {**plugins["distill"], "teacher": str(other)}}
        fit(*load(str(write_config(changed, name="kd-split", epochs=3)), []))


def test_a_teacher_that_does_not_exist_is_named(write_config, tmp_path):
    config, plugins = load(str(write_config({**STUDENT, "distill": {"teacher": str(tmp_path / "nope")}})), [])
    with pytest.raises(ConfigError, match=r"plugins.distill.teacher: .*nope does not exist"):
        fit(config, plugins)


@pytest.mark.slow
def test_a_teacher_with_other_classes_is_refused(write_config, teacher_dir, tmp_path):
    rows = [f'{{"text": "word {i}", "label": "{"abc"[i % 3]}"}}' for i in range(12)]
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    manifest = {"train": str(tmp_path / "data.jsonl"), "test": str(tmp_path / "data.jsonl")}
    student = {"manifest": manifest, "text_encoder": {"hidden": 16, "layers": 1, "heads": 2},
               "fusion": {"dim": 16, "heads": 2}, "distill": {"teacher": str(teacher_dir)}}
    with pytest.raises(ConfigError, match=r"teacher's classes \['0', '1'.* are not the student's \['a', 'b', 'c'\]"):
        fit(*load(str(write_config(student, name="abc")), []))


TEXT_STUDENT = {  # text only, WordPiece like the teacher, narrower (16 wide) than it (32)
    "spoken_digits": TINY_PLUGINS["spoken_digits"],
    "text_encoder": {"hidden": 16, "layers": 1, "heads": 2},
    "fusion": {"dim": 16, "heads": 2, "ce_weight": 0.5},
}
LAYER = "encoders.text.model.encoder.layer.0"


@pytest.mark.slow
def test_hidden_states_and_embeddings_are_learned_through_projections(write_config, teacher_dir):
    distill = {"teacher": str(teacher_dir), "alpha": 0.5, "hidden": [{"student": LAYER, "teacher": LAYER}],
               "embedding": 1.0, "embedding_modalities": ["text"]}
    path = write_config({**TEXT_STUDENT, "distill": distill}, name="tinybert", epochs=2)
    config, plugins = load(str(path), [])
    state = fit(config, plugins)
    rows = [json.loads(line) for line in (state.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    assert all(r["kd"] > 0 and r["hidden"] > 0 and r["embedding"] > 0 for r in rows)
    assert rows[-1]["hidden"] < rows[0]["hidden"] and rows[-1]["embedding"] < rows[0]["embedding"]
    weights = load_file(str(checkpoint.latest(state.run_dir / "checkpoints") / "model.safetensors"))
    assert weights["distill.hidden0.linear.weight"].shape == (32, 16)  # student width -> teacher width
    assert weights["distill.embedding_text.linear.weight"].shape == (32, 16)
    student = sum(v.numel() for k, v in weights.items() if not k.startswith("distill.")
                  and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert f"| student (distilled) | {student:,} |" in (state.run_dir / "report.md").read_text()


def test_a_module_path_that_does_not_exist_is_named(write_config, teacher_dir):
    distill = {"teacher": str(teacher_dir), "hidden": [{"student": "encoders.text.model.encoder.layer.7",
                                                        "teacher": LAYER}]}
    with pytest.raises(ConfigError, match=r"hidden\[0\].student: the student has no module "
                                          r"'encoders.text.model.encoder.layer.7' \(did you mean"):
        fit(*load(str(write_config({**TEXT_STUDENT, "distill": distill})), []))
    distill["hidden"] = [{"student": LAYER, "teacher": "encoders.txt"}]
    with pytest.raises(ConfigError, match=r"hidden\[0\].teacher: the teacher has no module 'encoders.txt'"):
        fit(*load(str(write_config({**TEXT_STUDENT, "distill": distill})), []))


@pytest.mark.slow
def test_minilm_teaches_token_states_and_its_sentence_embedding(write_config):
    distill = {"teacher": str(minilm_folder()), "alpha": 0.0, "embedding": 1.0,
               "hidden": [{"student": LAYER, "teacher": "encoder.layer.5"}]}
    state = fit(*load(str(write_config({**TEXT_STUDENT, "distill": distill}, name="minilm-kd")), []))
    assert state.metrics["train"]["hidden"] > 0 and state.metrics["train"]["embedding"] > 0
    weights = load_file(str(checkpoint.latest(state.run_dir / "checkpoints") / "model.safetensors"))
    assert weights["distill.hidden0.linear.weight"].shape == (384, 16)
    assert "| teacher | 22,713,216 |" in (state.run_dir / "report.md").read_text()  # MiniLM-L6, no accuracy


def test_a_teacher_that_tokenizes_otherwise_or_has_no_head_is_refused(write_config):
    byte_student = {**TEXT_STUDENT, "text_encoder": {**TEXT_STUDENT["text_encoder"], "tokenizer": "bytes"}}
    distill = {"teacher": str(minilm_folder()), "alpha": 0.0,
               "hidden": [{"student": LAYER, "teacher": "encoder.layer.5"}]}
    with pytest.raises(ConfigError, match=r"hidden\[0\]: .* the teacher's vocabulary is wordpiece \(30,522 pieces, "
                                          r"\w+\), the student's bytes \(257 ids\)"):
        fit(*load(str(write_config({**byte_student, "distill": distill})), []))
    with pytest.raises(ConfigError, match="has no classification head, so no soft targets"):
        fit(*load(str(write_config({**TEXT_STUDENT, "distill": {"teacher": str(minilm_folder())}})), []))


def test_the_student_starts_from_the_principal_components_of_the_teachers_token_embeddings(write_config,
                                                                                          teacher_dir):
    from plait.core.model import build_model

    def built(plugin_blocks: dict, distill: dict | None = None):
        blocks = {**plugin_blocks, **({"distill": {"teacher": str(teacher_dir), **distill}} if distill else {})}
        config, plugins = load(str(write_config(blocks)), [])
        return build_model(plugins, config, ("text",), 10), plugins

    untouched, _ = built(TEXT_STUDENT)
    student, plugins = built(TEXT_STUDENT, {"init_embeddings": True})
    mine = student.encoders.text.model.get_input_embeddings().weight.detach().double()
    theirs = plugins.stash[TEACHER].model.encoder("text").model.get_input_embeddings().weight.detach().double()
    assert mine.shape == (30522, 16) and theirs.shape == (30522, 32)
    # The 16 directions of the teacher's rows that keep the most of them (numpy's own SVD): the student's rows
    # are their coordinates, scaled, so the rows' inner products are the projected teacher's, to one factor.
    centered = theirs.numpy() - theirs.numpy().mean(0)
    top = centered @ torch.linalg.svd(torch.from_numpy(centered), full_matrices=False).Vh[:16].T.numpy()
    rows = torch.randperm(30522, generator=torch.Generator().manual_seed(0))[:300]
    expected, found = top[rows] @ top[rows].T, (mine[rows] @ mine[rows].T).numpy()
    factor = found.trace() / expected.trace()
    assert found == pytest.approx(factor * expected, abs=1e-9)
    untouched_weights = untouched.encoders.text.model.get_input_embeddings().weight.detach().double()
    assert mine.std().item() == pytest.approx(untouched_weights.std().item(), rel=0.01)  # the student's scale
    assert not torch.allclose(mine, untouched_weights)
    byte_student = {**TEXT_STUDENT, "text_encoder": {**TEXT_STUDENT["text_encoder"], "tokenizer": "bytes"}}
    with pytest.raises(ConfigError, match=r"init_embeddings: .* the teacher's vocabulary is wordpiece \(30,522 "
                                          r"pieces, \w+\), the student's bytes \(257 ids\)"):
        built(byte_student, {"init_embeddings": True})
    wide = {**TEXT_STUDENT, "text_encoder": {**TEXT_STUDENT["text_encoder"], "hidden": 64}}
    with pytest.raises(ConfigError, match=r"token embeddings \(64 wide\) are wider than the teacher's \(32\)"):
        built(wide, {"init_embeddings": True})


@pytest.mark.slow
def test_cached_teacher_outputs_run_the_teacher_in_the_first_epoch_only(write_config, teacher_dir, monkeypatch):
    calls = []
    forward = RunTeacher.forward
    monkeypatch.setattr(RunTeacher, "forward", lambda self, batch: calls.append(1) or forward(self, batch))
    plugins = {**TEXT_STUDENT, "audio_encoder": STUDENT["audio_encoder"],
               "distill": {"teacher": str(teacher_dir), "embedding": 1.0, "embedding_modalities": ["text", "audio"]}}
    fresh = fit(*load(str(write_config(plugins, name="uncached", epochs=3)), []))
    uncached_calls, calls[:] = len(calls), []
    plugins["distill"] = {**plugins["distill"], "cache": True}
    cached = fit(*load(str(write_config(plugins, name="cached", epochs=3)), []))
    assert uncached_calls - len(calls) == 2 * 6  # epochs 2 and 3, 6 batches of 32 each (report.md's calls alike)
    # The same targets, looked up instead of recomputed: equal up to how the fused teacher's audio
    # features depend on a batch's padding (a few 1e-3; targets of other samples would be far off).
    for term in ("kd", "embedding", "loss"):
        assert cached.metrics["train"][term] == pytest.approx(fresh.metrics["train"][term], rel=2e-2)


def classifier_folder(folder, labels: list[str]):
    """A small transformers sequence classifier (random weights) on MiniLM's vocabulary."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={label: i for i, label in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(folder)
    shutil.copy(minilm_folder() / "tokenizer.json", folder)
    return folder


def test_a_transformers_classifier_gives_soft_targets_and_must_share_the_classes(write_config, tmp_path):
    teacher = classifier_folder(tmp_path / "classifier", [str(d) for d in range(10)])
    state = fit(*load(str(write_config({**TEXT_STUDENT, "distill": {"teacher": str(teacher), "alpha": 0.5}},
                                       name="hf-kd")), []))
    assert state.metrics["train"]["kd"] > 0
    row = next(line for line in (state.run_dir / "report.md").read_text().splitlines() if line.startswith("| teacher"))
    assert row.split("|")[-2].strip().startswith("0.")  # the classifier's own test accuracy
    other = classifier_folder(tmp_path / "abc", ["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"the teacher's classes \['a', 'b', 'c'\] are not the student's \['0'"):
        fit(*load(str(write_config({**TEXT_STUDENT, "distill": {"teacher": str(other)}})), []))


@pytest.mark.slow
def test_a_stored_text_teacher_gives_soft_targets_only_to_the_rows_with_text(write_config, tmp_path):
    teacher = classifier_folder(tmp_path / "classifier", [str(d) for d in range(10)])
    kd = {"teacher": str(teacher), "alpha": 0.5}
    live = fit(*load(str(write_config({**TEXT_STUDENT, "distill": kd}, name="live")), []))
    store = tmp_path / "store"
    stored = fit(*load(str(write_config({**TEXT_STUDENT, "distill": {**kd, "store": str(store)}}, name="stored")),
                       []))
    scored = TeacherStore(store).columns["scored"]
    assert scored.any() and not scored.all()  # the samples without text (p_missing) have no teacher logits
    for step, row in train_rows(live.run_dir).items():  # rows without text get no soft targets from the store either
        assert train_rows(stored.run_dir)[step]["kd"] == pytest.approx(row["kd"], rel=1e-4), step


def train_rows(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if row.get("split") == "train"}


def test_caching_the_teacher_is_refused_when_augmentation_changes_the_inputs(write_config, teacher_dir):
    plugins = {**STUDENT, "augment": {}, "distill": {"teacher": str(teacher_dir), "cache": True}}
    changing = r"cache: the training inputs change every epoch \(sample transforms of augment\)"
    with pytest.raises(ConfigError, match=changing):
        fit(*load(str(write_config(plugins)), []))
