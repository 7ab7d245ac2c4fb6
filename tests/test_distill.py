"""Distillation: the loss by hand, a frozen teacher, cross-modal students, resume, bad input."""
import math

import pytest
import torch
from conftest import TINY_PLUGINS
from safetensors.torch import load_file

from plait.core import checkpoint
from plait.core.errors import ConfigError
from plait.core.loop import fit
from plait.launch.cli import load
from plait.plugins.distill import _Teacher, kd_loss

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
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        assert kd_loss(student, teacher, temperature, alpha=1.0).item() == pytest.approx(temperature**2 * kl, rel=1e-5)
        assert kd_loss(student, teacher, temperature, alpha=0.25).item() == pytest.approx(0.25 * temperature**2 * kl,
                                                                                          rel=1e-5)
    assert kd_loss(teacher, teacher, 3.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)


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
    teacher = _Teacher.model
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    after = {k: v.cpu() for k, v in teacher.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # not a single weight moved
    assert set(state.modalities) == {"audio"} and set(teacher.encoders) == {"text", "image", "audio"}
    assert state.metrics["train"]["kd"] > 0
    report = (state.run_dir / "report.md").read_text()
    assert "| teacher |" in report and "| student (distilled) |" in report
    assert f"{state.metrics['test']['fused']['accuracy']:.4f}" in report


@pytest.mark.slow
def test_a_stopped_distillation_resumes_exactly_and_refuses_another_teacher(write_config, teacher_dir, tmp_path):
    plugins = {**STUDENT, "distill": {"teacher": str(teacher_dir)}}
    settings = dict(epochs=2, checkpoint_every=4)
    whole = fit(*load(str(write_config(plugins, name="kd-whole", **settings)), []))
    with pytest.raises(RuntimeError, match="stopped at step 5"):
        fit(*load(str(write_config({**plugins, "stop_at": {"step": 5}}, name="kd-split", **settings)), []))
    resumed = fit(*load(str(write_config(plugins, name="kd-split", **settings)), []))
    a = load_file(str(checkpoint.latest(whole.run_dir / "checkpoints") / "model.safetensors"))
    b = load_file(str(checkpoint.latest(resumed.run_dir / "checkpoints") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    other = tmp_path / "other-teacher"
    import shutil

    shutil.copytree(teacher_dir, other)
    newest = checkpoint.latest(other / "checkpoints") / "model.safetensors"
    weights = load_file(str(newest))
    from safetensors.torch import save_file

    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, str(newest))
    with pytest.raises(ConfigError, match="distilled from .* but the teacher is now"):
        fit(*load(str(write_config({**plugins, "distill": {"teacher": str(other)}}, name="kd-split",
                                   epochs=3)), []))


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
