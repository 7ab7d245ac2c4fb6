"""Shared fixtures: a tiny but real plugin set, and one spoken_digits cache per session."""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller polls its workers every 0.5 s, not 2 s: each of the suite's Ray runs notices its
# workers started, finished or died sooner (a tiny 2-worker run: 18.0 s, 15.1 s with it); the Ray sessions
# and nodes the tests start inherit it from this process
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
PLUGINS_FOR_TESTS = Path(__file__).parent / "plugins_for_tests"
sys.path.insert(0, str(PLUGINS_FOR_TESTS))  # test plugins, named in configs like any other

from hypothesis import settings  # noqa: E402

from plait.testing import TINY_PLUGINS  # noqa: E402 - one tiny plugin set, also for plugin authors

# CI replays the same hostile inputs every time (a failure there is reproducible); runs elsewhere
# draw new ones, and a case that fails is kept in .hypothesis/ and tried first next time.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session", autouse=True)
def plait_cache(tmp_path_factory) -> Path:
    """spoken_digits synthesizes its clips once per test session, not per test."""
    cache = tmp_path_factory.mktemp("plait-cache")
    os.environ["PLAIT_CACHE"] = str(cache)
    return cache


@pytest.fixture
def write_config(tmp_path):
    """Write a config dict (run folder under tmp_path) and return its path."""
    from plait.testing import write_config as write_in

    def write(plugins: dict | None = None, name: str = "tiny", **run) -> Path:
        return write_in(tmp_path, TINY_PLUGINS if plugins is None else plugins, name, **{"log_every": 2, **run})

    return write


def spawn(worker: Callable[..., None], workers: int, *args: Any) -> None:
    """Run ``worker(rank, *args)`` in ``workers`` spawned processes and wait for them all (the first failure
    raises here). A process whose worker returned ends at once with exit code 0, as a forked one does,
    without finalizing its interpreter: a torch.distributed thread that lets go of a tensor while the
    interpreter finalizes aborts the process (pytorch/pytorch#190489), a failure of torch's, not of the test."""
    import torch.multiprocessing as mp

    mp.start_processes(_run_and_exit, args=(worker, args), nprocs=workers, join=True, start_method="spawn")


def _run_and_exit(rank: int, worker: Callable[..., None], args: tuple) -> None:
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextmanager
def gloo_world(rank: int, workers: int, port: int) -> Iterator[None]:
    """This spawned process as rank ``rank`` of a gloo group for the block, left only once every rank has
    finished its collectives (gloo's barrier also waits for this rank's pending work): no rank closes its
    connections while a peer still exchanges over them."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens at (for a torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bert_folder(path: Path, intermediate: int = 64) -> Path:
    """A small BERT with MiniLM's tokenizer, saved as a downloaded model folder is laid out."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from plait.modalities.text import minilm_folder

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=intermediate)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (minilm_folder() / name).is_file():
            shutil.copy(minilm_folder() / name, path / name)
    return path
