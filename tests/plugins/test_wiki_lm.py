"""wiki_lm's word-piece tokens: MiniLM's vocabulary over the same articles and splits as the bytes."""
from __future__ import annotations

import torch

from plait.modalities.text import WordPieceTokenizer
from plait.plugins.wiki_lm import WikiLMOptions, WikiTokens, corpus_path, read_articles


def test_word_piece_windows_are_the_articles_in_minilm_pieces():
    options = WikiLMOptions(tokenizer="wordpiece", seq_len=16, max_articles=40)
    train = WikiTokens(options, "train")
    pieces = WordPieceTokenizer().tokenizer
    assert len(train.classes) == pieces.get_vocab_size() == 30522
    first = train[0]
    assert first["ids"].shape == first["label"].shape == (16,)
    assert torch.equal(first["ids"][1:], first["label"][:-1])  # the next token at each position
    article = read_articles(corpus_path(options))[2]  # articles 0 and 1 are validation and test
    decoded = pieces.decode(first["ids"].tolist())
    assert article.lower().replace(" ", "").startswith(decoded.replace(" ", "").replace("##", ""))
    assert train.info["tokenizer"] == "wordpiece" and train.info["tokens"] == train.data.size
    assert int(train.data.max()) < len(train.classes)
    assert len(WikiTokens(options, "val")) > 0


def test_bytes_remain_the_default():
    options = WikiLMOptions(seq_len=16, max_articles=40)
    train = WikiTokens(options, "train")
    articles = [a for i, a in enumerate(read_articles(corpus_path(options))[:40]) if i % 20 > 1]
    assert len(train.classes) == 256
    assert bytes(train.data.tolist()) == "\n".join(articles).encode("utf-8")
