"""The teacher's outputs stored once, per sample and augmented view, and read instead of the teacher: the
same student as the live teacher, bitwise; the very views the student sees; another teacher refused."""
import shutil

import pytest
import torch
import yaml
from conftest import TINY_PLUGINS

from plait.core import hookspecs
from plait.core.data import TRANSFORM_SEED, build_dataset, move
from plait.core.errors import ConfigError
from plait.core.loop import fit
from plait.core.runs import load
from plait.plugins.distill import TEACHER, TeacherStore, mix_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STUDENT = {  # audio only, as the cross-modal test's; no augmentation
    "spoken_digits": TINY_PLUGINS["spoken_digits"],
    "audio_encoder": {"channels": [4, 8], "dim": 16},
    "fusion": {"dim": 16, "heads": 2, "ce_weight": 0.5},
}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from plait.testing import write_config

    folder = tmp_path_factory.mktemp("teacher")
    return fit(*load(str(write_config(folder, TINY_PLUGINS, name="teacher", epochs=1)), [])).run_dir


def student(write_config, name, distill, plugins=STUDENT, views=0, **run):
    path = write_config({**plugins, "distill": distill}, name=name, **{"epochs": 2, **run})
    raw = yaml.safe_load(path.read_text())
    raw["data"] = {"views": views}
    path.write_text(yaml.safe_dump(raw))
    return path


def weights(state) -> dict:
    return {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def test_the_stored_teacher_trains_the_same_student_as_the_live_one_bitwise(write_config, teacher_dir, tmp_path):
    kd = {"teacher": str(teacher_dir), "embedding": 1.0, "embedding_modalities": ["audio"]}
    live = fit(*load(str(student(write_config, "live", kd)), []))
    store = tmp_path / "store"
    writing = fit(*load(str(student(write_config, "writes", {**kd, "store": str(store)})), []))
    assert (store / "store.json").is_file() and writing.plugins.stash[TEACHER].model is not None
    reading = fit(*load(str(student(write_config, "reads", {**kd, "store": str(store)})), []))
    assert reading.plugins.stash[TEACHER].model is None  # the teacher was not even built
    stopped = {**STUDENT, "stop_at": {"step": 9}}  # in the second epoch: a resume reads on from the store
    with pytest.raises(RuntimeError, match="stopped at step 9"):
        fit(*load(str(student(write_config, "resumed", {**kd, "store": str(store)}, plugins=stopped,
                              checkpoint_every=3)), []))
    resumed = fit(*load(str(student(write_config, "resumed", {**kd, "store": str(store)}, checkpoint_every=3)), []))
    assert resumed.step == live.step
    expected = weights(live)
    for state in (writing, reading, resumed):
        got = weights(state)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert reading.metrics["train"]["kd"] == live.metrics["train"]["kd"] > 0
    report = (reading.run_dir / "report.md").read_text()
    assert "| teacher |" in report


def test_the_store_holds_the_teachers_outputs_of_the_views_the_student_trains_on(write_config, teacher_dir,
                                                                               tmp_path):
    store = tmp_path / "views"
    kd = {"teacher": str(teacher_dir), "store": str(store), "top_k": 4, "embedding": 1.0,
          "embedding_modalities": ["audio"]}
    path = student(write_config, "views", kd, plugins={**STUDENT, "augment": {}}, views=2, epochs=3)
    state = fit(*load(str(path), []))
    saved = TeacherStore(store)
    assert saved.info["views"] == 2 and len(saved.row) == 2 * saved.info["samples"]
    config, plugins = load(str(path), [])
    dataset = build_dataset(plugins, config, "train")
    teacher = plugins.first(hookspecs.plait_teacher, config=config)
    for epoch in (0, 1, 2):  # epoch 2 draws view 0 again
        batch = move(dataset.collate_fn([dataset[(i, epoch)] for i in range(0, 40, 3)]), torch.device("cpu"))
        assert torch.equal(batch[TRANSFORM_SEED], move(dataset.collate_fn(
            [dataset[(i, epoch % 2)] for i in range(0, 40, 3)]), torch.device("cpu"))[TRANSFORM_SEED])
        with torch.no_grad():
            live = teacher(batch)["logits"]
        stored, _, _ = saved.outputs(batch, [])
        top, classes = live.topk(4, dim=1)
        assert torch.equal(stored.topk(4, dim=1).indices, classes)  # the same view's top classes, the same logits
        # to rounding: the cache ran the teacher in batches of another size; another view would be far off
        assert torch.allclose(stored.gather(1, classes), top, atol=1e-5)
    view_1 = move(dataset.collate_fn([dataset[(i, 1)] for i in range(0, 40, 3)]), torch.device("cpu"))
    view_1["transform_seed"] = batch[TRANSFORM_SEED]  # ask the store for view 0 (the last batch) of the same samples
    with torch.no_grad():
        assert not torch.allclose(teacher(view_1)["logits"].topk(4, dim=1).values,
                                  saved.outputs(view_1, [])[0].topk(4, dim=1).values, atol=1e-3)
    assert state.metrics["train"]["kd"] > 0


def test_another_teacher_a_missing_shard_and_changing_views_are_one_line(write_config, teacher_dir, tmp_path):
    store = tmp_path / "store"
    kd = {"teacher": str(teacher_dir), "store": str(store)}
    fit(*load(str(student(write_config, "first", kd, max_steps=1)), []))
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    with pytest.raises(ConfigError, match=r"holds the outputs of the teacher .*teacher.*, not of .*other-teacher") as e:
        fit(*load(str(student(write_config, "other", {**kd, "teacher": str(other)}, max_steps=1)), []))
    assert "\n" not in str(e.value)
    (store / "shard-00000.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"store/shard-00000.safetensors is missing \(1 shards in"):
        fit(*load(str(student(write_config, "missing", kd, max_steps=1)), []))
    with pytest.raises(ConfigError, match=r"plugins.distill.mixup: the teacher must see each mixed batch"):
        fit(*load(str(student(write_config, "mixed", {**kd, "store": str(tmp_path / "s3"), "mixup": 0.4},
                              max_steps=1)), []))
    with pytest.raises(ConfigError, match=r"augment draw a new view every epoch; set data.views: N"):
        fit(*load(str(student(write_config, "fresh", {**kd, "store": str(tmp_path / "s2")},
                              plugins={**STUDENT, "augment": {}}, max_steps=1)), []))


def test_mixup_mixes_images_and_waveforms_of_rows_that_both_have_them():
    torch.manual_seed(0)
    present = {"image": torch.tensor([True, True, False, True]), "audio": torch.tensor([True, False, True, True]),
               "text": torch.ones(4, dtype=torch.bool)}
    batch = {"label": torch.arange(4), "present": present,
             "inputs": {"image": {"image": torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()},
                        "audio": {"audio": torch.arange(4.0).view(4, 1).expand(4, 5).clone(),
                                  "lengths": torch.tensor([5, 0, 2, 4])},
                        "text": {"text": ["a", "b", "c", "d"]}}}
    mixed = mix_inputs(batch, alpha=0.4)
    assert mixed["inputs"]["text"] == batch["inputs"]["text"] and mixed["label"] is batch["label"]
    changed = 0
    for modality, key in (("image", "image"), ("audio", "audio")):
        for row in range(4):
            value = float(mixed["inputs"][modality][key][row].flatten()[0])
            if not present[modality][row]:
                assert value == row  # a row without the modality is left as it was
            elif value != row:
                changed += 1
                lam_other = [(row - value) / (row - other) for other in range(4) if other != row and
                             present[modality][other]]
                assert any(0 < w <= 0.5 + 1e-6 for w in lam_other)  # mostly itself, partly another row
    assert changed > 0 and batch["inputs"]["image"]["image"][0, 0, 0, 0] == 0  # the input batch is not changed


def test_with_mixup_the_teacher_sees_the_mixed_batch_the_student_sees(write_config, teacher_dir):
    kd = {"teacher": str(teacher_dir), "mixup": 0.4}
    state = fit(*load(str(student(write_config, "mixup", kd, max_steps=2)), []))
    teacher, model = state.plugins.stash[TEACHER].model, state.model
    seen = {}
    hooks = [teacher.model.encoders["audio"].register_forward_hook(
                 lambda _m, args, _o: seen.__setitem__("teacher", args[0]["audio"].clone())),
             model.encoders["audio"].register_forward_hook(
                 lambda _m, args, _o: seen.__setitem__("student", args[0]["audio"].clone()))]
    config, plugins = load(str(student(write_config, "mixup", kd, max_steps=2)), [])
    dataset = build_dataset(plugins, config, "train")
    batch = dataset.collate_fn([dataset[(i, 0)] for i in range(32)])
    model.train()
    model(batch)
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen["teacher"], seen["student"])
    assert not torch.equal(seen["student"], batch["inputs"]["audio"]["audio"])  # it was mixed
    assert state.metrics["train"]["kd"] > 0


def test_attention_scores_and_value_relations_by_hand():
    from plait.plugins.distill import attention_loss, attention_scores, relation_loss, value_relation

    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, 4) for _ in range(3))
    scores = attention_scores(query, key, heads=2)
    assert scores.shape == (2, 2, 3, 3)
    assert torch.allclose(scores[0, 1], query[0, :, 2:] @ key[0, :, 2:].T / 2 ** 0.5)  # head 1: features 2-3
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert attention_loss(scores, scores, mask) == 0
    padded = scores.clone()
    padded[0, :, 2, :] += 100.0  # the padding token's row and column do not count
    padded[0, :, :, 2] += 100.0
    assert attention_loss(padded, scores, mask) == 0
    shifted = scores + 1.0
    assert attention_loss(shifted, scores, mask) == pytest.approx(1.0)
    relation = value_relation(value, heads=2, mask=mask)
    assert torch.allclose(relation.exp().sum(-1), torch.ones(2, 2, 3))  # a distribution over the real keys
    assert relation[0, :, :, 2].exp().max() == 0  # none on the padding key
    assert relation_loss(relation, relation, mask) == pytest.approx(0.0, abs=1e-6)
    assert relation_loss(value_relation(value.flip(1), 2, mask), relation, mask) > 0


def test_a_text_student_learns_the_teachers_attention_and_value_relations(write_config, teacher_dir):
    plugins = {"spoken_digits": TINY_PLUGINS["spoken_digits"], "text_encoder": {"hidden": 16, "layers": 1, "heads": 2},
               "fusion": {"dim": 16, "heads": 2, "ce_weight": 0.5}}
    layer = "encoders.text.model.encoder.layer.0.attention.self"
    kd = {"teacher": str(teacher_dir), "attention": [
        {"student": layer, "teacher": layer},  # 2 heads each: TinyBERT's scores
        {"student": layer, "teacher": layer, "relation": "value", "relation_heads": 4}]}  # 16 and 32 wide
    state = fit(*load(str(student(write_config, "attention", kd, plugins=plugins, max_steps=2)), []))
    assert state.metrics["train"]["attention"] > 0
    one_head = {**plugins, "text_encoder": {"hidden": 16, "layers": 1, "heads": 1}}
    with pytest.raises(ConfigError, match=r"attention\[0\]: the student's attention has 1 heads, the teacher's 2; "
                                          r".*use relation: value"):
        fit(*load(str(student(write_config, "heads", kd, plugins=one_head, max_steps=1)), []))
    wrong = {**kd, "attention": [{"student": "encoders.text.model.encoder.layer.0.attention.selff", "teacher": layer}]}
    with pytest.raises(ConfigError, match=r"attention\[0\].student: the student has no module .*attention.selff.*"
                                          r"did you mean .*layer.0.attention.self"):
        fit(*load(str(student(write_config, "wrong", wrong, plugins=plugins, max_steps=1)), []))
    output = {**kd, "attention": [{"student": "encoders.text.model.encoder.layer.0.output", "teacher": layer}]}
    with pytest.raises(ConfigError, match=r"'encoders.text.model.encoder.layer.0.output' is not an attention module"):
        fit(*load(str(student(write_config, "output", output, plugins=plugins, max_steps=1)), []))
