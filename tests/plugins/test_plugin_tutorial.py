"""docs/plugins.md, run as written: its `$ ` commands, in a fresh virtual environment that
installs plait and then the scaffolded plugin (torch and the other heavy dependencies are
borrowed from this environment through a .pth file rather than installed again)."""
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def tutorial_commands() -> list[str]:
    text = (ROOT / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```console\n(.*?)```", text, flags=re.S)
    return [line[2:].strip() for block in blocks for line in block.splitlines() if line.startswith("$ ")]


@pytest.mark.timeout(600)
def test_the_plugin_tutorial_runs_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    subprocess.run(["pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)], cwd=tmp_path, env=env, check=True)

    commands = tutorial_commands()
    assert commands[0] == "plait new-plugin my_l2" and any(c.startswith("plait train") for c in commands)
    outputs = {}
    for command in commands:
        if command.startswith("pip install"):  # the fresh venv has plait's dependencies only by borrowing
            command = command.replace("pip install", "pip install --no-deps", 1)
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        outputs[command] = done.stdout

    assert "2 passed" in outputs["python -m pytest -q plait-my-l2"]  # the scaffold's own tests
    listed = {p["name"]: p for p in json.loads(outputs["plait plugins --json"])}
    assert listed["my_l2"]["status"] == "loaded" and listed["my_l2"]["source"] == "entry point"
    assert listed["my_l2"]["distribution"] == "plait-my-l2"
    assert "my_l2" in outputs["plait plugins --order plait-my-l2/example.yaml"]
    rows = (tmp_path / "runs" / "my_l2-example" / "metrics.jsonl").read_text().splitlines()
    assert all("my_l2_l2" in json.loads(r) for r in rows if json.loads(r)["split"] == "train")
