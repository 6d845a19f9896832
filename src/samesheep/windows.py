"""Exemplar windows: which windows an SAE latent's exemplars are, and each one cut out of
its document with every token's character span and the latent's activation on it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

from .codes import CodedShard

KINDS = ("top", "quantile", "random")


@dataclass
class ExemplarRefs:
    """Which windows to cut: one row per exemplar."""

    latent: np.ndarray
    kind: np.ndarray  # index into KINDS
    rank: np.ndarray
    bin: np.ndarray
    gid: np.ndarray
    value: np.ndarray

    def take(self, idx: np.ndarray) -> ExemplarRefs:
        """The rows idx, in that order."""
        return ExemplarRefs(*(getattr(self, f.name)[idx] for f in fields(self)))


def window_bounds(full: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """([rows] first row, [rows] last row) of each row's stored window (one document's
    consecutive positions)."""
    doc = full.column("doc_index").to_numpy()
    win = full.column("window").to_numpy()
    n = len(doc)
    new = np.ones(n, dtype=bool)
    new[1:] = (doc[1:] != doc[:-1]) | (win[1:] != win[:-1])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, n))
    first = np.repeat(starts, sizes)
    return first, np.repeat(starts + sizes - 1, sizes)


class ShardLookup:
    """Random access to one shard's codes by (kept row, latent)."""

    def __init__(self, shard: CodedShard, d_sae: int):
        codes = shard.codes
        counts = codes.offsets.diff().numpy()
        keys = np.repeat(np.arange(len(counts), dtype=np.int64), counts) * d_sae
        keys += codes.latents.numpy()
        order = np.argsort(keys, kind="stable")
        self.keys, self.values = keys[order], codes.values.numpy()[order]
        self.d_sae = d_sae

    def get_pairs(self, kept_rows: np.ndarray, latents: np.ndarray) -> np.ndarray:
        """Activations of latents[i] on kept_rows[i] (0 where it does not fire)."""
        if not len(self.keys):
            return np.zeros(len(kept_rows), dtype=np.float32)
        q = kept_rows * self.d_sae + latents
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return np.where(self.keys[pos] == q, self.values[pos], 0.0).astype(np.float32)


def cut_windows(
    refs: ExemplarRefs,
    sel: np.ndarray,
    shard: CodedShard,
    gid0: int,
    info: Any,
    d_sae: int,
    window_tokens: int,
) -> dict[str, Any]:
    """The windows of exemplars `sel` (rows of refs) centred in this shard, all at once:
    window_tokens tokens around the centre, clipped at the centre's stored window (so never
    across two documents) and shifted to stay whole where it can; the document text they
    cover, each token's character span in it, and the latent's activation on each token (nan
    on tokens the token filter leaves out). Tokens without characters (the BOS) are left out.
    Columns are numpy arrays and Python lists, one entry per exemplar; the per-token columns
    are pyarrow list arrays."""
    full, keep = shard.all_tokens, shard.keep
    full_of_kept = np.flatnonzero(keep)
    kept_of_full = np.full(full.num_rows, -1, dtype=np.int64)
    kept_of_full[full_of_kept] = np.arange(len(full_of_kept))
    first, last = window_bounds(full)
    starts_all = full.column("char_start").to_numpy().astype(np.int64)
    ends_all = full.column("char_end").to_numpy().astype(np.int64)
    doc_index = full.column("doc_index").to_numpy()

    centre = full_of_kept[refs.gid[sel] - gid0]  # [n] full rows
    lo, hi = window_rows(centre, first, last, window_tokens)
    lengths = hi - lo + 1
    owner = np.repeat(np.arange(len(sel)), lengths)  # exemplar of each flat row
    rows = (
        np.repeat(lo, lengths)
        + np.arange(lengths.sum())
        - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    has_text = (ends_all[rows] > starts_all[rows]) | (rows == centre[owner])
    rows, owner = rows[has_text], owner[has_text]
    counts = np.bincount(owner, minlength=len(sel))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)

    k = kept_of_full[rows]
    acts = ShardLookup(shard, d_sae).get_pairs(np.maximum(k, 0), refs.latent[sel][owner])
    acts[k < 0] = np.nan
    starts, ends = starts_all[rows], ends_all[rows]
    head = offsets[:-1]  # every window holds at least its centre
    s = np.minimum.reduceat(starts, head)
    e = np.maximum.reduceat(ends, head)
    at_centre = np.flatnonzero(rows == centre[owner])
    out: dict[str, Any] = {
        "split": [shard.split] * len(sel),
        "doc_index": doc_index[centre].astype(np.int32),
        "char_start": s.astype(np.int32),
        "char_end": e.astype(np.int32),
        "center": (at_centre - head).astype(np.int32),
        # spans relative to the window: text[s:e] is a token's text (and small numbers
        # compress to a fraction of document offsets)
        "token_starts": pa.ListArray.from_arrays(offsets, (starts - s[owner]).astype(np.int32)),
        "token_ends": pa.ListArray.from_arrays(offsets, (ends - s[owner]).astype(np.int32)),
        "activations": pa.ListArray.from_arrays(offsets, acts.astype(np.float32)),
    }
    doc_ids = full.column("doc_id").take(pa.array(centre)).to_pylist()
    docs = [
        info.document(shard.split, int(d), i)
        for d, i in zip(out["doc_index"], doc_ids, strict=True)
    ]
    out["doc_id"] = [d.id for d in docs]
    out["title"] = [d.title or d.id for d in docs]
    out["text"] = [d.text[a:b] for d, a, b in zip(docs, s.tolist(), e.tolist(), strict=True)]
    return out


def window_rows(
    c: np.ndarray, first: np.ndarray, last: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) rows of the n-token windows around rows c: centred, clipped at each centre's
    stored window, and shifted to stay whole where the stored window is long enough."""
    lo = np.maximum(first[c], np.minimum(c - n // 2, last[c] - n + 1))
    return lo, np.minimum(last[c], lo + n - 1)


def exemplar_table(
    src: Any, refs: ExemplarRefs, parts: list[dict[str, Any]], order: np.ndarray
) -> pa.Table:
    """One row per exemplar from cut_windows' parts (in refs' order), sorted by `order`."""
    n = len(refs.latent)

    def column(name: str, kind: Any) -> Any:
        values = [p[name] for p in parts]
        if kind is list:
            return [v for part in values for v in part]
        if isinstance(kind, pa.DataType):
            return pa.concat_arrays(values) if values else pa.array([], pa.list_(kind))
        return np.concatenate(values).astype(kind) if values else np.zeros(0, dtype=kind)

    table = pa.table(
        {
            "model": [src.model] * n,
            "layer": np.full(n, src.layer, dtype=np.int32),
            "sae": [src.sae_name] * n,
            "latent": refs.latent.astype(np.int32),
            "kind": np.array(KINDS)[refs.kind].tolist(),
            "rank": refs.rank,
            "bin": refs.bin,
            "value": refs.value.astype(np.float32),
            "split": column("split", list),
            "doc_id": column("doc_id", list),
            "doc_index": column("doc_index", np.int32),
            "title": column("title", list),
            "char_start": column("char_start", np.int32),
            "char_end": column("char_end", np.int32),
            "text": column("text", list),
            "center": column("center", np.int32),
            "token_starts": column("token_starts", pa.int32()),
            "token_ends": column("token_ends", pa.int32()),
            "activations": column("activations", pa.float32()),
        }
    )
    return table.take(pa.array(order))
