"""Soak: run the default config again and again, as `make demo` runs it, and count crashes.

    .venv/bin/python benchmarks/soak.py [--runs 20] [--steps 200] [--config plugins.yaml]

Each run is a fresh `plait train CONFIG` process (its own local Ray, 2 Train workers, the same
plugins), cut to ``--steps`` optimizer steps. Even-numbered runs start from an empty data cache
(so the workers' data sets are built from nothing, audio synthesis included); odd ones reuse
the cache the first run filled. A run *crashed* when its exit was a signal, or when its own
output or any Ray worker log of its session holds a native-crash signature (an abort, a
segmentation fault, a glibc heap check, a fatal Python error); a run that exits non-zero
without one counts only in ``nonzero_exits``. Logs of failed runs are kept and named.

Last line: JSON ``{"runs": N, "crashes": k, "nonzero_exits": m}``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRASH = re.compile(r"Fatal Python error|SIGABRT|SIGSEGV|SIGBUS|SIGILL|malloc\(\)|free\(\)|double free"
                   r"|corrupted (size|double-linked)|tcache|core dumped|Segmentation fault|Aborted")


def crash_lines(paths: list[Path]) -> list[str]:
    """Lines that show a native crash, each prefixed with the file it is in."""
    found = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found += [f"{path}: {line.strip()}" for line in text.splitlines() if CRASH.search(line)]
    return found


def one_run(index: int, args: argparse.Namespace, work: Path, warm_cache: Path) -> dict:
    cold = args.all_cold or index % 2 == 0
    cache = work / f"cache-{index}" if cold else warm_cache
    ray_tmp = work / f"ray{index}"  # each run's Ray session logs, scanned afterwards
    env = {**os.environ, "PLAIT_CACHE": str(cache), "RAY_TMPDIR": str(ray_tmp)}
    command = [str(Path(sys.executable).with_name("plait")), "train", args.config,
               f"run.max_steps={args.steps}", f"run.name=soak-{index}", f"run.runs_dir={work / 'runs'}"]
    log = work / f"run-{index}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    worker_logs = sorted(ray_tmp.glob("ray/session_*/logs/worker-*"))  # Ray logs under $RAY_TMPDIR/ray
    signs = crash_lines([log, *worker_logs])
    crashed = (code is not None and code < 0) or bool(signs)
    result = {"run": index, "cache": "empty" if cold else "warm", "exit": code, "crashed": crashed,
              "seconds": round(time.perf_counter() - started, 1)}
    if crashed or code != 0:  # keep what shows why, outside the folder that is deleted
        kept = Path(tempfile.mkdtemp(prefix=f"soak-failed-{index}-"))
        shutil.copy(log, kept / "run.log")
        for path in worker_logs:
            shutil.copy(path, kept / path.name)
        result["logs"] = str(kept)
        result["signs"] = signs[:5]
    if cache != warm_cache:  # the warm runs' cache is kept for them
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--config", default="plugins.yaml")
    parser.add_argument("--all-cold", action="store_true", help="every run from an empty data cache")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run counts as hung")
    args = parser.parse_args()
    crashes = nonzero = 0
    # A short root: Ray's socket paths live under RAY_TMPDIR and must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="soak", dir="/tmp") as tmp:
        work = Path(tmp)
        for index in range(args.runs):
            result = one_run(index, args, work, warm_cache=work / "cache-0")
            crashes += result["crashed"]
            nonzero += result["exit"] != 0
            print(json.dumps(result), flush=True)
    print(json.dumps({"runs": args.runs, "crashes": crashes, "nonzero_exits": nonzero}))


if __name__ == "__main__":
    main()
