"""Quantization of the default model: size, CPU speed and accuracy, fp32 against int8 (and QAT).

    .venv/bin/python benchmarks/quantize.py [--backend static_int8] [--runs-dir DIR]

In this process (Ray Train's local mode): trains plugins.yaml's model (fp32, 8 epochs); `plait compress`
quantizes it (post-training, calibrated on 8 validation batches); fine-tunes it one epoch with torchao's
fake quantization (`quantize: {qat: true}`, `run.init_from` the fp32 run, lr 5e-5) and compresses that
the same way. Latency: one thread, batch 1 and 32 of real test samples, the fp32 and the int8 model
measured alternately, 5 rounds, median of the per-round ratios. The same is measured on a wider
configuration (a 768-wide, 6-layer text encoder: BERT-base width; untrained: speed only), where Linear
layers dominate.
`size_ratio`: bytes of the quantized layers' fp32 weights over the bytes of what replaces them
(int8 values, scales, zero points, biases), from the saved state dicts.

Last line: JSON {"size_ratio", "speedup_bs32", "speedup_bs1", "acc_fp32", "acc_int8", "acc_qat",
"wide_speedup_bs32", "wide_speedup_bs1", "backend", "engine"}.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch

from plait.core.config import load_config
from plait.core.data import build_dataset, make_loader
from plait.core.model import build_model, cpu_latency_ms
from plait.core.runs import load_run, prepare
from plait.launch import ray_runner
from plait.launch.compress import compress_run
from plait.plugins.quantize import QuantizeOptions, pick_engine, quantize, quantized_layers

ROOT = Path(__file__).resolve().parents[1]
WIDE_TEXT = {"hidden": 768, "layers": 6, "heads": 12}  # BERT-base width, 6 layers


def train(raw: dict, name: str, runs_dir: str, **run: object) -> Path:
    raw = copy.deepcopy(raw)
    raw["run"].update(name=name, runs_dir=runs_dir, **run)
    raw.setdefault("scaling", {})["num_workers"] = 0
    for noisy in ("progress", "curves"):
        raw["plugins"].pop(noisy, None)
    config, _ = prepare(raw, f"benchmarks/quantize.py ({name})")
    ray_runner.train(config, raw)
    return Path(runs_dir) / name


def compress(run_dir: Path, name: str, backend: str, tmp: Path) -> dict:
    out = run_dir.parent / name
    spec = tmp / f"{name}.yaml"
    spec.write_text(json.dumps({"run": {"name": name}, "plugins": {"quantize": {"backend": backend}}}))
    if (out / "report.md").is_file():  # made by an earlier run of this benchmark (--runs-dir)
        return {"run_dir": str(out)}
    return compress_run(run_dir, str(spec))


def speedups(fp32: torch.nn.Module, int8: torch.nn.Module, batch: dict, rounds: int = 5) -> tuple[float, float]:
    """Median over rounds of fp32 time / int8 time, at batch 32 and 1, measured alternately."""
    ratios: dict[int, list[float]] = {32: [], 1: []}
    for _ in range(rounds):
        for size in ratios:
            ratios[size].append(cpu_latency_ms(fp32, batch, size) / cpu_latency_ms(int8, batch, size))
    return statistics.median(ratios[32]), statistics.median(ratios[1])


def size_ratio(fp32: torch.nn.Module, int8: torch.nn.Module) -> float:
    layers = quantized_layers(int8)

    def nbytes(state: dict) -> int:
        return sum(t.numel() * t.element_size() for k, t in state.items()
                   if any(k.startswith(layer + ".") for layer in layers))

    return nbytes(fp32.state_dict()) / nbytes(int8.state_dict())


def wide(base: dict, backend: str, batch: dict) -> tuple[float, float]:
    raw = copy.deepcopy(base)
    raw["plugins"]["text_encoder"] = {**raw["plugins"]["text_encoder"], **WIDE_TEXT}
    config, plugins = prepare(raw, "benchmarks/quantize.py (wide)")
    torch.manual_seed(0)
    fp32 = build_model(plugins, config, ("text", "image", "audio"), 10).eval()
    calibration = [batch]
    options = QuantizeOptions(backend=backend)
    engine, _ = pick_engine(fp32, options, calibration)
    int8 = copy.deepcopy(fp32)
    quantize(int8, options, engine, calibration)
    return speedups(fp32, int8, batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="static_int8", choices=["dynamic_int8", "static_int8"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--qat-lr", type=float, default=5e-5, help="learning rate of the QAT fine-tuning epoch")
    parser.add_argument("--runs-dir", help="keep the run folders here (default: a temporary folder); "
                        "finished runs and compressions found there are reused")
    args = parser.parse_args()
    base = load_config(ROOT / "plugins.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.runs_dir or tmp
        fp32_dir = train(base, "fp32", runs_dir, epochs=args.epochs)
        int8_dir = Path(compress(fp32_dir, f"fp32-{args.backend}", args.backend, Path(tmp))["run_dir"])
        qat_raw = copy.deepcopy(base)
        qat_raw["plugins"]["quantize"] = {"qat": True}
        qat_dir = train(qat_raw, "qat", runs_dir, epochs=1, lr=args.qat_lr, warmup_steps=0, init_from=str(fp32_dir))
        qat_int8_dir = Path(compress(qat_dir, f"qat-{args.backend}", args.backend, Path(tmp))["run_dir"])

        accuracy = {}
        for name, folder in (("fp32", fp32_dir), ("int8", int8_dir), ("qat", qat_int8_dir)):
            accuracy[name] = json.loads((folder / "metrics.json").read_text())["test"]["fused"]["accuracy"] \
                if (folder / "metrics.json").is_file() else _fused_accuracy(folder)
        config, plugins, fp32_state = load_run(fp32_dir)
        _, _, int8_state = load_run(int8_dir)
        test = build_dataset(plugins, config, "test")
        batch = next(iter(make_loader(test, 32, False, 0, 0)))
        speed32, speed1 = speedups(fp32_state.model, int8_state.model, batch)
        wide32, wide1 = wide(base, args.backend, batch)
        result = {"size_ratio": round(size_ratio(fp32_state.model, int8_state.model), 3),
                  "speedup_bs32": round(speed32, 3), "speedup_bs1": round(speed1, 3),
                  "acc_fp32": accuracy["fp32"], "acc_int8": accuracy["int8"], "acc_qat": accuracy["qat"],
                  "wide_speedup_bs32": round(wide32, 3), "wide_speedup_bs1": round(wide1, 3),
                  "backend": args.backend, "engine": config_engine(int8_dir)}
        print(json.dumps(result))


def _fused_accuracy(folder: Path) -> float:
    from plait.launch.evaluate import evaluate_run

    return evaluate_run(folder)["accuracy"]


def config_engine(folder: Path) -> str:
    return load_config(folder / "config.yaml")["plugins"]["quantize"]["engine"]


if __name__ == "__main__":
    main()
