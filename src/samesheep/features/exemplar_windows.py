"""Exemplar windows: which windows an SAE latent's exemplars are, and each one cut out of
its document with every token's character span and the latent's activation on it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

from ..sae.codes import CodedShard

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


class LatentRuns:
    """One shard's codes sorted by (latent, kept row): the firings of a latent on a range of
    consecutive rows are one run, found by two binary searches."""

    def __init__(self, shard: CodedShard):
        codes = shard.codes
        counts = codes.offsets.diff().numpy()
        self.n_rows = len(counts)
        keys = codes.latents.numpy().astype(np.int64) * self.n_rows
        keys += np.repeat(np.arange(self.n_rows, dtype=np.int64), counts)
        order = np.argsort(keys, kind="stable")
        self.keys, self.values = keys[order], codes.values.numpy()[order]

    def in_ranges(
        self, latents: np.ndarray, k0: np.ndarray, k1: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(range index, kept row, activation) of every firing of latents[i] on kept rows
        [k0[i], k1[i])."""
        base = latents.astype(np.int64) * self.n_rows
        a = np.searchsorted(self.keys, base + k0)
        b = np.searchsorted(self.keys, base + k1)
        n = b - a
        which = np.repeat(np.arange(len(a)), n)
        entry = np.repeat(a, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        return which, self.keys[entry] - base[which], self.values[entry]


def cut_windows(
    refs: ExemplarRefs,
    sel: np.ndarray,
    shard: CodedShard,
    gid0: int,
    info: Any,
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
    head_all = np.cumsum(lengths) - lengths
    rows = np.repeat(lo, lengths) + np.arange(lengths.sum()) - np.repeat(head_all, lengths)
    # The latent's activations on each window: its firings on the window's kept rows, one
    # run of the shard's (latent, row)-sorted codes per window; 0 elsewhere, nan on rows the
    # token filter leaves out.
    k0 = np.searchsorted(full_of_kept, lo)
    k1 = np.searchsorted(full_of_kept, hi, side="right")
    which, kept_row, value = LatentRuns(shard).in_ranges(refs.latent[sel], k0, k1)
    acts = np.zeros(len(rows), dtype=np.float32)
    acts[head_all[which] + full_of_kept[kept_row] - lo[which]] = value
    acts[kept_of_full[rows] < 0] = np.nan
    has_text = (ends_all[rows] > starts_all[rows]) | (rows == centre[owner])
    rows, owner, acts = rows[has_text], owner[has_text], acts[has_text]
    counts = np.bincount(owner, minlength=len(sel))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
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


def take_lists(lists: pa.ListArray, order: np.ndarray) -> pa.ListArray:
    """lists.take(order), gathered with numpy (pyarrow's take is slow on the exemplar
    table's list columns)."""
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    n = np.diff(offsets)[order]
    head = np.concatenate([[0], np.cumsum(n)])
    flat = np.repeat(offsets[:-1][order] - head[:-1], n) + np.arange(head[-1])
    return pa.ListArray.from_arrays(head.astype(np.int32), values[flat])


def exemplar_table(
    src: Any, refs: ExemplarRefs, parts: list[dict[str, Any]], order: np.ndarray
) -> pa.Table:
    """One row per exemplar from cut_windows' parts (in refs' order), sorted by `order`."""
    n = len(refs.latent)
    refs = refs.take(order)

    def column(name: str, kind: Any) -> Any:
        values = [p[name] for p in parts]
        if kind is list:
            flat = [v for part in values for v in part]
            return [flat[i] for i in order]
        if isinstance(kind, pa.DataType):
            if not values:
                return pa.array([], pa.list_(kind))
            return take_lists(pa.concat_arrays(values), order)
        return np.concatenate(values)[order].astype(kind) if values else np.zeros(0, dtype=kind)

    return pa.table(
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
