"""Shared fixtures: a tiny but real plugin set, and one spoken_digits cache per session."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PLUGINS_FOR_TESTS = Path(__file__).parent / "plugins_for_tests"
sys.path.insert(0, str(PLUGINS_FOR_TESTS))  # test plugins, named in configs like any other

TINY_PLUGINS = {
    "spoken_digits": {"train_size": 192, "val_size": 64, "test_size": 64, "renderings": 2, "eval_renderings": 1,
                      "languages": ["en", "de"], "p_missing": 0.1, "p_corrupt": 0.05},
    "augment": {},
    "text_encoder": {"hidden": 32, "layers": 1, "heads": 2},
    "image_encoder": {"timm": "resnet10t", "timm_kwargs": {"channels": [8, 16, 32, 64]}},
    "audio_encoder": {"channels": [8, 16], "dim": 32},
    "fusion": {"dim": 32, "heads": 2, "contrastive_weight": 0.1},
}


@pytest.fixture(scope="session", autouse=True)
def plait_cache(tmp_path_factory) -> Path:
    """spoken_digits synthesizes its clips once per test session, not per test."""
    cache = tmp_path_factory.mktemp("plait-cache")
    os.environ["PLAIT_CACHE"] = str(cache)
    return cache


@pytest.fixture
def write_config(tmp_path):
    """Write a config dict (run folder under tmp_path) and return its path."""

    def write(plugins: dict | None = None, name: str = "tiny", **run) -> Path:
        config = {
            "run": {"name": name, "runs_dir": str(tmp_path / "runs"), "epochs": 1, "batch_size": 32,
                    "eval_batch_size": 64, "lr": 3e-3, "log_every": 2, **run},
            "plugins": TINY_PLUGINS if plugins is None else plugins,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return write


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens at (for a torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
