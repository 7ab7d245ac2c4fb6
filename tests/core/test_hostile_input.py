"""Hostile input, property-based (hypothesis): random YAML documents and override strings against the
config loader, random manifest rows, truncated and garbage image and audio files. Every case must end
in a result or one PlaitError (what the CLI prints as one line): no other exception, no hang, no row
silently dropped. `pytest tests/core/test_hostile_input.py --hypothesis-show-statistics` prints the cases tried."""
import csv
import io
import json

import numpy as np
import pytest
import soundfile
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from plait.core.config import load_config
from plait.core.errors import PlaitError
from plait.core.runs import prepare
from plait.modalities.audio import load_audio
from plait.modalities.image import load_image
from plait.plugins.manifest import Manifest, ManifestOptions

CASES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PLUGINS = ["spoken_digits", "manifest", "augment", "text_encoder", "image_encoder", "audio_encoder", "fusion",
           "quantize", "nope"]
KEYS = ["run", "scaling", "plugins", "include", "name", "epochs", "lr", "num_workers", "batch_size", *PLUGINS]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["1e-3", "nan", "-1", "[", "{a: 1}", "*anchor"]))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)),
    max_leaves=20)


def _outcome(call):
    """Run ``call``: its result, or the PlaitError it raised; anything else fails the test."""
    try:
        return call()
    except PlaitError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(exc)  # one line
        return exc


@CASES
@given(document=documents)
def test_random_yaml_documents_load_or_fail_with_one_clear_error(tmp_path, document):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))

    def load_and_validate():
        raw = load_config(path)
        return prepare(raw, str(path))

    _outcome(load_and_validate)


@CASES
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_random_text_as_a_config_file_loads_or_fails_with_one_clear_error(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _outcome(lambda: prepare(load_config(path), str(path)))


@CASES
@given(override=st.text(max_size=40) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["run.epochs", "run.lr", "plugins.fusion.dim", "plugins", "run", "scaling.num_workers", "run.name.x", "a..b", ""]),
    st.text(max_size=15)))
def test_random_override_strings_apply_or_fail_with_one_clear_error(tmp_path, override):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run": {"epochs": 2, "lr": 0.1}, "plugins": {"fusion": {"dim": 8}}}))
    _outcome(lambda: prepare(load_config(path, [override]), str(path)))


cells = st.one_of(st.text(max_size=10), st.sampled_from(["0", "1", "a.wav", "x.png", "../up.wav", "/etc/passwd",
                                                          "note.txt", "", " "]))


@CASES
@given(rows=st.lists(st.dictionaries(st.sampled_from(["label", "text", "image", "audio", "id", "extra"]), cells,
                                     max_size=5), min_size=0, max_size=6),
       as_jsonl=st.booleans())
def test_random_manifest_rows_build_a_data_set_or_fail_naming_the_row(tmp_path, rows, as_jsonl):
    (tmp_path / "note.txt").write_text("written words")
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    soundfile.write(tmp_path / "a.wav", np.zeros(800, dtype="float32"), 8000)
    if as_jsonl:
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(json.dumps(row) for row in rows))
    else:
        path = tmp_path / "data.csv"
        columns = sorted({c for row in rows for c in row} or {"label"})
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows([[row.get(c, "") for c in columns] for row in rows])
    result = _outcome(lambda: Manifest(path, ManifestOptions()))
    if isinstance(result, Manifest):
        assert len(result) == len(rows)  # every row kept, or the whole file refused by name
        for index in range(len(result)):
            _outcome(lambda: result[index])  # noqa: B023 - called at once, inside the loop


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _wav() -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.sin(np.arange(4000) / 5).astype("float32"), 8000, format="WAV")
    return buffer.getvalue()


@CASES
@given(kind=st.sampled_from(["png", "wav", "ogg", "jpg"]), cut=st.floats(0, 1), garbage=st.binary(max_size=64),
       where=st.sampled_from(["truncate", "garbage", "prefix"]))
def test_truncated_or_garbage_image_and_audio_files_load_or_fail_with_one_clear_error(tmp_path, kind, cut, garbage,
                                                                                      where):
    good = _png() if kind in ("png", "jpg") else _wav()
    damaged = {"truncate": good[:int(len(good) * cut)], "garbage": garbage,
               "prefix": good[:int(len(good) * cut)] + garbage}[where]
    path = tmp_path / f"file.{kind}"
    path.write_bytes(damaged)
    if kind in ("png", "jpg"):
        result = _outcome(lambda: load_image(path, (8, 8), 1))
        assert isinstance(result, PlaitError) or tuple(result.shape) == (1, 8, 8)
    else:
        result = _outcome(lambda: load_audio(path))
        assert isinstance(result, PlaitError) or (result.dim() == 1 and result.numel() > 0)


@pytest.mark.parametrize("value", ["../outside.wav", "/etc/hostname", "link.wav"])
def test_manifest_paths_that_leave_the_data_folder_are_refused_unless_allowed(tmp_path, value):
    data = tmp_path / "data"
    data.mkdir()
    soundfile.write(tmp_path / "outside.wav", np.zeros(800, dtype="float32"), 8000)
    (data / "link.wav").symlink_to(tmp_path / "outside.wav")
    path = data / "m.csv"
    path.write_text(f"audio,label\n{value},0\n")
    with pytest.raises(PlaitError, match=f"m.csv:2: audio file '{value}' is outside the manifest's folder"):
        Manifest(path, ManifestOptions())
    if value != "/etc/hostname" or (tmp_path / value).is_file():
        assert len(Manifest(path, ManifestOptions(allow_outside_root=True))) == 1
