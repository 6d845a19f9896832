"""Per-text units: one vector per document, derived from a layer's per-token store without
another forward pass, as the original study used (one vector per text), but never at a pad.

    "text-last"  the state at the document's last real token (not special, not padding)
    "text-mean"  the mean of the states at its real tokens

The result is an ordinary store beside the per-token one (<layer>/acts-<unit>/) with one row
per document: its token is the document's last real token, its span the whole document, so
every later stage (training, features, alignment across tokenizers, comparison, report) runs
on it unchanged, and the unit two models share is the whole document.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..core.cache import load_done
from ..core.config import check_unit, settings_hash
from ..core.device import DTYPES
from ..core.errors import SamesheepError
from .store import MANIFEST, SPLITS, TOKEN_SCHEMA, Store, StoreWriter, open_store, store_intact

TEXT_VERSION = 1
"""Bump when what a per-text store holds changes for the same per-token store."""


def text_folder(store: Store, unit: str) -> Path:
    return store.folder.parent / f"acts-{unit}"


def _split_vectors(
    store: Store, split: str, unit: str, lengths: list[int]
) -> tuple[torch.Tensor, pa.Table]:
    """(vectors [documents, d] float32, token table) of one split: one row per document
    with at least one real token, in document order (a long document's windows may spread
    over several shards)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    last: dict[int, tuple[torch.Tensor, int, str]] = {}
    for shard in store.shards(split):
        real = ~shard.tokens.column("special").to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(real)
        if not len(rows):
            continue
        docs = shard.tokens.column("doc_index").to_numpy()[rows]
        ids = shard.tokens.column("token_id").to_numpy()[rows]
        doc_ids = shard.tokens.column("doc_id").take(pa.array(rows)).to_pylist()
        acts = shard.acts[torch.from_numpy(rows)].float()
        starts = np.flatnonzero(np.diff(docs, prepend=-1))
        for lo, hi in zip(starts, [*starts[1:], len(rows)], strict=True):
            d = int(docs[lo])
            if unit == "text-mean":
                part = acts[lo:hi].sum(0, dtype=torch.float64)
                sums[d] = sums[d] + part if d in sums else part
                counts[d] = counts.get(d, 0) + (hi - lo)
            last[d] = (acts[hi - 1], int(ids[hi - 1]), doc_ids[hi - 1])
    order = sorted(last)
    if unit == "text-mean":
        vectors = [(sums[d] / counts[d]).float() for d in order]
    else:
        vectors = [last[d][0] for d in order]
    x = torch.stack(vectors) if vectors else torch.zeros(0, store.d_model)
    n = len(order)
    table = pa.table(
        {
            "doc_index": np.asarray(order, dtype=np.int64),
            "doc_id": [last[d][2] for d in order],
            "window": np.zeros(n, dtype=np.int64),
            "position": np.ones(n, dtype=np.int64),  # never the attention sink's position 0
            "token_id": np.asarray([last[d][1] for d in order], dtype=np.int64),
            "char_start": np.zeros(n, dtype=np.int64),
            "char_end": np.asarray([lengths[d] for d in order], dtype=np.int64),
            "special": np.zeros(n, dtype=bool),
            "norm": x.norm(dim=1).numpy() if n else np.zeros(0, np.float32),
        }
    )
    return x, table


def text_store(store: Store, unit: str, lengths: dict[str, list[int]]) -> Store:
    """The per-text store of a complete per-token store (built once, rebuilt when the
    per-token store or the unit changes). `lengths`: each split's document lengths in
    characters (a unit spans its whole document)."""
    check_unit(unit)
    folder = text_folder(store, unit)
    key = settings_hash(TEXT_VERSION, store.manifest["key"], unit)
    if load_done(folder / MANIFEST, key) and store_intact(folder):
        return open_store(folder)
    skip = ("shards", "complete", "key", "tokens", "documents")
    header = {k: v for k, v in store.manifest.items() if k not in skip}
    writer = StoreWriter(folder, {**header, "key": key, "unit": unit})
    totals: dict[str, dict[str, int]] = {"tokens": {}, "documents": {}}
    for split in SPLITS:
        x, table = _split_vectors(store, split, unit, lengths[split])
        totals["tokens"][split] = totals["documents"][split] = table.num_rows
        if table.num_rows:
            dtype = DTYPES[store.manifest["dtype"]]
            first, end = int(table["doc_index"][0].as_py()), int(table["doc_index"][-1].as_py())
            name, vectors, tokens = f"{split}-00000", x.to(dtype), table.cast(TOKEN_SCHEMA)
            writer.write(name, split, vectors, tokens, doc_start=first, doc_end=end + 1)
    writer.finish(**totals)
    return open_store(folder)


def check_documents(store: Store, width: int, source: str, layer: int) -> None:
    """A per-text SAE needs at least as many training documents as it has latents."""
    n = store.num_tokens("train")
    if n < width:
        raise SamesheepError(
            f"{source} layer {layer}: a per-text SAE of {width:,} latents needs at least "
            f"{width:,} training documents, and the corpus has {n:,}: use a larger corpus "
            "(corpus.max_tokens = 0 takes all of it) or a narrower SAE (train.expansion_factor)"
        )
