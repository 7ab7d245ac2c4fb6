"""Mixture of experts: router invariants, capacity, losses, gradients, and the plugin in a run."""
import json

import pytest
import torch
from conftest import TINY_PLUGINS

from plait.core.errors import ConfigError
from plait.core.runs import load
from plait.launch.ray_runner import train
from plait.plugins.moe import MoELayer, MoEOptions, moe_layers, settle_step


def layer(**options) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(16, 32, MoEOptions(**options))


def dense_reference(moe: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Every token through every expert, weighted by the gates the router gives it (no capacity)."""
    probs = torch.softmax(x @ moe.router.weight.t(), dim=-1)
    gates, chosen = probs.topk(moe.options.top_k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True) if moe.options.top_k > 1 else gates
    hidden = torch.nn.functional.gelu(torch.einsum("td,edh->eth", x, moe.w1) + moe.b1)
    outputs = torch.einsum("eth,ehd->etd", hidden, moe.w2) + moe.b2  # [E, T, D]
    picked = outputs.permute(1, 0, 2).gather(1, chosen.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return (picked * gates.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_top_k_equals_the_dense_computation_with_renormalised_gates(top_k):
    moe = layer(experts=4, top_k=top_k, capacity_factor=None).eval()
    x = torch.randn(64, 16)
    torch.testing.assert_close(moe(x), dense_reference(moe, x), rtol=1e-5, atol=1e-5)
    assert float(moe.stats["dropped"]) == 0.0


def test_capacity_is_respected_and_dropped_tokens_are_counted():
    moe = layer(experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] += 1.0  # every token prefers expert 0 ...
    x = torch.randn(40, 16).abs()  # ... strongly (positive inputs)
    out = moe(x)
    capacity = 10  # 1.0 x 40 tokens x top-1 / 4 experts
    served = (out.abs().sum(-1) > 0).sum().item()
    assert served == capacity  # the rest passed through nothing (zeros: the residual carries them)
    assert float(moe.stats["dropped"]) == pytest.approx(1 - capacity / 40)
    assert moe.stats["load"].tolist() == [1.0, 0.0, 0.0, 0.0]  # loads count assignments before dropping


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_gates_sum_to_one_when_renormalised(top_k):
    moe = layer(experts=4, top_k=top_k, capacity_factor=None).eval()
    with torch.no_grad():  # identical experts: the output is one expert's times the sum of the gates
        for w in (moe.w1, moe.b1, moe.w2, moe.b2):
            w.copy_(w[:1].expand_as(w))
    x = torch.randn(32, 16)
    one = torch.nn.functional.gelu(x @ moe.w1[0] + moe.b1[0]) @ moe.w2[0] + moe.b2[0]
    probs = torch.softmax(x @ moe.router.weight.t(), -1)
    expected = one * (probs.max(-1, keepdim=True).values if top_k == 1 else 1.0)  # top-1: the raw gate (Switch)
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5)


def test_aux_loss_equals_alpha_for_perfectly_balanced_routing():
    moe = layer(experts=4, top_k=1, aux_loss_weight=0.05)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = torch.eye(4) * 30  # token t goes to expert t % 4, almost surely
    x = torch.zeros(400, 16)
    x[torch.arange(400), torch.arange(400) % 4] = 1.0
    moe(x)
    assert moe.stats["load"].tolist() == [0.25] * 4
    # P_i is ~(1 - 3e-13, 1e-13...) per token, averaging 1/4 per expert
    assert moe.losses["moe_aux"].item() == pytest.approx(0.05, rel=1e-6)
    assert moe.losses["moe_z"].item() > 0


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "expert_choice"])
def test_gradients_reach_router_and_experts(router):
    moe = layer(experts=4, top_k=1, router=router)
    x = torch.randn(32, 16, requires_grad=True)
    loss = moe(x).pow(2).mean() + sum(moe.losses.values())
    loss.backward()
    for name in ("router.weight", "w1", "w2", "b1", "b2"):
        grad = dict(moe.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_expert_choice_gives_every_expert_the_same_load():
    moe = layer(experts=4, router="expert_choice", capacity_factor=1.0)
    moe(torch.randn(64, 16))
    assert moe.stats["load"].tolist() == [0.25] * 4
    assert 0.0 <= float(moe.stats["dropped"]) < 1.0  # tokens no expert chose


def test_bias_balancing_moves_routing_towards_uniform_without_an_aux_loss():
    moe = layer(experts=4, balance="bias", bias_update_rate=0.05)
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # skewed towards expert 0
    x = torch.randn(256, 16).abs()
    moe(x)
    first = max(moe.stats["load"].tolist())
    for _ in range(60):  # one optimizer step each: the bias moves once a step
        settle_step([moe])
        moe(x)
    assert "moe_aux" not in moe.losses
    assert max(moe.stats["load"].tolist()) < first
    assert moe.balance_bias[0] < 0  # the over-loaded expert's bias went down


def test_a_modality_aware_router_routes_the_same_vector_by_its_modality():
    torch.manual_seed(0)
    moe = MoELayer(16, 32, MoEOptions(experts=4, modality_aware=True), modalities=3)
    x = torch.randn(1, 16).expand(3, 16)  # one vector, seen as modalities 0, 1 and 2
    moe(x, torch.arange(3))
    routed_by_modality = moe.stats["load"].clone()
    moe(x, torch.zeros(3, dtype=torch.long))  # the same modality three times: one expert
    assert moe.stats["load"].max() == 1.0
    assert routed_by_modality.max() < 1.0  # the modality moved at least one token elsewhere


@pytest.mark.parametrize("options, expected", [
    ({"experts": 2, "top_k": 3}, "top_k \\(3\\) is larger than experts \\(2\\)"),
    ({"experts": 0}, "plugins.moe.experts"),
    ({"capacity_factor": 0}, "plugins.moe.capacity_factor"),
])
def test_bad_options_are_clear_errors(write_config, options, expected):
    path = write_config({**TINY_PLUGINS, "moe": options})
    with pytest.raises(ConfigError, match=expected):
        load(str(path), [])


@pytest.mark.slow
def test_a_run_with_moe_fusion_logs_expert_metrics_and_draws_their_load(write_config, tmp_path):
    path = write_config({**TINY_PLUGINS, "moe": {"experts": 4, "targets": ["fusion", "text"],
                                                 "modality_aware": True}}, name="moe", log_every=1)
    config, _plugins = load(str(path), [])
    results = train(config, json.loads(json.dumps(config.to_dict())))
    run_dir = tmp_path / "runs" / "moe"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all("moe_aux" in r and "moe_z" in r and "moe0_dropped" in r for r in train_rows)
    layers = {k.split("_")[0] for k in train_rows[-1] if k.startswith("moe") and k[3].isdigit()}
    assert len(layers) == 2  # the fusion layer and the text encoder's layer
    loads = [train_rows[-1][f"moe0_load{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0)
    assert (run_dir / "expert_load.png").stat().st_size > 10_000
    assert results["test"]["fused"]["samples"] == 64


def lm_config(write_config, name: str, moe: dict | None, **run):
    lm = {"seq_len": 16, "dim": 32, "layers": 1, "heads": 2, "ffn": 64, "max_articles": 200}
    plugins = {"wiki_lm": lm, **({"moe": moe} if moe is not None else {})}
    return write_config(plugins, name=name, **{"max_steps": 6, "batch_size": 8, "eval_batch_size": 64, **run})


@pytest.mark.slow
def test_moe_language_model_reports_perplexity_and_resumes_exactly(write_config, tmp_path):
    from safetensors.torch import load_file

    from plait.core import checkpoint
    from plait.core.loop import fit

    moe = {"experts": 4, "top_k": 2, "targets": ["transformers"], "balance": "bias"}
    config, plugins = load(str(lm_config(write_config, "lm-whole", moe, checkpoint_every=2)), [])
    whole = fit(config, plugins)
    val = whole.metrics["val"]
    assert val["perplexity"] == pytest.approx(torch.tensor(val["loss"]).exp().item(), rel=1e-6)
    assert val["bits_per_byte"] == pytest.approx(val["loss"] / 0.6931471805599453, rel=1e-6)
    assert val["perplexity"] < 256  # better than uniform over bytes after 6 steps
    assert len(moe_layers(whole.model)) == 1

    with pytest.raises(RuntimeError, match="stopped at step 5"):  # the newest checkpoint: step 4
        fit(*load(str(lm_config(write_config, "lm-split", moe, checkpoint_every=2)), ["plugins.stop_at={step: 5}"]))
    resumed = fit(*load(str(lm_config(write_config, "lm-split", moe, checkpoint_every=2)), []))
    a = load_file(str(checkpoint.latest(whole.run_dir / "checkpoints") / "model.safetensors"))
    b = load_file(str(checkpoint.latest(resumed.run_dir / "checkpoints") / "model.safetensors"))
    assert any("balance_bias" in k for k in a)  # the balancing bias is saved and restored
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_expert_choice_is_refused_in_a_causal_model(write_config):
    from plait.core.loop import fit

    config, plugins = load(str(lm_config(write_config, "lm-ec", {"router": "expert_choice",
                                                                    "targets": ["transformers"]})), [])
    with pytest.raises(ConfigError, match="expert_choice .* encoders only"):
        fit(config, plugins)
