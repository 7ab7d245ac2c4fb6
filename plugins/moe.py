"""Sparse mixture-of-experts feed-forward blocks for the fusion transformer and the text encoder.

Routers: top-k softmax (k=1 Switch, k=2 GShard/Mixtral with renormalised gates), noisy top-k
(Shazeer et al. 2017), expert choice (Zhou et al. 2022; every expert picks its tokens, so it
sees the whole sequence: encoders only), and auxiliary-loss-free balancing with a per-expert
bias on the routing scores (DeepSeek-V3). Router math runs in fp32.

Dispatch is vectorised: assignments are grouped by expert with one stable sort (which also ranks
them within their expert), run through each expert's two matmuls on exactly its rows (a loop
over experts, none over tokens, no padding to the capacity) and scattered back, weighted by
their gates. With ``capacity_factor`` set, assignments past an
expert's capacity are dropped (first choices before second ones); ``capacity_factor: null`` is
dropless (capacity = the busiest expert's load).

Expert parallelism (``scaling.expert_parallel``): each worker of the expert-parallel group holds
``experts / ep`` of every layer's experts (DTensors split by expert, so a checkpoint holds all of
them), routes its own tokens as above, and an all-to-all sends each kept assignment to the worker
of its expert and brings the result back (Megatron's and torchtitan's token dispatch). Capacity and
dropping are decided on each worker's tokens, as under data parallelism.

Losses (``plait_loss_terms``): the Switch load-balancing loss ``alpha * N * sum_i f_i * P_i``
(``f_i`` the fraction of assignments to expert i, ``P_i`` its mean router probability; alpha for
perfectly uniform routing) and the ST-MoE router z-loss. Metrics at every log step: per-expert
load, dropped fraction, router entropy, dead experts, each over every worker's tokens (one all-reduce per
step, which also keeps the DeepSeek-V3 biases equal); ``expert_load.png`` in the run folder.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from plait.core.config import Options
from plait.core.errors import ConfigError
from plait.core.hookspecs import hookimpl
from plait.core.parallel import local_tensor

ROUTERS = ("topk", "noisy_topk", "expert_choice")


class MoEOptions(Options):
    experts: int = Field(4, ge=1, description="experts per MoE layer")
    top_k: int = Field(1, ge=1, description="experts per token (top-k routers)")
    router: Literal["topk", "noisy_topk", "expert_choice"] = "topk"
    capacity_factor: float | None = Field(1.25, gt=0, description="expert capacity = factor x tokens x k / "
                                          "experts; null: dropless")
    balance: Literal["aux_loss", "bias"] = Field("aux_loss", description="aux_loss (Switch) or bias "
                                                 "(DeepSeek-V3, auxiliary-loss-free)")
    aux_loss_weight: float = Field(0.01, ge=0, description="alpha of the load-balancing loss")
    z_loss_weight: float = Field(0.001, ge=0)
    bias_update_rate: float = Field(0.001, gt=0, description="DeepSeek-V3's u: bias step per batch")
    expert_hidden: int | None = Field(None, ge=1, description="an expert's hidden width (default: the "
                                      "replaced feed-forward block's, so top-1 keeps the active parameters)")
    targets: list[Literal["fusion", "text", "audio", "transformers"]] = Field(
        ["fusion"], min_length=1, description="fusion, text, or transformers: every nn.TransformerEncoder in the "
        "model (a task plugin's causal language model)")
    modality_aware: bool = Field(False, description="the router also sees each token's modality")

    @model_validator(mode="after")
    def _consistent(self) -> MoEOptions:
        if self.router != "expert_choice" and self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) is larger than experts ({self.experts})")
        return self


class MoELayer(nn.Module):
    """A feed-forward block of ``experts`` two-layer MLPs and a router. ``forward(x)`` takes
    [..., dim] tokens; ``modality`` ([...] ids, optional) feeds a modality-aware router."""

    #: the weights expert parallelism splits by expert (``plait plan`` counts 1/ep of them per worker)
    plait_expert_parameters = ("w1", "b1", "w2", "b2")

    def __init__(self, dim: int, hidden: int, options: MoEOptions, activation: str = "gelu",
                 dropout: float = 0.0, modalities: int = 0) -> None:
        super().__init__()
        self.options = options
        experts = options.experts
        self.router = nn.Linear(dim, experts, bias=False)
        self.noise = nn.Linear(dim, experts, bias=False) if options.router == "noisy_topk" else None
        self.modality_embedding = nn.Embedding(modalities, dim) if options.modality_aware and modalities else None
        self.balance_bias: torch.Tensor
        self.register_buffer("balance_bias", torch.zeros(experts))  # DeepSeek-V3; moved by a rule, not by SGD
        scale1, scale2 = 1 / math.sqrt(dim), 1 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(experts, dim, hidden).uniform_(-scale1, scale1))
        self.b1 = nn.Parameter(torch.zeros(experts, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim).uniform_(-scale2, scale2))
        self.b2 = nn.Parameter(torch.zeros(experts, 1, dim))
        self.activation = F.relu if activation == "relu" else F.gelu
        self.dropout = nn.Dropout(dropout)
        self.losses: dict[str, torch.Tensor] = {}  # of the last forward, for plait_loss_terms
        self.stats: dict[str, torch.Tensor] = {}  # of the last forward, detached
        self.window: dict[str, torch.Tensor] = {}  # optimizer steps since the last metrics row, summed
        self.pending: dict[str, torch.Tensor] = {}  # this step's training forwards, summed (see settle_step)
        self.expert_mesh: Any = None  # set by plait_expert_parallel

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        router_in = tokens
        if self.modality_embedding is not None and modality is not None:
            router_in = tokens + self.modality_embedding(modality.reshape(-1))
        with torch.autocast(device_type=x.device.type, enabled=False):  # router math in fp32
            logits = F.linear(router_in.float(), self.router.weight.float())
            if self.noise is not None and self.training:
                noise_std = F.softplus(F.linear(router_in.float(), self.noise.weight.float()))
                logits = logits + torch.randn_like(logits) * noise_std
            probs = logits.softmax(dim=-1)
        if self.options.router == "expert_choice":
            out, assigned, kept = self._expert_choice(tokens, probs)
        else:
            out, assigned, kept = self._token_choice(tokens, logits, probs)
        self._account(logits, probs, assigned, kept)
        return out.reshape(shape)

    def _capacity(self, assignments: int, loads: torch.Tensor) -> int:
        factor = self.options.capacity_factor
        if factor is None:  # dropless: room for the busiest expert
            return max(1, int(loads.max()))
        return max(1, math.ceil(factor * assignments / self.options.experts))

    def _token_choice(self, tokens: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor):
        experts, k = self.options.experts, self.options.top_k
        scores = logits + self.balance_bias if self.options.balance == "bias" else logits  # bias: selection only
        choice = scores.topk(k, dim=-1).indices  # [T, k]
        gates = probs.gather(1, choice)
        if k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        # k-major order: every token's first choice is placed before any second choice
        expert = choice.t().reshape(-1)
        token = torch.arange(tokens.shape[0], device=tokens.device).repeat(k)
        gate = gates.t().reshape(-1)
        # one stable sort groups the assignments by expert, first choices first within each: an assignment's
        # rank within its expert is then its place in the sorted order less where its expert starts
        order = torch.argsort(expert, stable=True)
        loads = torch.bincount(expert, minlength=experts)
        capacity = self._capacity(expert.numel(), loads)
        rows, gate_rows = token[order], gate[order]
        if capacity >= int(loads.max()):  # nothing to drop (always so when dropless)
            kept, counts = torch.ones_like(expert, dtype=torch.bool), loads
        else:
            starts = loads.cumsum(0) - loads
            kept = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]] < capacity
            rows, gate_rows, counts = rows[kept], gate_rows[kept], loads.clamp(max=capacity)
        # each expert runs on exactly its rows: no padding to the capacity, so top-1 costs what the dense block does
        done = self._run_experts(tokens[rows], counts.tolist())
        out = done.new_zeros(tokens.shape).index_add(0, rows, done * gate_rows.unsqueeze(-1).to(done.dtype))
        return out, loads, kept

    def _run_experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``rows`` grouped by expert, ``counts[e]`` of them for expert e, through their experts (on the
        workers that hold them, under expert parallelism)."""
        if self.expert_mesh is not None:
            return self._dispatch(rows, counts)
        return self._local_experts(rows, counts)

    def _local_experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``rows`` grouped by this worker's experts, through them."""
        # unbind, not w1[e]: each indexing's backward would write a zero tensor the size of all experts
        w1, w2 = local_tensor(self.w1), local_tensor(self.w2)
        b1, b2 = local_tensor(self.b1).squeeze(1), local_tensor(self.b2).squeeze(1)
        done = []
        for part, w_in, b_in, w_out, b_out in zip(rows.split(counts), w1.unbind(0), b1.unbind(0), w2.unbind(0),
                                                  b2.unbind(0), strict=True):
            hidden = self.dropout(self.activation(torch.addmm(b_in, part, w_in)))
            done.append(torch.addmm(b_out, hidden, w_out))
        return torch.cat(done)

    def _dispatch(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert parallelism: each worker's rows go to the workers holding their experts with an all-to-all
        (which carries autograd), through those experts, and back with a second one, in their order."""
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        mesh = self.expert_mesh
        group, workers = mesh.get_group(), mesh.size()
        mine = self.options.experts // workers
        sent = torch.tensor(counts, dtype=torch.long).reshape(workers, mine)  # [to worker, its expert]
        received = torch.empty_like(sent)  # [from worker, my expert]
        torch.distributed.all_to_all_single(received.reshape(-1), sent.reshape(-1), group=group)
        sent_sizes, received_sizes = sent.sum(1).tolist(), received.sum(1).tolist()
        arrived = all_to_all_single_autograd(rows, received_sizes, sent_sizes, group)
        # arrived: by sending worker, then by my expert; regroup by my expert, and undo it after
        expert_of = torch.repeat_interleave(torch.arange(mine).repeat(workers), received.reshape(-1))
        order = torch.argsort(expert_of.to(rows.device), stable=True)
        done = self._local_experts(arrived[order], received.sum(0).tolist())
        restored = torch.empty_like(done).index_copy(0, order, done)
        return all_to_all_single_autograd(restored, sent_sizes, received_sizes, group)

    def plait_expert_parallel(self, mesh: Any) -> None:
        """Keep this worker's ``experts / mesh.size()`` experts: the expert weights become DTensors split by
        expert over ``mesh``, so checkpoints hold every expert whatever the mesh."""
        from torch.distributed.tensor import Shard, distribute_tensor

        if self.options.experts % mesh.size():
            raise ConfigError(f"scaling.expert_parallel: {mesh.size()} does not divide plugins.moe.experts: "
                              f"{self.options.experts}")
        for name in self.plait_expert_parameters:
            setattr(self, name, nn.Parameter(distribute_tensor(getattr(self, name).data, mesh, [Shard(0)])))
        self.expert_mesh = mesh

    def _expert_choice(self, tokens: torch.Tensor, probs: torch.Tensor):
        experts, count = self.options.experts, tokens.shape[0]
        # one slot per token on average (capacity_factor 1 when null: expert choice has no dropless form)
        capacity = min(count, max(1, math.ceil((self.options.capacity_factor or 1.0) * count / experts)))
        gate, token = probs.t().topk(capacity, dim=-1)  # [E, C]: each expert's best tokens
        done = self._run_experts(tokens[token.reshape(-1)], [capacity] * experts)
        out = done.new_zeros(tokens.shape).index_add(
            0, token.reshape(-1), done * gate.reshape(-1, 1).to(done.dtype))
        chosen = torch.zeros(count, dtype=torch.bool, device=tokens.device)
        chosen[token.reshape(-1)] = True
        loads = torch.full((experts,), capacity, device=tokens.device)
        return out, loads, chosen

    def _account(self, logits: torch.Tensor, probs: torch.Tensor, loads: torch.Tensor, kept: torch.Tensor) -> None:
        experts = self.options.experts
        load_fraction = loads.float() / loads.sum().clamp(min=1)
        mean_prob = probs.mean(0)
        self.losses = {}
        if self.options.balance == "aux_loss" and self.options.router != "expert_choice":
            self.losses["moe_aux"] = self.options.aux_loss_weight * experts * (load_fraction * mean_prob).sum()
        if self.options.z_loss_weight:
            self.losses["moe_z"] = self.options.z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
        with torch.no_grad():
            self.stats = {  # this forward's, on this worker
                "load": load_fraction.detach(),
                "dropped": 1.0 - kept.float().mean(),
                "entropy": -(probs * probs.clamp(min=1e-9).log()).sum(-1).mean(),
            }
            if self.training:
                counts = {"loads": loads.float(), "kept": kept.float().sum(), "assignments": kept.new_tensor(
                    kept.numel(), dtype=torch.float), "entropy": self.stats["entropy"], "forwards": torch.ones(())}
                self.pending = {k: self.pending.get(k, 0) + v.to(probs.device) for k, v in counts.items()}

    def settled(self) -> torch.Tensor:
        """This step's sums (loads per expert, kept and all assignments, entropy, forwards) as one vector,
        zeros if it had no training forward; the pending sums start again."""
        pending, self.pending = self.pending, {}
        if not pending:
            return torch.zeros(self.options.experts + 4, device=self.router.weight.device)
        return torch.cat([pending["loads"], *(pending[k].reshape(1) for k in ("kept", "assignments", "entropy",
                                                                              "forwards"))])

    def settle(self, sums: torch.Tensor) -> None:
        """One optimizer step's sums over every worker (``settled`` vectors, all-reduced): the DeepSeek-V3 bias
        update, and the step's load, dropped fraction and entropy for the metrics window."""
        experts = self.options.experts
        loads, (kept, assignments, entropy, forwards) = sums[:experts], sums[experts:].tolist()
        if not forwards:
            return
        with torch.no_grad():
            if self.options.balance == "bias":  # raise the bias of under-loaded experts, lower the others'
                self.balance_bias += self.options.bias_update_rate * torch.sign(loads.mean() - loads)
        step = {"load": loads / loads.sum().clamp(min=1), "dropped": torch.tensor(1.0 - kept / max(1.0, assignments)),
                "entropy": torch.tensor(entropy / forwards), "forwards": torch.ones(())}
        self.window = {k: self.window.get(k, 0) + v for k, v in step.items()}

    def window_metrics(self) -> dict[str, float]:
        """Averages over the optimizer steps since the last call (which starts a new window)."""
        window, self.window = self.window, {}
        if not window:
            return {}
        forwards = float(window.pop("forwards"))
        load = (window["load"] / forwards).tolist()
        mean = 1.0 / len(load)
        return {"dropped": float(window["dropped"]) / forwards, "entropy": float(window["entropy"]) / forwards,
                "dead_experts": sum(fraction == 0 for fraction in load), "max_over_mean_load": max(load) / mean,
                **{f"load{e}": fraction for e, fraction in enumerate(load)}}


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def settle_step(layers: list[MoELayer]) -> None:
    """Once per optimizer step, on every worker alike: every layer's loads of the step, summed over all the
    workers in one all-reduce, move the DeepSeek-V3 biases and fill the metrics, so that every worker's
    tokens count and the workers' biases stay equal."""
    if not layers:
        return
    sums = torch.stack([layer.settled() for layer in layers])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(sums)
    for layer, row in zip(layers, sums, strict=True):
        layer.settle(row)


class MoEEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (its attention, norms and dropouts) with a mixture of
    experts as its feed-forward block. Token ``i`` of the sequence is modality ``i`` for a
    modality-aware router (the fusion sequence is [cls, modality 1, modality 2, ...])."""

    activation_relu_or_gelu = False  # tells nn.TransformerEncoder: no fused fast path

    def __init__(self, layer: nn.TransformerEncoderLayer, moe: MoELayer) -> None:
        super().__init__()
        self.self_attn, self.norm1, self.norm2 = layer.self_attn, layer.norm1, layer.norm2
        self.dropout1, self.dropout2, self.norm_first = layer.dropout1, layer.dropout2, layer.norm_first
        self.moe = moe

    def _attention(self, x: torch.Tensor, mask, padding_mask, is_causal: bool) -> torch.Tensor:
        out = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=padding_mask, need_weights=False,
                             is_causal=is_causal)[0]
        return self.dropout1(out)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self.dropout2(self.moe(x, positions))

    def forward(self, src: torch.Tensor, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        if is_causal and self.moe.options.router == "expert_choice":
            raise ConfigError("plugins.moe.router: expert_choice lets each expert pick among all tokens of a "
                              "sequence, future ones included: encoders only, not a causal model")
        x = src
        if self.norm_first:
            x = x + self._attention(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attention(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._feed_forward(x))


class MoEBertOutput(nn.Module):
    """Replaces a BERT layer's feed-forward block (``intermediate`` becomes the identity)."""

    def __init__(self, output: Any, moe: MoELayer) -> None:
        super().__init__()
        self.LayerNorm: nn.Module = output.LayerNorm
        self.dropout: nn.Module = output.dropout
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.moe(input_tensor)) + input_tensor)


def _moe_stack(stack: nn.TransformerEncoder, options: MoEOptions, modalities: int = 0) -> None:
    for i, layer in enumerate(stack.layers):
        moe = MoELayer(layer.linear1.in_features, options.expert_hidden or layer.linear1.out_features, options,
                       activation="relu" if layer.activation_relu_or_gelu == 1 else "gelu",
                       dropout=layer.dropout.p, modalities=modalities)
        stack.layers[i] = MoEEncoderLayer(layer, moe)


def _moe_fusion(fusion: nn.Module, options: MoEOptions) -> None:
    mixer = getattr(fusion, "mixer", None)
    if not isinstance(mixer, nn.TransformerEncoder):
        raise ConfigError("plugins.moe.targets: 'fusion' needs the attention fusion (plugins.fusion.kind: "
                          "attention); the concat fusion has no feed-forward blocks")
    _moe_stack(mixer, options, modalities=1 + len(getattr(fusion, "modalities", [])))  # cls, then one per modality


def _moe_text(encoder: Any, options: MoEOptions) -> None:
    layers = getattr(getattr(getattr(encoder, "model", None), "encoder", None), "layer", None)
    if layers is None:
        raise ConfigError("plugins.moe.targets: 'text' needs the text_encoder plugin's BERT encoder")
    for layer in layers:
        config = encoder.model.config
        if config.hidden_act not in ("gelu", "relu"):
            raise ConfigError(f"plugins.moe.targets: 'text': activation {config.hidden_act} is not supported")
        moe = MoELayer(config.hidden_size, options.expert_hidden or config.intermediate_size, options,
                       activation=config.hidden_act, dropout=0.0)
        layer.intermediate = nn.Identity()
        layer.output = MoEBertOutput(layer.output, moe)


@hookimpl
def plait_config_schema():
    return MoEOptions


@hookimpl
def plait_configure_model(model, config):
    options = config.options(MoEOptions)
    if options.experts % config.scaling.expert_parallel:
        raise ConfigError(f"{config.source}: scaling.expert_parallel: {config.scaling.expert_parallel} does not divide "
                          f"plugins.moe.experts: {options.experts}")
    encoders = getattr(model, "encoders", {})
    for target in options.targets:
        if target == "transformers":
            stacks = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder)]
            if not stacks:
                raise ConfigError("plugins.moe.targets: 'transformers', but the model has no nn.TransformerEncoder")
            for stack in stacks:
                _moe_stack(stack, options)
        elif target == "fusion":
            if not hasattr(model, "fusion"):
                raise ConfigError("plugins.moe.targets: 'fusion', but the model has no fusion module; "
                                  "use targets: [transformers]")
            _moe_fusion(model.fusion, options)
        elif target == "text":
            if "text" not in encoders:
                raise ConfigError("plugins.moe.targets: 'text', but the model has no text encoder")
            _moe_text(encoders["text"], options)
        else:
            raise ConfigError("plugins.moe.targets: 'audio': the audio encoder is a CNN with no feed-forward "
                              "blocks to replace; use fusion or text")
    return None


@hookimpl
def plait_loss_terms(state, batch, outputs):
    terms: dict[str, torch.Tensor] = {}
    for _, layer in moe_layers(state.model):
        for name, value in layer.losses.items():
            terms[name] = terms[name] + value if name in terms else value
    return terms or None


@hookimpl
def plait_after_backward(state):
    settle_step([layer for _, layer in moe_layers(state.model)])


@hookimpl
def plait_train_metrics(state):
    """Per layer i: moe{i}_load{e} (fraction of assignments to expert e), moe{i}_dropped,
    moe{i}_entropy, moe{i}_dead_experts, moe{i}_max_over_mean_load."""
    metrics = {}
    for i, (_, layer) in enumerate(moe_layers(state.model)):
        metrics.update({f"moe{i}_{k}": v for k, v in layer.window_metrics().items()})
    return metrics or None


def plot_expert_load(rows: list[dict], path) -> bool:
    """expert_load.png: each layer's load fraction per expert by step (False: nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("split") == "train"]
    layers = sorted({int(k[3:].split("_")[0]) for r in train for k in r if k.startswith("moe") and "_load" in k
                     and k.split("_load")[1].isdigit()})
    if not layers:
        return False
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.5), squeeze=False)
    for axis, layer in zip(axes[0], layers, strict=True):
        experts = sorted({int(k.split("_load")[1]) for r in train for k in r
                          if k.startswith(f"moe{layer}_load") and k.split("_load")[1].isdigit()})
        for expert in experts:
            key = f"moe{layer}_load{expert}"
            rows = [r for r in train if key in r]
            axis.plot([r["step"] for r in rows], [r[key] for r in rows], label=f"expert {expert}")
        axis.axhline(1 / len(experts), color="grey", linestyle="--", linewidth=1, label="uniform")
        axis.set(xlabel="step", ylabel="fraction of assignments", title=f"MoE layer {layer}", ylim=(0, 1))
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@hookimpl
def plait_fit_end(state):
    metrics_file = state.run_dir / "metrics.jsonl"
    if state.is_main and metrics_file.exists():  # the whole history, resumed runs included
        import json

        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        plot_expert_load(rows, state.run_dir / "expert_load.png")
