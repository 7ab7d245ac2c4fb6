"""Ray Data against the DataLoader: training on the demo, and ``plait preprocess --ray`` on clinical notes.

    .venv/bin/python benchmarks/data.py [--lines 50000,200000] [--epochs 8] [--skip-train] [--skip-preprocess]

Training: ``plait train plugins.yaml`` (the demo: 9,000 clips, augment on, 2 Ray Train workers) twice, with
``data.engine: torch`` (each worker decodes with a DataLoader) and ``data.engine: ray`` (``data.cpus: 1``: a Ray
Data actor decodes, augments and collates), each in its own process, on one local Ray head of 3 logical CPUs
(the Ray engine's 2 + 1 share this machine's cores; the DataLoader run leaves the third idle). samples/s is the
run's own (``metrics.json``: samples over training seconds); the test accuracy is the fused model's.

Preprocessing: ``--lines`` clinical notes (sentences with names, record numbers, dates and findings, one in
500 a bad line; each count in turn) through ``plait preprocess medical``: one process, then ``--ray`` on a local
Ray of 2 CPUs. Each is timed from the command's start to its end (Ray's start and the actors' set-up included),
and the parts are checked to be the one-process output. Each process pays a fixed start (imports, and the
medical transform's terms and negation rules, loaded on first use): the speed-up grows with the input.

Last line: JSON {"ray_data_vs_loader" (Ray Data's samples/s over the DataLoader's), "samples_per_s_torch",
"samples_per_s_ray", "test_accuracy_torch", "test_accuracy_ray", "preprocess_ray_speedup" (the one-process
command's seconds over the --ray command's), "preprocess_rows_per_s_one", "preprocess_rows_per_s_ray",
"preprocess_seconds_one", "preprocess_seconds_ray", all of the largest count, "preprocess_by_lines" (each count's
figures), "preprocess_ray_speedup_marginal" (the seconds the largest count adds over the smallest, one process
over --ray: the speed-up once both are running), "cpus"}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the benchmark's own Ray listens on 127.0.0.1 only, without token authentication
RAY_ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
PLAIT = str(Path(sys.executable).with_name("plait"))
NAMES = ["Ada Byron", "Omar Haddad", "Lena Kowalski", "Raj Menon", "John Whitaker", "Maria Gonzalez", "Wei Chen",
         "Fatima Okafor"]
FINDINGS = ["has HTN", "denies chest pain", "has a history of type 2 diabetes", "may have COPD",
            "presents with community-acquired pneumonia", "reports shortness of breath"]


def clinical_notes(path: Path, lines: int) -> None:
    with open(path, "wb") as out:
        for i in range(lines):
            if i % 500 == 7:
                out.write(b"not json\n")
                continue
            text = (f"Mr. {NAMES[i % len(NAMES)]} (MRN {4471200 + i}) {FINDINGS[i % len(FINDINGS)]}; seen on "
                    f"03/{i % 28 + 1:02d}/2021 by Dr. {NAMES[(i * 7) % len(NAMES)].split()[1]}.")
            out.write((json.dumps({"id": i, "text": text}) + "\n").encode())


def preprocess(source: Path, output: Path, ray: bool) -> tuple[float, float]:
    """(the command's seconds, its own rows/s)."""
    command = [PLAIT, "preprocess", "medical", "--input", str(source), "--output", str(output)]
    if ray:
        command += ["--ray", "--cpus", "2"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=RAY_ENV)
    seconds = time.perf_counter() - started
    said = re.search(r"\(([\d,]+) rows/s\)", done.stderr)
    if done.returncode not in (0, 1) or said is None:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, float(said[1].replace(",", ""))


@contextmanager
def ray_head(cpus: int) -> Iterator[str]:
    """A local Ray head of ``cpus`` logical CPUs for the training runs; its address."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--disable-usage-stats", f"--port={port}", "--node-ip-address=127.0.0.1",
                             f"--num-cpus={cpus}", "--include-dashboard=false"], env=RAY_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # `ray start --block` says nothing when it is up: wait for its GCS port
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise SystemExit("the benchmark's Ray head did not start") from None
                time.sleep(0.5)
        time.sleep(3)  # the raylet registers just after the GCS listens
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's GCS, raylet and workers: its process group
        head.wait(timeout=60)


def train(runs: Path, engine: str, epochs: int, address: str) -> dict:
    name = f"digits-{engine}"
    command = [PLAIT, "train", str(ROOT / "plugins.yaml"), f"run.name={name}", f"run.runs_dir={runs}",
               f"run.epochs={epochs}", f"data.engine={engine}", "data.cpus=1", "plugins.progress=null"]
    done = subprocess.run(command, capture_output=True, text=True, env={**RAY_ENV, "RAY_ADDRESS": address})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((runs / name / "metrics.json").read_text())
    return {"samples_per_s": metrics["samples_per_s"], "accuracy": metrics["test"]["fused"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", default="50000,200000", help="comma-separated line counts")
    parser.add_argument("--epochs", type=int, default=8, help="demo epochs (plugins.yaml has 8)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-preprocess", action="store_true")
    args = parser.parse_args()
    result: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_train:
            runs = folder / "runs"
            with ray_head(3) as address:
                torch_run = train(runs, "torch", args.epochs, address)
                ray_run = train(runs, "ray", args.epochs, address)
            print(f"demo, {args.epochs} epochs: DataLoader {torch_run}, Ray Data {ray_run}", flush=True)
            result.update(ray_data_vs_loader=round(ray_run["samples_per_s"] / torch_run["samples_per_s"], 3),
                          samples_per_s_torch=torch_run["samples_per_s"], samples_per_s_ray=ray_run["samples_per_s"],
                          test_accuracy_torch=torch_run["accuracy"], test_accuracy_ray=ray_run["accuracy"],
                          epochs=args.epochs)
        if not args.skip_preprocess:
            by_lines = {}
            for lines in [int(n) for n in args.lines.split(",")]:
                source = folder / f"notes-{lines}.jsonl"
                clinical_notes(source, lines)
                one_s, one_rate = preprocess(source, folder / f"one-{lines}.jsonl", ray=False)
                ray_s, ray_rate = preprocess(source, folder / f"parts-{lines}", ray=True)
                joined = b"".join(p.read_bytes() for p in sorted((folder / f"parts-{lines}").iterdir()))
                assert joined == (folder / f"one-{lines}.jsonl").read_bytes(), "the parts differ from the one process"
                print(f"preprocess {lines:,} lines: one process {one_s:.1f} s ({one_rate:,.0f} rows/s), "
                      f"--ray {ray_s:.1f} s ({ray_rate:,.0f} rows/s): {one_s / ray_s:.2f}x", flush=True)
                by_lines[lines] = {"preprocess_ray_speedup": round(one_s / ray_s, 3),
                                   "preprocess_rows_per_s_one": one_rate, "preprocess_rows_per_s_ray": ray_rate,
                                   "preprocess_seconds_one": round(one_s, 1), "preprocess_seconds_ray": round(ray_s, 1)}
                source.unlink()
            result.update(by_lines[max(by_lines)], preprocess_lines=max(by_lines), preprocess_by_lines=by_lines)
            if len(by_lines) > 1:  # the rows beyond the smallest input, over the seconds they added: start-up cancels
                small, large = by_lines[min(by_lines)], by_lines[max(by_lines)]
                result["preprocess_ray_speedup_marginal"] = round(
                    (large["preprocess_seconds_one"] - small["preprocess_seconds_one"])
                    / (large["preprocess_seconds_ray"] - small["preprocess_seconds_ray"]), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
