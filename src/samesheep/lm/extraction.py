"""Batched, truncated forward passes over the corpus, written to activation stores."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..core.cache import load_done
from ..core.config import ExtractConfig, settings_hash
from ..core.device import choose_device, choose_dtype, dtype_name, set_threads
from ..core.errors import SamesheepError
from ..core.files import write_json
from ..core.progress import progress
from ..core.rundir import acts_dir, layer_name
from ..data.corpus import Document, read_documents
from ..data.store import (
    SPLITS,
    TOKEN_SCHEMA,
    StoreWriter,
    store_intact,
    to_store_dtype,
)
from .models import LoadedModel, capture, fingerprint, load_model, resolve_layer

STORE_VERSION = 3
"""Bump when what a store holds changes for the same settings, so old stores are rebuilt."""


@dataclass
class Window:
    """Up to context_length tokens of one document, with their character spans."""

    doc_index: int
    doc_id: str
    window: int
    ids: np.ndarray  # [n] int
    starts: np.ndarray  # [n] int
    ends: np.ndarray  # [n] int
    special: np.ndarray  # [n] bool


def bos_prefix(tokenizer: Any, add_bos: str) -> list[int]:
    """Token ids put before every window.

    "tokenizer": what the tokenizer itself adds (Gemma: <bos>; SmolLM2: nothing).
    "auto": the same, but where the tokenizer adds nothing, its BOS token (else EOS), so that
    the attention sink at position 0 falls on a special token rather than on the first word.
    "no": nothing."""
    if add_bos not in ("auto", "tokenizer", "no"):
        raise SamesheepError(f"add_bos must be auto, tokenizer or no, not {add_bos!r}")
    if add_bos == "no":
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    # Only what comes before the text: an appended EOS would sit in the middle of a document.
    at = next((i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain), 0)
    own = [int(t) for t in with_special[:at]]
    if own or add_bos == "tokenizer":
        return own
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise SamesheepError('the tokenizer has neither BOS nor EOS; set add_bos = "tokenizer"')
    return [int(tid)]


def window_cuts(spans: np.ndarray, body: int) -> list[tuple[int, int]]:
    """Token ranges of at most `body` tokens each, never cutting between the byte pieces of
    one character (tokens whose spans overlap), so every window decodes to whole text."""
    cuts, lo, n = [], 0, len(spans)
    while lo < n:
        hi = min(lo + body, n)
        while lo + 1 < hi < n and spans[hi, 0] < spans[hi - 1, 1]:
            hi -= 1
        cuts.append((lo, hi))
        lo = hi
    return cuts


def windows_of(
    docs: list[tuple[int, Document]], tokenizer: Any, prefix: list[int], context_length: int
) -> list[Window]:
    """Tokenize documents (with character offsets) and cut them into windows."""
    body = context_length - len(prefix)
    if body < 1:
        raise SamesheepError(f"context_length {context_length} leaves no room for text")
    enc = tokenizer(
        [d.text for _, d in docs],
        add_special_tokens=False,
        return_offsets_mapping=True,
        split_special_tokens=True,  # text that spells "<bos>" is text, not a control token
    )
    specials = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    out = []
    for (index, doc), ids, offsets in zip(
        docs, enc["input_ids"], enc["offset_mapping"], strict=True
    ):
        ids_np = np.asarray(ids, dtype=np.int64)
        spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        for w, (lo, hi) in enumerate(window_cuts(spans, body)):
            chunk, span = ids_np[lo:hi], spans[lo:hi]
            at = span[0, 0]  # prefix tokens get an empty span where the window starts
            out.append(
                Window(
                    doc_index=index,
                    doc_id=doc.id,
                    window=w,
                    ids=np.concatenate([np.asarray(prefix, dtype=np.int64), chunk]),
                    starts=np.concatenate([np.full(len(prefix), at), span[:, 0]]),
                    ends=np.concatenate([np.full(len(prefix), at), span[:, 1]]),
                    special=np.concatenate([np.ones(len(prefix), bool), np.isin(chunk, specials)]),
                )
            )
    return out


def shard_groups(
    docs: Iterable[Document],
    tokenizer: Any,
    prefix: list[int],
    context_length: int,
    shard_tokens: int,
    chunk_docs: int = 64,
) -> Iterator[tuple[int, int, list[Window]]]:
    """Yield (first doc, end doc, windows): groups of whole windows holding at least
    shard_tokens tokens each (the last may hold fewer). Streams the documents; a very long
    document spreads over several groups, so memory stays bounded by the shard size."""
    group: list[Window] = []
    count = 0
    numbered = enumerate(docs)
    while chunk := list(itertools.islice(numbered, chunk_docs)):
        for w in windows_of(chunk, tokenizer, prefix, context_length):
            if count >= shard_tokens:
                yield group[0].doc_index, group[-1].doc_index + 1, group
                group, count = [], 0
            group.append(w)
            count += len(w.ids)
    if group:
        yield group[0].doc_index, group[-1].doc_index + 1, group


def length_batches(windows: list[Window], batch_tokens: int) -> list[list[int]]:
    """Window indices grouped by length (longest first) so that a batch, padded to its
    longest window, holds at most batch_tokens tokens (and at least one window)."""
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i].ids), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(windows[batches[-1][0]].ids) * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def token_table(windows: list[Window], norms: np.ndarray) -> pa.Table:
    """The token table of a group of windows, in window order; `norms` [tokens] are the
    activations' norms."""
    return pa.table(
        {
            "doc_index": np.concatenate([np.full(len(w.ids), w.doc_index) for w in windows]),
            "doc_id": [w.doc_id for w in windows for _ in range(len(w.ids))],
            "window": np.concatenate([np.full(len(w.ids), w.window) for w in windows]),
            "position": np.concatenate([np.arange(len(w.ids)) for w in windows]),
            "token_id": np.concatenate([w.ids for w in windows]),
            "char_start": np.concatenate([w.starts for w in windows]),
            "char_end": np.concatenate([w.ends for w in windows]),
            "special": np.concatenate([w.special for w in windows]),
            "norm": norms,
        }
    ).cast(TOKEN_SCHEMA)


def forward_windows(
    lm: LoadedModel,
    layers: list[int],
    windows: list[Window],
    batch_tokens: int,
    device: torch.device,
) -> dict[int, torch.Tensor]:
    """Activations of every token of `windows` at each layer: {layer: [tokens, d]} on the
    CPU, rows in window order."""
    starts = np.cumsum([0] + [len(w.ids) for w in windows])
    out = {L: torch.empty(int(starts[-1]), lm.d_model, dtype=lm.model.dtype) for L in layers}
    pad = pad_id(lm.tokenizer)
    for batch in length_batches(windows, batch_tokens):
        longest = len(windows[batch[0]].ids)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(windows[i].ids)
            ids[row, :n] = torch.from_numpy(windows[i].ids)
            mask[row, :n] = 1
        # Right padding: causal attention keeps real tokens blind to the pads after them.
        full = bool(mask.all())
        states = capture(lm.model, layers, ids.to(device), None if full else mask.to(device))
        for L in layers:
            h = states[L].to("cpu", non_blocking=False)
            for row, i in enumerate(batch):
                n = len(windows[i].ids)
                out[L][starts[i] : starts[i] + n] = h[row, :n]
    return out


def pad_id(tokenizer: Any) -> int:
    """The id right padding uses: the pad token, else EOS, else 0 (the attention mask hides
    it from real tokens either way)."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


@dataclass(frozen=True)
class ModelJob:
    """One model's work in a run: the model, the corpus it reads, the folder it writes to,
    and the corpus's hash (recorded in what it writes, and part of its key)."""

    source: str
    corpus_dir: Path
    model_dir: Path
    corpus_hash: str
    trust_remote_code: bool = False
    seed: int = 0  # of the weights, for a random-weights copy


@dataclass(frozen=True)
class _Pass:
    """What every split of one model's extraction shares: the loaded model, the store
    writers (one per layer), the token ids put before every window, the settings, and the
    device the model runs on."""

    lm: LoadedModel
    writers: dict[int, StoreWriter]
    prefix: list[int]
    cfg: ExtractConfig
    device: torch.device


def extract_model(
    job: ModelJob, layer_specs: list[Any], cfg: ExtractConfig, lm: LoadedModel | None = None
) -> dict[str, Any]:
    """Extract one model's activations at the given layers for every corpus split;
    resumes from complete shards and does nothing when inputs and settings are unchanged."""
    source, model_dir, corpus_hash = job.source, job.model_dir, job.corpus_hash
    device = choose_device(cfg.device)
    dtype = choose_dtype(cfg.dtype, device)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("threads", "device")}

    def keys() -> tuple[str, str]:
        """(the key of this extraction, the key each layer's store adds its layer to)."""
        where = (dtype_name(dtype), device.type)
        model = fingerprint(source, job.seed)
        base = settings_hash(STORE_VERSION, corpus_hash, model, settings, where)
        return settings_hash(base, [str(s) for s in layer_specs]), base

    state_path = model_dir / "extract.json"
    state = load_done(state_path, keys()[0])
    if (
        state
        and state.get("complete")
        and all(store_intact(acts_dir(model_dir / layer_name(L))) for L in state["layers"])
    ):
        return {**state, "skipped": True}

    set_threads(cfg.threads)
    if lm is None:  # a caller may pass the model it already loaded (same source and dtype)
        lm = load_model(source, dtype, device, job.trust_remote_code, job.seed)
    key, base = keys()  # again: a hub model's revision is known once it is downloaded
    layers = sorted({resolve_layer(s, lm.n_layers) for s in layer_specs})
    prefix = bos_prefix(lm.tokenizer, cfg.add_bos)
    header = {
        "model": source,
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "dtype": cfg.store_dtype,
        "compute_dtype": dtype_name(dtype),
        "device": device.type,
        "context_length": cfg.context_length,
        "prefix_ids": prefix,
        "corpus": corpus_hash,  # later stages check that the run's corpus is still this one
    }
    # Each store is keyed on its own resolved layer: adding a layer, or naming one another
    # way ("2/3" or 12), keeps the stores already complete.
    writers = {
        L: StoreWriter(
            acts_dir(model_dir / layer_name(L)),
            {**header, "key": settings_hash(base, L), "layer": L},
        )
        for L in layers
    }
    write_json(state_path, {"key": key, "model": source, "layers": layers, "complete": False})
    work = _Pass(lm, writers, prefix, cfg, device)
    totals: dict[str, dict[str, int]] = {"tokens": {}, "documents": {}}
    for split in SPLITS:
        path = job.corpus_dir / f"{split}.jsonl"
        totals["documents"][split] = count_lines(path)
        totals["tokens"][split] = _extract_split(work, split, path, totals["documents"][split])
    for w in writers.values():
        w.finish(**totals)
    state = {"key": key, "model": source, "layers": layers, "complete": True, **totals}
    write_json(state_path, state)
    return {**state, "skipped": False}


def _extract_split(work: _Pass, split: str, path: Path, n_docs: int) -> int:
    """Write one corpus split's shards for every layer still missing them; return the
    split's token count (special tokens included)."""
    lm, writers, cfg = work.lm, work.writers, work.cfg
    tokens = 0
    with progress() as bar:
        task = bar.add_task(f"{lm.source} {split}", total=n_docs, rate="")
        clock = _Clock()
        docs = read_documents(path) if n_docs else []
        groups = shard_groups(docs, lm.tokenizer, work.prefix, cfg.context_length, cfg.shard_tokens)
        for index, (first, end, windows) in enumerate(groups):
            name = f"{split}-{index:05d}"
            n = sum(len(w.ids) for w in windows)
            tokens += n
            todo = [L for L, w in writers.items() if not w.has(name)]
            if todo:
                acts = forward_windows(lm, todo, windows, cfg.batch_tokens, work.device)
                for L in todo:
                    where = f"{writers[L].folder}/{name}"
                    stored = to_store_dtype(acts[L], cfg.store_dtype, where)
                    # The norm of what is stored, as every reader of the store sees it.
                    table = token_table(windows, stored.float().norm(dim=1).numpy())
                    writers[L].write(name, split, stored, table, doc_start=first, doc_end=end)
                clock.add(n)
            bar.update(task, completed=end, rate=clock.rate())
    return tokens


def count_lines(path: Path) -> int:
    """Lines in a file (0 where it does not exist), read in blocks."""
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


class _Clock:
    """Tokens per second over the work actually done (skipped shards do not count)."""

    def __init__(self) -> None:
        self._time = time.perf_counter
        self.start = self._time()
        self.tokens = 0

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> str:
        dt = self._time() - self.start
        return f"{self.tokens / dt:,.0f} tok/s" if self.tokens and dt > 0 else ""
