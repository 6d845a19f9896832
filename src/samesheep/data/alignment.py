"""Aligning two models' tokens on the same text: units are the character spans between the
token boundaries both tokenizations share, inside one document.

A boundary of a tokenization is the end of a token after which no later token starts
earlier: pieces of one character (byte-level BPE pieces with overlapping spans, byte-fallback
pieces sharing one span) end inside the character, so only the last of them ends cleanly.
A unit's representative token, in each model, is the last token inside it: the one position
where both models have read exactly the same text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .store import SPLITS, Store, TokenFilter

AFTER_BREAK = 4
"""Units whose token sits within this many positions of a window's start, in a window that
is not the document's first, are left out: that model has read less context there."""


@dataclass
class TokenRows:
    """One store's token rows in store order, as alignment needs them."""

    doc: np.ndarray  # [rows] global document number: split order, then doc_index
    start: np.ndarray  # [rows] character span in the document
    end: np.ndarray
    window: np.ndarray
    position: np.ndarray
    gid: np.ndarray  # [rows] kept-row id (the row of the SAE codes), -1 where not kept
    kept: int  # number of kept rows

    @classmethod
    def of(cls, store: Store, token_filter: TokenFilter, n_train_docs: int) -> TokenRows:
        parts = []
        for entry in store.manifest["shards"]:
            t = store.read_tokens(entry["name"])
            offset = 0 if entry["split"] == SPLITS[0] else n_train_docs
            parts.append((t, token_filter.keep(t), offset))
        return cls.of_tables(parts)

    @classmethod
    def of_tables(cls, parts: list[tuple[pa.Table, np.ndarray, int]]) -> TokenRows:
        """From token tables in store order, each with its kept rows and the number added to
        its doc_index to make the global document number."""
        cols: dict[str, list[np.ndarray]] = {
            k: [] for k in ("doc", "start", "end", "window", "position", "keep")
        }
        for t, keep, offset in parts:
            cols["doc"].append(t.column("doc_index").to_numpy().astype(np.int64) + offset)
            cols["start"].append(t.column("char_start").to_numpy().astype(np.int64))
            cols["end"].append(t.column("char_end").to_numpy().astype(np.int64))
            cols["window"].append(t.column("window").to_numpy())
            cols["position"].append(t.column("position").to_numpy())
            cols["keep"].append(np.asarray(keep, dtype=bool))
        c = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in cols.items()}
        keep = c.pop("keep").astype(bool)
        gid = np.where(keep, np.cumsum(keep) - 1, -1)
        return cls(**c, gid=gid, kept=int(keep.sum()))


def clean_ends(rows: TokenRows, doc_offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(global character positions, rows): the ends of tokens that end cleanly, one row
    each, sorted. Tokens without characters (BOS, padding) have no end."""
    real = np.flatnonzero(rows.end > rows.start)
    g_start = doc_offset[rows.doc[real]] + rows.start[real]
    g_end = doc_offset[rows.doc[real]] + rows.end[real]
    # a token ends cleanly where no later token starts before its end
    later = np.minimum.accumulate(g_start[::-1])[::-1]  # min start of tokens i..
    next_start = np.append(later[1:], np.iinfo(np.int64).max)
    clean = g_end <= next_start
    return g_end[clean], real[clean]


FIELDS = ("doc", "start", "end", "row_a", "row_b", "gid_a", "gid_b", "first_a", "first_b")


@dataclass
class Units:
    """Aligned units of two stores over the same documents, one entry per unit."""

    doc: np.ndarray  # global document number
    start: np.ndarray  # characters of the unit in its document
    end: np.ndarray
    row_a: np.ndarray  # the representative token's row in each store (store order)
    row_b: np.ndarray
    gid_a: np.ndarray  # and its kept-row id (the row of that SAE's codes)
    gid_b: np.ndarray
    first_a: np.ndarray  # the row of the first token inside the unit in each store: the
    first_b: np.ndarray  # unit's tokens are rows first..row (for unit values "max", "mean")
    coverage: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.doc)

    def take(self, idx: np.ndarray) -> Units:
        """The units idx, in that order."""
        return Units(
            *(getattr(self, f)[idx] for f in FIELDS),
            coverage=self.coverage,
        )


def align(
    a: TokenRows, b: TokenRows, doc_lengths: np.ndarray, after_break: int = AFTER_BREAK
) -> Units:
    """The units two tokenizations of the same documents share, with each model's
    representative kept row. Units are left out where either representative is not kept
    (special, sink, outlier) or sits just after a window break (see AFTER_BREAK)."""
    doc_offset = np.concatenate([[0], np.cumsum(doc_lengths + 1)])[:-1]  # +1: docs never touch
    ends_a, rows_a = clean_ends(a, doc_offset)
    ends_b, rows_b = clean_ends(b, doc_offset)
    shared, ia, ib = np.intersect1d(ends_a, ends_b, assume_unique=True, return_indices=True)
    ra, rb = rows_a[ia], rows_b[ib]
    doc = a.doc[ra]
    # a unit starts where the previous shared boundary of the same document is, else at 0
    prev = np.concatenate([[-1], shared[:-1]])
    same_doc = np.concatenate([[False], doc[1:] == doc[:-1]])
    g_start = np.where(same_doc, prev, doc_offset[doc])
    # the first token inside each unit: the one after the previous unit's last, or the
    # document's first (store rows are in document and character order)
    first = {
        name: np.where(same_doc, np.concatenate([[0], r[:-1] + 1]), np.searchsorted(t.doc, doc))
        for name, t, r in (("a", a, ra), ("b", b, rb))
    }
    ok = (a.gid[ra] >= 0) & (b.gid[rb] >= 0)
    for rows, r in ((a, ra), (b, rb)):
        ok &= ~((rows.window[r] > 0) & (rows.position[r] <= after_break))
    units = Units(
        doc=doc[ok],
        start=(g_start - doc_offset[doc])[ok],
        end=(shared - doc_offset[doc])[ok],
        row_a=ra[ok],
        row_b=rb[ok],
        gid_a=a.gid[ra][ok],
        gid_b=b.gid[rb][ok],
        first_a=first["a"][ok],
        first_b=first["b"][ok],
    )
    units.coverage = coverage(a, b, units, ra, rb)
    return units


def coverage(a: TokenRows, b: TokenRows, units: Units, ra: np.ndarray, rb: np.ndarray) -> dict:
    """How the units cover each model's kept tokens: units, tokens per unit (the unit's
    tokens in each model, left-out ones included), and the share of each model's kept tokens
    that sit in one-to-one units (one token in each model). Tokens without characters (BOS,
    padding) belong to no unit."""
    out = {"units": len(units), "boundaries_shared": len(ra)}
    per_unit = {}
    for name, rows in (("a", a), ("b", b)):
        real = np.concatenate([[0], np.cumsum(rows.end > rows.start)])
        first, last = getattr(units, f"first_{name}"), getattr(units, f"row_{name}")
        per_unit[name] = real[last + 1] - real[first]
    one_to_one = (per_unit["a"] == 1) & (per_unit["b"] == 1)
    for name, rows in (("a", a), ("b", b)):
        n = per_unit[name]
        out[f"kept_tokens_{name}"] = rows.kept
        out[f"tokens_per_unit_{name}"] = float(n.mean()) if len(n) else float("nan")
        out[f"one_to_one_share_{name}"] = float(one_to_one.sum() / max(rows.kept, 1))
        out[f"units_share_of_kept_{name}"] = float(len(units) / max(rows.kept, 1))
    return out


def same_tokens(a: TokenRows, b: TokenRows) -> bool:
    """Whether two stores hold the same tokens (a model and its random-weights copy)."""
    return all(
        np.array_equal(getattr(a, f), getattr(b, f))
        for f in ("doc", "start", "end", "window", "position")
    )


def unit_texts(units: Units, texts: list[str]) -> tuple[np.ndarray, list[str]]:
    """(text id of each unit, the distinct texts): units with the same characters share an id."""
    ids: dict[str, int] = {}
    out = np.empty(len(units), dtype=np.int64)
    spans = zip(units.doc.tolist(), units.start.tolist(), units.end.tolist(), strict=True)
    for i, (d, s, e) in enumerate(spans):
        out[i] = ids.setdefault(texts[d][s:e], len(ids))
    return out, list(ids)
