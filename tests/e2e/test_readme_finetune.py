"""The README's "Fine-tuning a pretrained model" commands, run as written in a fresh folder that holds the
example config (``plait`` and ``python`` are this environment's)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def section_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Fine-tuning a pretrained model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the section has a ```sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_fine_tuning_commands_run_as_written(tmp_path):
    (tmp_path / "examples").mkdir()
    shutil.copytree(ROOT / "examples" / "finetune", tmp_path / "examples" / "finetune")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for command in section_commands():
        done = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=500)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        outputs.append(done.stdout)
    assert len(outputs) == 3
    assert outputs[-1].strip().splitlines()[-1] == "384"  # MiniLM's width, read back by plain transformers
    export = tmp_path / "runs" / "finetune" / "export"
    assert (export / "text_encoder" / "tokenizer.json").is_file() and (export / "head.safetensors").is_file()
    saved = sorted((tmp_path / "runs" / "finetune" / "checkpoints").iterdir())[-1] / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as weights:
        text = [k for k in weights.keys() if k.startswith("encoders.text.")]
    assert text and all(".lora_" in k for k in text)
