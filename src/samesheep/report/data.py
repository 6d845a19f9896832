"""What the pages show, read from the run's files and shaped for the site: per latent its
statistics and exemplar windows (text with each token's activation as segments), per
comparison its partners, matched pairs with both models' activations on the same text, and a
2-D map of the latents by meaning."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from ..core.constants import SUMMARY
from ..core.errors import SamesheepError
from ..core.files import read_json

FEATURE_COLUMNS = (
    "latent",
    "freq_train",
    "freq_heldout",
    "fires_train",
    "fires_heldout",
    "mean_act",
    "max_act",
    "hist",
    "dead",
    "dense",
    "n_docs",
    "top_tokens",
    "top_token_shares",
    "token_concentration",
    "doc_concentration",
    "topic",
    "topic_share",
    "topic_lift",
    "top_titles",
    "top_title_shares",
    "label",
    "label_terms",
    "label_z",
    "coherence",
    "promoted_tokens",
    "promoted_logits",
    "suppressed_tokens",
    "suppressed_logits",
)
EXEMPLAR_COLUMNS = (
    "latent",
    "kind",
    "rank",
    "bin",
    "value",
    "split",
    "doc_id",
    "doc_index",
    "title",
    "char_start",
    "char_end",
    "text",
    "center",
    "token_starts",
    "token_ends",
    "activations",
)
TITLE_CHARS = 160
"""Titles and labels longer than this are cut (with an ellipsis) in the site's data."""


def short(text: Any, limit: int = TITLE_CHARS) -> str:
    """Untrusted text cut to `limit` characters (a 100,000-character title stays readable)."""
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def sig(value: Any, digits: int = 3) -> float | None:
    """A float rounded to `digits` significant digits; None where it is missing."""
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


# ---------------------------------------------------------------- exemplar windows


def segments(spans: list[tuple[int, int, float]], length: int) -> list[list[Any]]:
    """[[end, value], ...] covering text[0:length] in order: each token's characters with its
    activation (None where the token rule left it out), 0 between tokens. Runs of inactive
    characters are merged; tokens sharing characters (byte pieces of one character) show the
    largest value over them."""
    out: list[list[Any]] = []

    def emit(end: int, value: Any) -> None:
        if end <= (out[-1][0] if out else 0):
            return
        if out and value == 0 and out[-1][1] == 0:
            out[-1][0] = end
        else:
            out.append([end, value])

    spans = sorted((max(s, 0), min(e, length), v) for s, e, v in spans if e > s)
    pos = 0
    if all(s >= e_prev for (s, _, _), (_, e_prev, _) in zip(spans[1:], spans, strict=False)):
        for s, e, v in spans:
            if s > pos:
                emit(s, 0)
            emit(e, _value(v))
            pos = e
        if length > pos:
            emit(length, 0)
        return out
    # overlapping pieces: the largest value over the tokens covering each character
    best = np.zeros(length)
    left_out = np.zeros(length, dtype=bool)
    covered = np.zeros(length, dtype=bool)
    cuts = {0, length}
    for s, e, v in spans:
        cuts.update((s, e))
        covered[s:e] = True
        if v is None or not math.isfinite(v):
            left_out[s:e] = True
        else:
            best[s:e] = np.maximum(best[s:e], v)
    cuts_sorted = sorted(c for c in cuts if 0 <= c <= length)
    for lo, hi in itertools.pairwise(cuts_sorted):
        if hi <= lo:
            continue
        v = best[lo]
        value = None if (left_out[lo] and v == 0 and covered[lo]) else _value(v)
        emit(hi, value)
    return out


def _value(v: Any) -> Any:
    if v is None or not math.isfinite(v):
        return None
    return sig(v) if v > 0 else 0


@dataclass
class Window:
    """An exemplar window cut down to `context` tokens each side of its token."""

    doc: int  # global document number (train documents, then held-out ones)
    start: int  # characters of the window in its document
    end: int
    text: str
    seg: list[list[Any]]  # the exemplar model's activations as segments (see `segments`)
    center: tuple[int, int]  # the exemplar token's characters, window-relative


def sig_array(v: np.ndarray, digits: int = 3) -> np.ndarray:
    """`sig` over an array (nan stays nan, 0 stays 0)."""
    v = np.asarray(v, dtype=np.float64)
    ok = np.isfinite(v) & (v != 0)
    scale = np.zeros_like(v)
    scale[ok] = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(v[ok]))))
    out = v.copy()
    out[ok] = np.round(v[ok] * scale[ok]) / scale[ok]
    return out


def cut_windows(ex: pa.Table, context: int, n_train_docs: int) -> list[Window]:
    """Every exemplar row's window with at most `context` tokens each side of its token, and
    its segments as `segments` gives them (tokens of overlapping spans, the byte pieces of
    one character, form one segment with their largest value), computed for all rows at once."""
    n = ex.num_rows
    if n == 0:
        return []
    col = {k: ex.column(k).combine_chunks() for k in ("token_starts", "token_ends", "activations")}
    offsets = col["token_starts"].offsets.to_numpy().astype(np.int64)
    starts = col["token_starts"].values.to_numpy().astype(np.int64)
    ends = col["token_ends"].values.to_numpy().astype(np.int64)
    acts = col["activations"].values.to_numpy(zero_copy_only=False).astype(np.float64)
    center = ex.column("center").to_numpy().astype(np.int64)
    length = np.diff(offsets)
    lo = np.maximum(0, center - context)
    hi = np.minimum(length, center + context + 1)
    count = hi - lo
    win = np.repeat(np.arange(n), count)
    tok = np.repeat(offsets[:-1] + lo - np.concatenate([[0], np.cumsum(count)[:-1]]), count)
    tok += np.arange(len(win))
    first = np.concatenate([[0], np.cumsum(count)[:-1]])  # each window's first token
    s0 = np.minimum.reduceat(starts[tok], first)
    e0 = np.maximum.reduceat(ends[tok], first)
    rs, re_, v = starts[tok] - s0[win], ends[tok] - s0[win], acts[tok]
    # a token starts a new segment unless it begins before an earlier token's end (pieces)
    big = int(e0.max() - s0.min()) + 2
    reach = np.maximum.accumulate(re_ + win * big) - win * big  # running end in the window
    prev_reach = np.concatenate([[0], reach[:-1]])
    is_first = np.zeros(len(win), dtype=bool)
    is_first[first] = True
    new = is_first | (rs >= prev_reach)
    at = np.flatnonzero(new)
    seg_win = win[at]
    seg_start = rs[at]
    seg_end = np.maximum.reduceat(re_, at)
    with np.errstate(invalid="ignore"):
        seg_val = np.fmax.reduceat(v, at)  # nan only where every piece was left out
    seg_val = np.where(np.isnan(seg_val), np.nan, np.where(seg_val > 0, sig_array(seg_val), 0.0))
    # inactive characters before a segment (a gap between tokens) become a 0 segment
    prev_end = np.concatenate([[0], seg_end[:-1]])
    seg_first = np.concatenate([[True], seg_win[1:] != seg_win[:-1]])
    prev_end[seg_first] = 0
    gap = seg_start > prev_end
    ends_all = np.stack([seg_start, seg_end], 1).reshape(-1)
    vals_all = np.stack([np.zeros(len(at)), seg_val], 1).reshape(-1)
    wins_all = np.repeat(seg_win, 2)
    keep = np.stack([gap, np.ones(len(at), dtype=bool)], 1).reshape(-1)
    ends_all, vals_all, wins_all = ends_all[keep], vals_all[keep], wins_all[keep]
    # runs of inactive segments merge into their last one
    nxt_zero = np.concatenate([(vals_all[1:] == 0) & (wins_all[1:] == wins_all[:-1]), [False]])
    keep = ~((vals_all == 0) & nxt_zero)
    ends_all, vals_all, wins_all = ends_all[keep], vals_all[keep], wins_all[keep]
    bounds = np.searchsorted(wins_all, np.arange(n + 1))
    e_list = ends_all.tolist()
    v_list = [None if x != x else (x if x > 0 else 0) for x in vals_all.tolist()]
    texts = ex.column("text").to_pylist()
    doc = ex.column("doc_index").to_numpy().astype(np.int64)
    heldout = np.array([x == "heldout" for x in ex.column("split").to_pylist()])
    doc = doc + np.where(heldout, n_train_docs, 0)
    char_start = ex.column("char_start").to_numpy().astype(np.int64) + s0
    c_start = starts[offsets[:-1] + center] - s0
    c_end = ends[offsets[:-1] + center] - s0
    out = []
    for i in range(n):
        a, b = bounds[i], bounds[i + 1]
        text = texts[i][s0[i] : e0[i]]
        seg = [[e, x] for e, x in zip(e_list[a:b], v_list[a:b], strict=True)]
        start = int(char_start[i])
        token_chars = (int(c_start[i]), int(c_end[i]))
        out.append(Window(int(doc[i]), start, start + len(text), text, seg, token_chars))
    return out


def window_record(row: dict[str, Any], w: Window) -> dict[str, Any]:
    """A window as a feature page shows it: title, split, value, text and segments."""
    return {
        "title": short(row["title"]),
        "doc": short(row["doc_id"], 80),
        "split": row["split"],
        "value": sig(row["value"]),
        "bin": int(row["bin"]),
        "text": w.text,
        "seg": w.seg,
        "center": list(w.center),
    }


# ---------------------------------------------------------------- one SAE's features


@dataclass
class FeatureData:
    """One SAE's latents as the site shows them."""

    index: dict[str, list]  # columns over all latents (the latent table, partner labels)
    records: dict[int, dict[str, Any]]  # per live latent: statistics and exemplar windows
    top_windows: dict[int, list[tuple[dict[str, Any], Window]]]  # for the pair pages
    histogram_edges: list[float]
    d_sae: int


def read_features(
    folder: Path, n_top: int, per_bin: int, context: int, n_pair: int, n_train_docs: int
) -> FeatureData:
    """Read a features/ folder: every latent's statistics, its `n_top` top and `per_bin`
    quantile exemplars per bin (cut to `context` tokens a side), its `n_pair` top windows."""
    summary = read_json(folder / SUMMARY, corrupt_is_missing=True)
    if not summary:
        raise SamesheepError(f"no features in {folder}: run `samesheep features` first")
    try:
        table = pq.read_table(folder / "feature_table.parquet", columns=list(FEATURE_COLUMNS))
        ex = pq.read_table(folder / "exemplars.parquet", columns=list(EXEMPLAR_COLUMNS))
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise SamesheepError(f"cannot read the features in {folder}: {e}") from None
    rows = table.to_pylist()
    d_sae = len(rows)
    index = {
        "label": [short(r["label"]) for r in rows],
        "freq": [sig(r["freq_train"]) for r in rows],
        "max": [sig(r["max_act"]) for r in rows],
        "topic": [r["topic"] or "" for r in rows],
        "dead": [bool(r["dead"]) for r in rows],
        "dense": [bool(r["dense"]) for r in rows],
        "docs": [int(r["n_docs"]) for r in rows],
        "concentration": [sig(r["token_concentration"]) for r in rows],
        "coherence": [sig(r["coherence"]) for r in rows],
        "token": [short((r["top_tokens"] or [""])[0], 40) for r in rows],
    }
    keep = pc.or_(
        pc.and_(pc.equal(ex["kind"], "top"), pc.less(ex["rank"], max(n_top, n_pair))),
        pc.and_(pc.equal(ex["kind"], "quantile"), pc.less(ex["rank"], per_bin)),
    )
    records: dict[int, dict[str, Any]] = {}
    for r in rows:
        if not r["dead"]:
            records[int(r["latent"])] = feature_record(r, {"top": [], "quantile": []})
    top_windows: dict[int, list] = {}
    shown = ex.filter(keep)
    windows = cut_windows(shown, context, n_train_docs)
    meta = shown.select(["latent", "kind", "rank", "bin", "value", "split", "doc_id", "title"])
    for row, w in zip(meta.to_pylist(), windows, strict=True):
        latent = int(row["latent"])
        rec = records.get(latent)
        if rec is None:
            continue
        if row["kind"] == "top" and row["rank"] < n_pair:
            top_windows.setdefault(latent, []).append((row, w))
        if row["kind"] == "top" and row["rank"] >= n_top:
            continue
        rec["exemplars"][row["kind"]].append(window_record(row, w))
    explanations(folder, index, records)
    return FeatureData(index, records, top_windows, summary["histogram_edges"], d_sae)


EXPLAINED_BY = {
    "llm": "language model",
    "statistical": "statistical",
    "user": "yours",
    "random": "another latent's (baseline)",
}


def explanations(folder: Path, index: dict[str, list], records: dict[int, dict[str, Any]]) -> None:
    """Add the interpret stage's labels and scores, where it has run: each latent's
    explanation to the index ("llm", for the latent table), and to its record every label
    with its detection and fuzzing scores, and where it was scored."""
    path = folder / "explanations.parquet"
    if not path.is_file():
        return
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowInvalid) as e:
        raise SamesheepError(
            f"cannot read {path} ({str(e).splitlines()[0]}): run `samesheep interpret` again"
        ) from None
    llm = [""] * len(index["label"])
    for r in rows:
        latent = int(r["latent"])
        own = r["scored_latent"] == latent and not math.isfinite(r["partner_r"])
        if r["source"] == "llm" and own and 0 <= latent < len(llm):
            llm[latent] = short(r["label"])
        rec = records.get(latent)
        if rec is None:
            continue
        by = EXPLAINED_BY.get(r["source"], r["source"])
        if r["source"] == "random":
            by += f" #{r['from_latent']}"
        on = "" if own else f"{short(r['scored_model'], 60)} #{r['scored_latent']}"
        explanation = {
            "by": by,
            "label": short(r["label"], 400),
            "detection": sig(r["detection"]),
            "fuzzing": sig(r["fuzzing"]),
            "on": on,
            "r": sig(r["partner_r"]) if not own else None,
            "n": int(r["n_active"]) + int(r["n_inactive"]),
        }
        rec.setdefault("explanations", []).append(explanation)
    index["llm"] = llm


def feature_record(r: dict[str, Any], exemplars: dict[str, list]) -> dict[str, Any]:
    """One latent's statistics for its page (exemplars are added as they are read)."""

    def pairs(names: str, values: str, digits: int = 3) -> list[list[Any]]:
        return [
            [short(n, 60), sig(v, digits)]
            for n, v in zip(r[names] or [], r[values] or [], strict=False)
        ]

    return {
        "latent": int(r["latent"]),
        "label": short(r["label"], 400),
        "freq_train": sig(r["freq_train"]),
        "freq_heldout": sig(r["freq_heldout"]),
        "fires_train": int(r["fires_train"]),
        "fires_heldout": int(r["fires_heldout"]),
        "mean": sig(r["mean_act"]),
        "max": sig(r["max_act"]),
        "hist": [int(x) for x in r["hist"] or []],
        "dense": bool(r["dense"]),
        "docs": int(r["n_docs"]),
        "tokens": pairs("top_tokens", "top_token_shares"),
        "concentration": sig(r["token_concentration"]),
        "doc_concentration": sig(r["doc_concentration"]),
        "topic": r["topic"] or "",
        "topic_share": sig(r["topic_share"]),
        "topic_lift": sig(r["topic_lift"]),
        "titles": pairs("top_titles", "top_title_shares"),
        "terms": pairs("label_terms", "label_z"),
        "coherence": sig(r["coherence"]),
        "promoted": pairs("promoted_tokens", "promoted_logits"),
        "suppressed": pairs("suppressed_tokens", "suppressed_logits"),
        "exemplars": exemplars,
    }


# ---------------------------------------------------------------- both models on one text


class TokenIndex:
    """One model's tokens with text, sorted by document and character, and its SAE's codes
    by latent: what a window of any text shows for any latent of that model."""

    def __init__(
        self,
        doc: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        gid: np.ndarray,
        codes: Any,
        d_sae: int,
    ):
        real = end > start
        order = np.lexsort((start[real], doc[real]))
        self.doc, self.start = doc[real][order], start[real][order]
        self.end, self.gid = end[real][order], gid[real][order]
        self.key = self.doc.astype(np.int64) * (1 << 32) + self.start
        self.longest = int((self.end - self.start).max()) if len(self.end) else 0
        csr = sp.csr_matrix(
            (codes.values.numpy(), codes.latents.numpy(), codes.offsets.numpy()),
            shape=(codes.tokens, d_sae),
        )
        self.csc = csr.tocsc()
        self.csc.sort_indices()

    def spans(self, doc: int, start: int, end: int, latent: int) -> list[tuple[int, int, float]]:
        """The tokens overlapping characters start..end of the document, window-relative, each
        with the latent's activation (nan where the token rule leaves the token out)."""
        base = doc * (1 << 32)
        lo = int(np.searchsorted(self.key, base + start - self.longest))
        hi = int(np.searchsorted(self.key, base + end))
        s, e, g = self.start[lo:hi], self.end[lo:hi], self.gid[lo:hi]
        inside = e > start
        s, e, g = s[inside], e[inside], g[inside]
        col = slice(self.csc.indptr[latent], self.csc.indptr[latent + 1])
        ids, vals = self.csc.indices[col], self.csc.data[col]
        pos = np.clip(np.searchsorted(ids, g), 0, max(len(ids) - 1, 0))
        found = (len(ids) > 0) & (ids[pos] == g) if len(ids) else np.zeros(len(g), bool)
        value = np.where(found, vals[pos] if len(ids) else 0.0, 0.0)
        value = np.where(g < 0, np.nan, value)
        return [
            (int(a) - start, int(b) - start, float(v)) for a, b, v in zip(s, e, value, strict=True)
        ]


@dataclass(frozen=True)
class PairLatents:
    """A matched pair's two latents, each with its model's TokenIndex: what a window of any
    text shows of the pair."""

    a: int
    b: int
    tokens_a: TokenIndex
    tokens_b: TokenIndex


def pair_window(row: dict[str, Any], w: Window, side: str, pair: PairLatents) -> dict[str, Any]:
    """One window of a matched pair (an exemplar of its `side`'s latent) with both models'
    activations on its characters."""
    a = pair.tokens_a.spans(w.doc, w.start, w.end, pair.a)
    b = pair.tokens_b.spans(w.doc, w.start, w.end, pair.b)
    return {
        "from": side,
        "title": short(row["title"]),
        "split": row["split"],
        "text": w.text,
        "a": segments(a, len(w.text)),
        "b": segments(b, len(w.text)),
        "center": list(w.center),
    }


# ---------------------------------------------------------------- the map


def latent_map(ca: np.ndarray | None, cb: np.ndarray | None) -> dict[str, Any] | None:
    """Both models' latents on the first two principal axes of their embedding centroids
    (one space: the same sentence embedder read both models' exemplars), scaled to 0..1;
    latents without a centroid (dead) are left off."""
    if ca is None or cb is None:
        return None
    live_a = np.flatnonzero(np.linalg.norm(ca, axis=1) > 0)
    live_b = np.flatnonzero(np.linalg.norm(cb, axis=1) > 0)
    x = np.concatenate([ca[live_a], cb[live_b]]).astype(np.float64)
    if len(x) < 3:
        return None
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    # scaled on the 1st to 99th percentile, so a few outlying latents do not squeeze the rest
    lo, hi = np.percentile(xy, 1, axis=0), np.percentile(xy, 99, axis=0)
    xy = np.clip((xy - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    pa_, pb_ = xy[: len(live_a)], xy[len(live_a) :]
    return {
        "a": [
            [int(i), round(float(p), 4), round(float(q), 4)]
            for i, (p, q) in zip(live_a, pa_, strict=True)
        ],
        "b": [
            [int(i), round(float(p), 4), round(float(q), 4)]
            for i, (p, q) in zip(live_b, pb_, strict=True)
        ],
    }
