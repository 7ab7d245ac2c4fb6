"""What training achieves against what the hardware could: model FLOPs per sample, achieved TFLOP/s
and MFU against the device's peak, and the energy the devices report.

Every figure says where it came from, and one that cannot be measured is None with a reason: a
GPU whose peak is not in the table, a machine whose power meter cannot be read. None is invented.
"""
from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

__all__ = ["GPU_PEAK_TFLOPS", "EnergyMeter", "Peak", "count_flops", "device_peak", "efficiency",
           "energy_figures", "gpu_peak"]

log = logging.getLogger("plait")
T = TypeVar("T")
P = ParamSpec("P")

#: Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by a part of
#: ``torch.cuda.get_device_name`` (the longest matching key wins) and by the run's precision.
#: fp32 is plain FP32: torch's default matmul precision ("highest") does not use TF32.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}

_MATMUL_SIDE = 1024  # the CPU's peak: the best of a few square matmuls of this side
_MATMUL_REPEATS = 4


@dataclass(frozen=True)
class Peak:
    """One device's peak in TFLOP/s at the run's precision, and where the figure came from."""

    tflops: float | None
    source: str


def count_flops(run_step: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> tuple[int, T]:
    """(the FLOPs of ``run_step(*args, **kwargs)``, what it returned): a forward and backward on a real batch,
    counted by torch's ``FlopCounterMode`` from the shapes of the matmuls, convolutions and
    attention it runs (the elementwise rest is not counted, as in every MFU figure)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
        return int(sdpa_flop_count(query, key, value))  # type: ignore[no-untyped-call]

    def backward(grad: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
        return int(sdpa_backward_flop_count(grad, query, key, value))  # type: ignore[no-untyped-call]

    aten = torch.ops.aten
    cpu_attention = {  # torch counts the CUDA attention kernels but not the CPU's, which take the same shapes
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter:
        result = run_step(*args, **kwargs)
    return int(counter.get_total_flops()), result


def efficiency(flops_per_sample: float | None, samples_per_s: float, peak_tflops: float | None) -> dict[str, Any]:
    """Achieved TFLOP/s of all workers together and MFU (their fraction of the workers' summed peak)."""
    if flops_per_sample is None:
        return {}
    achieved = flops_per_sample * samples_per_s / 1e12
    # six significant digits, not decimals: a small model on a CPU achieves a thousandth of a TFLOP/s or less
    figures: dict[str, Any] = {"achieved_tflops": float(f"{achieved:.6g}")}
    figures["mfu"] = float(f"{achieved / peak_tflops:.6g}") if peak_tflops else None
    return figures


def device_peak(device: torch.device, precision: str, given: float | None) -> Peak:
    """This worker's device peak: ``run.peak_tflops`` when given, else the GPU table, else (on
    the CPU) measured once with a matmul at the run's precision on the threads the run uses."""
    if given is not None:
        return Peak(given, "run.peak_tflops")
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision)
    if device.type != "cpu":
        return Peak(None, f"no peak known for a {device.type} device: give run.peak_tflops")
    return _measured_cpu_peak(precision, torch.get_num_threads())


def gpu_peak(name: str, precision: str) -> Peak:
    """The data-sheet peak of the GPU ``torch.cuda.get_device_name`` calls ``name``."""
    matches = sorted((key for key in GPU_PEAK_TFLOPS if key in name), key=len, reverse=True)
    figure = GPU_PEAK_TFLOPS[matches[0]].get(precision) if matches else None
    if figure is None:
        return Peak(None, f"no peak for {name} at {precision} in plait's table: give run.peak_tflops")
    return Peak(figure, f"data sheet: {matches[0]} {precision}")


@functools.cache
def _measured_cpu_peak(precision: str, threads: int) -> Peak:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision, torch.float32)
    own = torch.Generator().manual_seed(0)  # not the global generator: a run's draws must not depend on this
    a = torch.randn(_MATMUL_SIDE, _MATMUL_SIDE, dtype=dtype, generator=own)
    b = torch.randn(_MATMUL_SIDE, _MATMUL_SIDE, dtype=dtype, generator=own)
    torch.mm(a, b)  # warm-up: the first call picks its kernel
    best = float("inf")
    for _ in range(_MATMUL_REPEATS):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    tflops = 2 * _MATMUL_SIDE**3 / best / 1e12
    return Peak(round(tflops, 4), f"measured: {_MATMUL_SIDE}x{_MATMUL_SIDE} {precision} matmul on this CPU, "
                                  f"{threads} thread(s)")


class EnergyMeter:
    """The energy counters this worker can read: NVML's per-GPU total (Volta and newer) on CUDA,
    RAPL's per-package counters (``/sys/class/powercap``) on the CPU. Each reading is keyed by
    what it measures (a GPU's UUID, a host's package), so that workers sharing a meter count it once."""

    RAPL = Path("/sys/class/powercap")

    def __init__(self, device: torch.device) -> None:
        self.reason: str | None = None
        self.source: str | None = None
        self._gpu: Any = None
        self._rapl: list[tuple[Path, float]] = []  # (energy_uj file, the counter's wrap-around range)
        if device.type == "cuda":
            self._open_nvml(device)
        else:
            self._open_rapl()

    def _open_nvml(self, device: torch.device) -> None:
        try:
            import pynvml
        except ImportError:
            self.reason = "no NVML: the nvidia-ml-py package is not installed"
            return
        try:
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except pynvml.NVMLError as exc:
            self.reason = f"NVML cannot read this GPU's energy counter: {exc}"
            return
        self._gpu = (pynvml, handle, pynvml.nvmlDeviceGetUUID(handle))
        self.source = "NVML total energy (per GPU)"

    def _open_rapl(self) -> None:
        domains = sorted(self.RAPL.glob("intel-rapl:[0-9]*")) if self.RAPL.is_dir() else []
        packages = [d for d in domains if d.name.count(":") == 1]  # packages; their sub-domains are inside them
        for domain in packages:
            try:
                (domain / "energy_uj").read_text()
                wrap = float((domain / "max_energy_range_uj").read_text())
            except OSError:
                continue
            self._rapl.append((domain / "energy_uj", wrap))
        if self._rapl:
            self.source = "RAPL package energy (per CPU package)"
        elif packages:
            self.reason = (f"RAPL counters under {self.RAPL} are not readable by this user "
                           "(most kernels restrict energy_uj to root)")
        else:
            self.reason = f"no power meter on this machine: no NVML GPU, no RAPL counters under {self.RAPL}"

    def read(self) -> dict[str, float]:
        """{what is measured: joules so far}; empty when nothing can be read."""
        if self._gpu is not None:
            pynvml, handle, uuid = self._gpu
            return {f"gpu {uuid}": pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0}
        host = socket.gethostname()
        return {f"{host} {path.parent.name}": float(path.read_text()) / 1e6 for path, _ in self._rapl}

    def wrap_j(self, key: str) -> float:
        """The range after which a counter starts again at 0 (RAPL's wrap), in joules."""
        for path, wrap in self._rapl:
            if key.endswith(path.parent.name):
                return wrap / 1e6
        return float("inf")


def energy_figures(meter: EnergyMeter, started: list[dict[str, float]], ended: list[dict[str, float]],
                   samples: int) -> dict[str, Any]:
    """metrics.json's energy: joules used between every worker's ``started`` and ``ended`` readings,
    each meter once however many workers read it, and joules per training sample; or None and why."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for readings, into in ((started, first), (ended, last)):
        for worker in readings:
            for key, value in worker.items():
                into.setdefault(key, value)  # workers sharing a meter read (nearly) the same counter
    used = 0.0
    for key, end in last.items():
        delta = end - first.get(key, end)
        used += delta if delta >= 0 else delta + meter.wrap_j(key)
    if not last:
        return {"energy_j": None, "energy_j_per_sample": None, "energy_reason": meter.reason}
    return {"energy_j": round(used, 3), "energy_j_per_sample": round(used / max(samples, 1), 6),
            "energy_source": f"{meter.source}: {len(last)} meter(s)"}
