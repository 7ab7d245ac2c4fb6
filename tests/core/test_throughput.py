"""Throughput and efficiency: FLOPs per sample against a hand count, MFU against the measured
peak, the GPU table, energy meters read from real (sysfs-shaped) files, and what a run's rows
and metrics.json carry."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from plait.core.loop import fit
from plait.core.runs import load
from plait.core.throughput import EnergyMeter, count_flops, device_peak, energy_figures, gpu_peak
from plait.testing import train_steps, write_config

pytestmark = pytest.mark.timeout(300)


class LinearAttention(nn.Module):
    """One self-attention block: a QKV projection, scaled dot-product attention, an output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = (part.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)
                   for part in self.qkv(x).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        return self.out(attended)


def test_flops_of_a_linear_attention_step_match_a_hand_count():
    n, t, d, heads = 4, 16, 64, 4
    model, x = LinearAttention(d, heads), torch.randn(n, t, d)
    flops, _ = count_flops(lambda: model(x).square().mean().backward())
    projections = 2 * n * t * (d * 3 * d + d * d)  # multiply-adds of the two linears, forward
    attention = 2 * (2 * n * t * t * d)  # q @ k^T and softmax @ v over all heads, forward
    forward = projections + attention
    # backward: twice the forward (input and weight gradients), except that x needs no gradient
    by_hand = forward + 2 * forward - 2 * n * t * d * 3 * d
    assert flops == pytest.approx(by_hand, rel=0.05)


def test_the_gpu_table_takes_the_most_specific_name_and_says_when_it_has_none():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16").tflops == 989.4
    pcie = gpu_peak("NVIDIA H100 PCIe", "bf16")
    assert pcie.tflops == 756.5 and "H100 PCIe" in pcie.source
    assert gpu_peak("NVIDIA A10G", "fp32").tflops == 31.2
    unknown = gpu_peak("Some Future GPU", "bf16")
    assert unknown.tflops is None and "run.peak_tflops" in unknown.source
    assert gpu_peak("Tesla V100-SXM2-16GB", "bf16").tflops is None  # no bf16 on Volta


def test_the_cpu_peak_is_measured_unless_given():
    measured = device_peak(torch.device("cpu"), "fp32", None)
    assert measured.tflops is not None and measured.tflops > 0 and measured.source.startswith("measured")
    given = device_peak(torch.device("cpu"), "fp32", 2.5)
    assert given.tflops == 2.5 and given.source == "run.peak_tflops"


def _rapl(folder, joules: dict[str, float], wrap_j: float = 1000.0):
    for package, value in joules.items():
        domain = folder / package
        domain.mkdir(parents=True, exist_ok=True)
        (domain / "energy_uj").write_text(str(int(value * 1e6)))
        (domain / "max_energy_range_uj").write_text(str(int(wrap_j * 1e6)))


def test_rapl_counters_are_read_once_per_meter_and_wrap_around(tmp_path, monkeypatch):
    monkeypatch.setattr(EnergyMeter, "RAPL", tmp_path)
    _rapl(tmp_path, {"intel-rapl:0": 100.0, "intel-rapl:1": 990.0})
    (tmp_path / "intel-rapl:0" / "intel-rapl:0:0").mkdir()  # a sub-domain (core): inside its package's figure
    meter = EnergyMeter(torch.device("cpu"))
    assert meter.source is not None and meter.source.startswith("RAPL")
    start = meter.read()
    _rapl(tmp_path, {"intel-rapl:0": 160.0, "intel-rapl:1": 20.0})  # package 1 wrapped at 1000 J
    end = meter.read()
    # two workers on this host read the same counters: each meter counts once
    figures = energy_figures(meter, [start, start], [end, end], samples=300)
    assert figures["energy_j"] == pytest.approx(60.0 + 30.0)
    assert figures["energy_j_per_sample"] == pytest.approx(90.0 / 300)


def test_without_a_readable_meter_energy_is_null_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(EnergyMeter, "RAPL", tmp_path / "absent")
    meter = EnergyMeter(torch.device("cpu"))
    figures = energy_figures(meter, [meter.read()], [meter.read()], samples=10)
    assert figures["energy_j"] is None and figures["energy_j_per_sample"] is None
    assert "no power meter" in figures["energy_reason"]


def test_every_row_and_metrics_json_carry_speed_flops_mfu_memory_and_energy(tmp_path):
    state = train_steps(tmp_path, steps=3)
    rows = [json.loads(line) for line in (state.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 3
    for row in train:
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > row["samples_per_s"]  # texts of several tokens
        assert 0 < row["mfu"] <= 1 and row["achieved_tflops"] > 0
        assert [set(worker) for worker in row["peak_memory_mb"]] == [{"rss"}] and row["peak_memory_mb"][0]["rss"] > 0
    results = json.loads((state.run_dir / "metrics.json").read_text())
    for key in ("flops_per_sample", "achieved_tflops", "mfu", "peak_memory_mb", "energy_j_per_sample"):
        assert key in results
    assert results["flops_per_sample"] > 1e6 and 0 < results["mfu"] <= 1
    assert results["peak_tflops_source"].startswith("measured")
    assert results["mfu"] == pytest.approx(results["achieved_tflops"] / results["peak_tflops"], rel=1e-3)
    if results["energy_j_per_sample"] is None:
        assert results["energy_reason"]
    else:
        assert results["energy_j_per_sample"] >= 0 and results["energy_source"]


def test_a_given_peak_is_what_mfu_divides_by(tmp_path):
    state = train_steps(tmp_path, steps=2, peak_tflops=0.5)
    results = state.metrics["run"]
    assert results["peak_tflops"] == 0.5 and results["peak_tflops_source"] == "run.peak_tflops"
    assert results["mfu"] == pytest.approx(results["achieved_tflops"] / 0.5, rel=1e-3)


def test_a_compiled_run_counts_the_same_flops_on_its_second_batch(tmp_path):
    lm = {"wiki_lm": {"seq_len": 16, "dim": 32, "layers": 2, "heads": 2, "ffn": 64, "max_articles": 40}}
    eager = fit(*load(write_config(tmp_path, lm, name="eager", max_steps=3, batch_size=4)))
    compiled = fit(*load(write_config(tmp_path, lm, name="compiled", max_steps=3, batch_size=4, compile=True)))
    assert compiled.metrics["run"]["flops_per_sample"] == eager.metrics["run"]["flops_per_sample"] > 0
    assert "second" in compiled.metrics["run"]["flops_counted"]
    row = eager.metrics["train"]  # a language model reads seq_len tokens a sample
    assert row["tokens_per_s"] == pytest.approx(16 * row["samples_per_s"])


def test_measuring_the_cpu_peak_draws_nothing_from_the_runs_random_numbers():
    from plait.core.throughput import _measured_cpu_peak

    _measured_cpu_peak.cache_clear()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    device_peak(torch.device("cpu"), "fp32", None)  # measured now (cache cleared)
    assert torch.equal(torch.rand(3), expected)
