"""Pearson correlation between every latent of one SAE and every latent of another over the
same units, from their sparse codes: column sums and squares, and co-firing products over
active latents only, block by block of the first SAE's latents, never a dense
[units, latents] matrix, and never more than one [block, latents] block of correlations.

Besides the raw codes, the same pass gives the correlations of the codes' residuals after
what the unit's text alone predicts (each latent's mean code over the units with that text),
and of those text-predicted parts: with per-text sums S_t and counts n_t,
    sum_u (a - m_a)(b - m_b) = sum_u a b - sum_t S_a,t S_b,t / n_t,
so both come from one more sparse product, exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..core.errors import SamesheepError
from ..sae.model import SparseCodes

VIEWS = ("raw", "residual", "token")
"""raw codes; residuals after the unit text's mean code; the text-predicted means."""


def gather_rows(codes: SparseCodes, rows: np.ndarray, n_latents: int) -> sp.csr_matrix:
    """[len(rows), n_latents] CSR matrix of the codes' rows `rows` (kept-row ids), in order."""
    sub = codes.take(rows)
    return sp.csr_matrix(
        (sub.values.numpy().astype(np.float64), sub.latents.numpy(), sub.offsets.numpy()),
        shape=(len(rows), n_latents),
    )


UNIT_VALUES = ("last", "max", "mean")
"""A model's value on a unit: at its last token inside it (where both models have read the
same text), or the maximum or mean over its kept tokens inside it."""


def unit_codes(
    codes: SparseCodes,
    gid: np.ndarray,
    first: np.ndarray,
    last: np.ndarray,
    n_latents: int,
    how: str = "last",
) -> sp.csr_matrix:
    """[units, n_latents] CSR: each unit's codes from the store rows first..last (inclusive)
    that are kept (`gid` [store rows] is each row's kept-row id, -1 where left out): the last
    row's ("last"), or the maximum or mean over the kept rows ("max", "mean")."""
    if how == "last":
        return gather_rows(codes, gid[last], n_latents)
    if how not in UNIT_VALUES:
        raise SamesheepError(f"unit value {how!r} is not one of {', '.join(UNIT_VALUES)}")
    lengths = last - first + 1
    unit = np.repeat(np.arange(len(first)), lengths)
    rows = np.repeat(first - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    rows += np.arange(len(unit))
    kept = gid[rows] >= 0
    unit, rows = unit[kept], gid[rows][kept]
    x = gather_rows(codes, rows, n_latents).tocoo()
    u, j, v = unit[x.row], x.col, x.data
    if how == "mean":
        n = np.maximum(np.bincount(unit, minlength=len(first)), 1)
        out = sp.csr_matrix((v / n[u], (u, j)), shape=(len(first), n_latents))
        out.sum_duplicates()
        return out
    order = np.lexsort((j, u))
    u, j, v = u[order], j[order], v[order]
    new = np.flatnonzero(np.diff(u * n_latents + j, prepend=-1))
    top = np.maximum.reduceat(v, new) if len(v) else v
    return sp.csr_matrix((top, (u[new], j[new])), shape=(len(first), n_latents))


DENSE = 0.05
"""Share of non-zero codes above which two code matrices are multiplied as dense float64
arrays (dictionaries whose codes are mostly non-zero: PCA, ICA); scipy's sparse product
would take minutes there."""


Codes = sp.csr_matrix | np.ndarray
"""[units, latents] codes: sparse (SAEs), or a dense array (PCA, ICA, NMF: mostly non-zero,
where scipy's sparse operations would take minutes)."""


def is_dense(x: Codes) -> bool:
    """Whether x is a dense array, or more than DENSE of its entries are non-zero."""
    if not sp.issparse(x):
        return True
    return x.nnz > DENSE * max(x.shape[0], 1) * x.shape[1]


def square_sums(x: Codes) -> np.ndarray:
    """[latents] the sum of each column's squares."""
    if sp.issparse(x):
        return np.asarray(x.multiply(x).sum(0)).ravel()
    return np.einsum("ij,ij->j", x, x, dtype=np.float64)


def column_major(x: Codes) -> Codes:
    """x in the layout that slices columns fast."""
    return x.tocsc() if sp.issparse(x) else x


def products(x: Codes, y: Codes) -> np.ndarray:
    """[x's columns, y's columns] x' y, dense (a dense float64 product where both are dense)."""
    if is_dense(x) and is_dense(y):
        xd = x.toarray() if sp.issparse(x) else x
        yd = y.toarray() if sp.issparse(y) else y
        return xd.astype(np.float64, copy=False).T @ yd.astype(np.float64, copy=False)
    out = x.T @ y
    return out.toarray() if sp.issparse(out) else np.asarray(out)


def text_sums(x: Codes, text: np.ndarray, n_texts: int) -> Codes:
    """[n_texts, latents]: per text, the codes summed over its units, divided by sqrt(n_t) (so
    that a product of two of them is sum_t S_a S_b / n_t)."""
    counts = np.bincount(text, minlength=n_texts).astype(np.float64)
    group = sp.csr_matrix(
        (1.0 / np.sqrt(counts[text]), (text, np.arange(len(text)))), shape=(n_texts, len(text))
    )
    out = group @ x
    return out.tocsr() if sp.issparse(out) else np.asarray(out)


@dataclass
class Moments:
    """Per-latent sums over the units, for each view: sum and sum of squares."""

    n: int
    sums: dict[str, np.ndarray]
    squares: dict[str, np.ndarray]

    @classmethod
    def of(cls, x: Codes, per_text: Codes) -> Moments:
        total = np.asarray(x.sum(0, dtype=np.float64)).ravel()
        sq = square_sums(x)
        sq_text = square_sums(per_text)
        return cls(
            n=x.shape[0],
            sums={"raw": total, "residual": np.zeros_like(total), "token": total},
            squares={"raw": sq, "residual": np.maximum(sq - sq_text, 0.0), "token": sq_text},
        )

    def std(self, view: str) -> np.ndarray:
        """Population standard deviation of each latent (0 where constant)."""
        mean = self.sums[view] / self.n
        return np.sqrt(np.maximum(self.squares[view] / self.n - mean**2, 0.0))


def pearson(cross: np.ndarray, ma: Moments, mb: Moments, view: str, rows: slice) -> np.ndarray:
    """Correlations [rows of a, latents of b] from the cross products of one view (computed
    in place in `cross`); 0 where either latent is constant."""
    n = ma.n
    r = cross
    r /= n
    r -= np.outer(ma.sums[view][rows] / n, mb.sums[view] / n)
    std_a, std_b = ma.std(view)[rows], mb.std(view)
    with np.errstate(divide="ignore"):
        inv_a = np.where(std_a > 0, 1.0 / std_a, 0.0)
        inv_b = np.where(std_b > 0, 1.0 / std_b, 0.0)
    r *= inv_a[:, None]
    r *= inv_b[None, :]
    return np.clip(r, -1.0, 1.0, out=r)


BLOCK_BYTES = 128 << 20
"""Memory for one block of correlations: each view's [block, latents of b] float64 matrix
is held a few times over (products, correlations, the partner search), so a wide SAE gets
fewer rows per block rather than more memory."""


def block_rows(m_b: int) -> int:
    """Rows of a per block: 1,024 for the default widths, fewer past them (65,536 latents of
    b: 256)."""
    return max(16, min(1024, BLOCK_BYTES // (8 * max(m_b, 1))))


HALVES = ("half0", "half1")
"""The raw view on each half of the units alone (the cross-fitted partners' two halves)."""


def correlation_blocks(
    a: Codes,
    b: Codes,
    text: np.ndarray | None,
    visit: Callable[[slice, dict[str, np.ndarray]], None],
    block: int = 0,
    half: np.ndarray | None = None,
) -> tuple[Moments, Moments]:
    """Call visit(rows of a, {view: r [rows, latents of b]}) for every block of a's latents.
    `text` [units] gives each unit's text id (None: only the raw view). `half` [units] (0 or
    1) adds the raw view on each half's units alone ("half0", "half1"): the two halves'
    products add up to the whole's, so the sparse work is the same. `block` (0: sized from
    b's width, see block_rows) bounds the memory. Returns both SAEs' moments."""
    block = block or block_rows(b.shape[1])
    n_texts = int(text.max()) + 1 if text is not None and len(text) else 0
    ta = text_sums(a, text, n_texts) if text is not None else sp.csr_matrix(a.shape)
    tb = text_sums(b, text, n_texts) if text is not None else sp.csr_matrix(b.shape)
    ma, mb = Moments.of(a, ta), Moments.of(b, tb)
    a_csc, ta_csc = column_major(a), column_major(ta)
    parts = []  # per half: (a's columns, b, a's moments, b's moments)
    if half is not None:
        for h in (0, 1):
            rows_h = np.flatnonzero(half == h)
            ah, bh = a[rows_h], b[rows_h]
            empty_a, empty_b = sp.csr_matrix(ah.shape), sp.csr_matrix(bh.shape)
            parts.append((column_major(ah), bh, Moments.of(ah, empty_a), Moments.of(bh, empty_b)))
    for lo in range(0, a.shape[1], block):
        rows = slice(lo, min(lo + block, a.shape[1]))
        views = {}
        if parts:
            crosses = [products(ah[:, rows], bh) for ah, bh, _, _ in parts]
            raw = crosses[0] + crosses[1]
            for name, cross, (_, _, mah, mbh) in zip(HALVES, crosses, parts, strict=True):
                views[name] = pearson(cross, mah, mbh, "raw", rows)
        else:
            raw = products(a_csc[:, rows], b)
        if text is not None:
            tok = products(ta_csc[:, rows], tb)
            views["residual"] = pearson(raw - tok, ma, mb, "residual", rows)
            views["token"] = pearson(tok, ma, mb, "token", rows)
        views["raw"] = pearson(raw, ma, mb, "raw", rows)
        visit(rows, views)
    return ma, mb


class TopPartners:
    """Running top-k partners of every latent on both sides, over blocks of correlations."""

    def __init__(self, m_a: int, m_b: int, k: int):
        self.k = k
        self.a_val = np.full((m_a, k), -np.inf)
        self.a_idx = np.zeros((m_a, k), dtype=np.int64)
        self.b_val = np.full((m_b, k), -np.inf)
        self.b_idx = np.zeros((m_b, k), dtype=np.int64)

    def add(self, rows: slice, r: np.ndarray) -> None:
        """Merge one block of correlations [rows of a, latents of b] (torch's top-k: far
        faster than numpy's argpartition on such blocks)."""
        x = torch.from_numpy(r)
        k = min(self.k, r.shape[1])
        vals, top = x.topk(k, dim=1, sorted=False)
        self.a_val[rows, :k] = vals.numpy()
        self.a_idx[rows, :k] = top.numpy()
        kb = min(self.k, r.shape[0])
        col_vals, col_top = x.topk(kb, dim=0, sorted=False)  # [kb, m_b]
        both_v = np.concatenate([self.b_val, col_vals.numpy().T], axis=1)
        both_i = np.concatenate([self.b_idx, col_top.numpy().T + rows.start], axis=1)
        keep = np.argpartition(both_v, both_v.shape[1] - self.k, axis=1)[:, -self.k :]
        self.b_val = np.take_along_axis(both_v, keep, axis=1)
        self.b_idx = np.take_along_axis(both_i, keep, axis=1)

    def finish(self) -> None:
        """Sort each latent's partners from best to worst."""
        for v, i in ((self.a_val, self.a_idx), (self.b_val, self.b_idx)):
            order = np.argsort(-v, axis=1, kind="stable")
            v[:] = np.take_along_axis(v, order, axis=1)
            i[:] = np.take_along_axis(i, order, axis=1)
