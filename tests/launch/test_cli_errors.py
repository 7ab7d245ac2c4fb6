"""Bad input ends in one clear line on stderr and exit code 2, never a traceback."""
import subprocess
import sys

import numpy as np
import soundfile
import yaml

from plait.launch.cli import main

MANIFEST_PLUGINS = {
    "text_encoder": {"hidden": 32, "layers": 1, "heads": 2},
    "audio_encoder": {"channels": [8], "dim": 16},
    "fusion": {"dim": 16, "heads": 2},
}


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("plait: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def manifest_config(tmp_path, manifest_text, files=()):
    for name, content in files:
        (tmp_path / name).write_bytes(content) if isinstance(content, bytes) else soundfile.write(
            tmp_path / name, content, 16000)
    manifest = tmp_path / "data.csv"
    manifest.write_text(manifest_text)
    return write_yaml(tmp_path / "c.yaml", {
        "run": {"name": "m", "runs_dir": str(tmp_path / "runs"), "epochs": 1, "batch_size": 4},
        "plugins": {"manifest": {"train": str(manifest)}, **MANIFEST_PLUGINS},
    })


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("run: {name: x\nplugins: []\n")
    assert_one_line_error(*run_cli(capsys, "train", str(path)), "bad.yaml", "malformed YAML")


def test_unknown_plugin_suggests_nearest(tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", {"plugins": {"spoken_digit": {}}})
    assert_one_line_error(*run_cli(capsys, "train", str(path)), "unknown plugin 'spoken_digit'",
                          "did you mean 'spoken_digits'")


def test_unknown_option(tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", {"plugins": {"fusion": {"knd": "concat"}}})
    assert_one_line_error(*run_cli(capsys, "train", str(path)), "plugins.fusion.knd", "did you mean 'kind'")


def test_wrong_type(tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", {"run": {"epochs": "many"}, "plugins": {"fusion": {}}})
    assert_one_line_error(*run_cli(capsys, "train", str(path)), "run.epochs", "'many'")


def test_wrong_type_from_override(tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", {"plugins": {"fusion": {}}})
    assert_one_line_error(*run_cli(capsys, "config", str(path), "plugins.fusion.dim=wide"), "plugins.fusion.dim")


def test_missing_file_in_manifest_names_the_row(tmp_path, capsys):
    config = manifest_config(tmp_path, "audio,text,label\n,one,1\nmissing.wav,two,2\n")
    assert_one_line_error(*run_cli(capsys, "train", str(config)), "data.csv:3", "missing.wav", "not found")


def test_unreadable_audio_names_row_and_file(tmp_path, capsys):
    good = np.sin(np.arange(8000) / 3.0).astype(np.float32) * 0.3
    config = manifest_config(tmp_path, "audio,label\ngood.wav,1\nbad.wav,2\n",
                             files=[("good.wav", good), ("bad.wav", b"RIFF....not audio")])
    assert_one_line_error(*run_cli(capsys, "train", str(config)), "data.csv:3", "bad.wav", "unreadable audio")


def test_unreadable_image_names_row_and_file(tmp_path, capsys):
    config = manifest_config(tmp_path, "image,label\nbad.png,1\n", files=[("bad.png", b"\x89PNG broken")])
    with open(config) as f:
        data = yaml.safe_load(f)
    data["plugins"]["image_encoder"] = {"timm": "resnet10t", "timm_kwargs": {"channels": [8, 8, 8, 8]}}
    write_yaml(config, data)
    assert_one_line_error(*run_cli(capsys, "train", str(config)), "data.csv:2", "bad.png", "unreadable image")


def test_empty_data_set(tmp_path, capsys):
    config = manifest_config(tmp_path, "audio,text,label\n")
    assert_one_line_error(*run_cli(capsys, "train", str(config)), "data.csv", "no rows")


def test_unknown_label_names_the_row(tmp_path, capsys):
    config = manifest_config(tmp_path, "text,label\nuno,1\n")
    data = yaml.safe_load(config.read_text())
    data["plugins"]["manifest"]["classes"] = ["0", "1", "2"]
    data["plugins"]["manifest"]["train"] = str(tmp_path / "data.csv")
    (tmp_path / "data.csv").write_text("text,label\nuno,1\nsiete,7\n")
    write_yaml(config, data)
    assert_one_line_error(*run_cli(capsys, "train", str(config)), "data.csv:3", "unknown label '7'")


def test_eval_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "eval", str(tmp_path)), "not a plait run folder")


def test_debug_shows_the_traceback(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"plugins": {"fusoin": {}}})
    plain = subprocess.run([sys.executable, "-m", "plait.launch.cli", "train", str(path)], capture_output=True,
                           text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "fusoin" in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "plait.launch.cli", "--debug", "train", str(path)],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "PluginError" in debug.stderr
