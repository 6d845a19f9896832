"""Comparing two SAEs on the same text: correlations on aligned units, partners both ways,
headline numbers with intervals over documents, nulls, and the split of agreement into what
the unit's text predicts and what lies beyond it.

One `Measurement` is the whole correlation analysis of one pair of SAEs on one set of units;
the compare stage runs it for the trained pair, the random-weights pair (the floor), each
model against its second-seed SAE (the ceilings) and the shifted pairings (the nulls), always
on the same documents, and puts the numbers side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..data.alignment import Units
from .correlation import (
    HALVES,
    VIEWS,
    Codes,
    TopPartners,
    correlation_blocks,
    is_dense,
    products,
    square_sums,
)
from .matching import candidate_pairs

DIRECTIONS = ("a_to_b", "b_to_a")


@dataclass
class Settings:
    """What a comparison measures (see CompareConfig for the documented defaults)."""

    min_fires: int = 20
    thresholds: tuple[float, ...] = (0.3, 0.5, 0.7)
    partners: int = 5
    groups: int = 20
    residual: bool = True
    block: int = 0  # rows of a per block of correlations (0: sized from b's width)


@dataclass
class Measurement:
    """The correlations of one pair of SAEs over one set of units."""

    n_units: int
    partners: dict[str, TopPartners]  # per view
    fires_a: np.ndarray  # [m_a] units each latent fires on
    fires_b: np.ndarray
    cand_i: np.ndarray  # raw-view candidate pairs (top partners of either side)
    cand_j: np.ndarray
    group_n: np.ndarray  # [G] units per document group
    group_cross: np.ndarray  # [G, pairs] sum of a_i b_j over each group's units
    group_moments: dict[str, np.ndarray] = field(default_factory=dict)  # [G, m] sums, squares
    half_of_group: np.ndarray | None = None  # [G] 0 or 1: the halves of the cross-fitting
    left_out: dict[bool, list[tuple[np.ndarray, np.ndarray]]] = field(
        default_factory=dict, repr=False
    )  # crossfit -> per group left out, both sides' best r (filled by dropped_best)

    @property
    def m_a(self) -> int:
        return len(self.fires_a)

    @property
    def m_b(self) -> int:
        return len(self.fires_b)


def measure(
    a: Codes,
    b: Codes,
    text: np.ndarray | None,
    group: np.ndarray,
    s: Settings,
    halves: bool = False,
) -> Measurement:
    """Correlate every latent of a with every latent of b over the units (rows), keeping the
    top partners of each latent in every view, and the per-group sums the jackknife needs
    for the raw view. `group` [units] is each unit's document group (0..G-1). `halves` also
    keeps the raw view's top partners on each half of the groups alone (for cross-fitting;
    see crossfit_best), where both halves hold units."""
    m_a, m_b = a.shape[1], b.shape[1]
    n_groups = int(group.max()) + 1 if len(group) else 0
    half_of_group = group_halves(n_groups) if halves else None
    half = half_of_group[group] if half_of_group is not None else None
    if half is not None and (half.all() or not half.any()):
        half_of_group = half = None  # one half holds no unit: nothing to cross-fit
    views = VIEWS if text is not None and s.residual else ("raw",)
    views += HALVES if half is not None else ()
    partners = {v: TopPartners(m_a, m_b, s.partners) for v in views}

    def visit(rows: slice, r: dict[str, np.ndarray]) -> None:
        for v, block in r.items():
            if v in partners:
                partners[v].add(rows, block)

    use_text = text if text is not None and s.residual else None
    correlation_blocks(a, b, use_text, visit, s.block, half)
    for p in partners.values():
        p.finish()
    # candidates: the top partners of either side on all units and on each half
    searched = [p for v, p in partners.items() if v == "raw" or v in HALVES]
    found = [candidate_pairs(p.a_idx, p.a_val, p.b_idx, p.b_val) for p in searched]
    key = np.unique(np.concatenate([i * m_b + j for i, j, _ in found]))
    ci, cj = key // m_b, key % m_b
    g_n, g_cross, g_mom = group_sums(a, b, group, n_groups, ci, cj)
    return Measurement(
        n_units=a.shape[0],
        partners=partners,
        fires_a=np.asarray((a > 0).sum(0)).ravel(),
        fires_b=np.asarray((b > 0).sum(0)).ravel(),
        cand_i=ci,
        cand_j=cj,
        group_n=g_n,
        group_cross=g_cross,
        group_moments=g_mom,
        half_of_group=half_of_group,
    )


def group_halves(n_groups: int) -> np.ndarray:
    """[G] the half (0 or 1) of each document group: the first ceil(G/2) groups, the rest
    (the groups are documents dealt at random, so each half is a random half of them)."""
    return (np.arange(n_groups) >= (n_groups + 1) // 2).astype(np.int64)


def group_sums(
    a: Codes,
    b: Codes,
    group: np.ndarray,
    n_groups: int,
    ci: np.ndarray,
    cj: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per document group: units, the cross products of the candidate pairs, and each
    latent's sum and sum of squares: what recomputes any candidate's r without a group."""
    n = np.bincount(group, minlength=n_groups)
    cross = np.zeros((n_groups, len(ci)))
    sizes = {"sa": a.shape[1], "qa": a.shape[1], "sb": b.shape[1], "qb": b.shape[1]}
    mom = {k: np.zeros((n_groups, m)) for k, m in sizes.items()}
    dense = is_dense(a) and is_dense(b)
    for g in range(n_groups):
        rows = np.flatnonzero(group == g)
        ag, bg = a[rows], b[rows]
        mom["sa"][g] = np.asarray(ag.sum(0, dtype=np.float64)).ravel()
        mom["qa"][g] = square_sums(ag)
        mom["sb"][g] = np.asarray(bg.sum(0, dtype=np.float64)).ravel()
        mom["qb"][g] = square_sums(bg)
        if len(ci) and dense:  # every product, then the candidates' (no [rows, pairs] copy)
            cross[g] = products(ag, bg)[ci, cj]
        elif len(ci):
            cross[g] = np.asarray(ag[:, ci].multiply(bg[:, cj]).sum(0)).ravel()
    return n, cross, mom


def candidate_r(m: Measurement, drop: np.ndarray | None = None) -> np.ndarray:
    """[pairs] Pearson r of every candidate pair over the units of the groups not in `drop`
    (a boolean [G] mask; None: all units)."""
    keep = np.ones(len(m.group_n), dtype=bool) if drop is None else ~drop
    return _r_over(m, keep)


def _r_over(m: Measurement, keep: np.ndarray) -> np.ndarray:
    """[pairs] Pearson r of every candidate pair over the units of the groups in `keep`."""
    n = m.group_n[keep].sum()
    if n == 0:
        return np.zeros(len(m.cand_i))
    sa = m.group_moments["sa"][keep].sum(0)[m.cand_i]
    qa = m.group_moments["qa"][keep].sum(0)[m.cand_i]
    sb = m.group_moments["sb"][keep].sum(0)[m.cand_j]
    qb = m.group_moments["qb"][keep].sum(0)[m.cand_j]
    c = m.group_cross[keep].sum(0)
    cov = c / n - sa * sb / n**2
    var = np.maximum(qa / n - (sa / n) ** 2, 0) * np.maximum(qb / n - (sb / n) ** 2, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, cov / np.sqrt(var), 0.0)


def best_from_candidates(m: Measurement, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([m_a], [m_b]) each latent's best r among its candidate pairs."""
    best_a = np.full(m.m_a, -np.inf)
    best_b = np.full(m.m_b, -np.inf)
    np.maximum.at(best_a, m.cand_i, r)
    np.maximum.at(best_b, m.cand_j, r)
    return best_a, best_b


def crossfit_best(
    m: Measurement, drop: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """([m_a], [m_b], [m_a], [m_b]) each latent's cross-fitted best r and its partners: the
    partner chosen on one half of the document groups, its r measured on the other half, both
    ways round, averaged (choosing the best of ~10k candidates on the units that also measure
    it inflates r, most for rare latents). The partners are those chosen on the first half.
    `drop` ([G] boolean) leaves groups out of both halves, for the jackknife."""
    if m.half_of_group is None:
        raise ValueError("this measurement kept no halves to cross-fit")
    left = np.zeros(len(m.group_n), dtype=bool) if drop is None else drop
    r_half = [_r_over(m, (m.half_of_group == h) & ~left) for h in (0, 1)]
    out = []
    for mine, theirs, n in ((m.cand_i, m.cand_j, m.m_a), (m.cand_j, m.cand_i, m.m_b)):
        value = np.zeros(n)
        chosen_first = np.full(n, -1, dtype=np.int64)
        for h in (0, 1):
            pick = _best_candidate(mine, r_half[h], n)  # chosen on half h
            ok = pick >= 0
            value[ok] += r_half[1 - h][pick[ok]] / 2  # measured on the other
            if h == 0:
                chosen_first[ok] = theirs[pick[ok]]
        out.append((value, chosen_first))
    (best_a, partner_a), (best_b, partner_b) = out
    return best_a, best_b, partner_a, partner_b


def _best_candidate(owner: np.ndarray, r: np.ndarray, n: int) -> np.ndarray:
    """[n] the index (into the candidates) of each latent's candidate of highest r; -1 where
    a latent has none with r > 0 (one that is constant on the half chooses nothing: a tie
    broken by index could pick the partner the other half found, and leak it back)."""
    order = np.lexsort((-r, owner))
    first = order[np.flatnonzero(np.diff(owner[order], prepend=-1))]
    first = first[r[first] > 0]
    out = np.full(n, -1, dtype=np.int64)
    out[owner[first]] = first
    return out


# ---------------------------------------------------------------- headline numbers


def headline(best: np.ndarray, fires: np.ndarray, s: Settings) -> dict[str, float]:
    """The numbers of one direction: over the latents that fire on at least min_fires units,
    the mean best-partner r and the share with a partner of r >= each threshold (also
    weighted by firing frequency)."""
    judge = fires >= s.min_fires
    out: dict[str, float] = {"judged": int(judge.sum())}
    b = np.where(np.isfinite(best), best, 0.0)[judge]
    w = fires[judge].astype(np.float64)
    out["mean_best_r"] = float(b.mean()) if len(b) else math.nan
    out["mean_best_r_weighted"] = float((w * b).sum() / w.sum()) if w.sum() else math.nan
    for t in s.thresholds:
        out[f"share_r{t:g}"] = float((b >= t).mean()) if len(b) else math.nan
        out[f"share_r{t:g}_weighted"] = float(w[b >= t].sum() / w.sum()) if w.sum() else math.nan
    return out


def curve(best: np.ndarray, fires: np.ndarray, s: Settings, steps: int = 21) -> list[list[float]]:
    """[[r, share of judged latents with a partner of at least r]] from 0 to 1."""
    judge = fires >= s.min_fires
    b = np.where(np.isfinite(best), best, 0.0)[judge]
    grid = np.linspace(0, 1, steps)
    return [[float(t), float((b >= t).mean()) if len(b) else math.nan] for t in grid]


def histogram(best: np.ndarray, fires: np.ndarray, s: Settings, bins: int = 20) -> list[int]:
    """Judged latents per bin of best-partner r, bins of equal width over [0, 1] (an r
    below 0 counts in the first bin)."""
    judge = fires >= s.min_fires
    b = np.clip(np.where(np.isfinite(best), best, 0.0)[judge], 0.0, 1.0)
    return np.histogram(b, bins=bins, range=(0.0, 1.0))[0].tolist()


def by_decile(best: np.ndarray, fires: np.ndarray, s: Settings, threshold: float) -> list[dict]:
    """Mean best r and share >= threshold per firing-frequency decile of the judged latents."""
    judge = np.flatnonzero(fires >= s.min_fires)
    if not len(judge):
        return []
    order = judge[np.argsort(fires[judge], kind="stable")]
    out = []
    for d, part in enumerate(np.array_split(order, 10)):
        b = np.where(np.isfinite(best[part]), best[part], 0.0)
        row = {
            "decile": d + 1,
            "latents": len(part),
            "min_fires": int(fires[part].min()) if len(part) else 0,
            "max_fires": int(fires[part].max()) if len(part) else 0,
            "mean_best_r": float(b.mean()) if len(b) else math.nan,
        }
        for t in sorted({*s.thresholds, threshold}):
            row[f"share_r{t:g}"] = float((b >= t).mean()) if len(b) else math.nan
        out.append(row)
    return out


def mutual_count(m: Measurement, view: str, threshold: float, s: Settings) -> int:
    """Mutual best pairs with r >= threshold, among judged latents of both sides."""
    p = m.partners[view]
    a_best, b_best = p.a_idx[:, 0], p.b_idx[:, 0]
    i = np.arange(m.m_a)
    ok = (b_best[a_best] == i) & (p.a_val[:, 0] >= threshold)
    ok &= (m.fires_a >= s.min_fires) & (m.fires_b[a_best] >= s.min_fires)
    return int(ok.sum())


def jackknife(
    estimate: float, leave_out: np.ndarray, level: float = 0.95
) -> tuple[float, float, float]:
    """(low, high, standard error): a delete-one-group jackknife interval around the estimate
    from the G leave-one-group-out values (groups of documents, so no document repeats)."""
    vals = np.asarray(leave_out, dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    g = len(vals)
    if g < 2 or not math.isfinite(estimate):
        return math.nan, math.nan, math.nan
    se = math.sqrt((g - 1) / g * ((vals - vals.mean()) ** 2).sum())
    z = {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}.get(level, 1.96)
    return estimate - z * se, estimate + z * se, se


def dropped_best(m: Measurement, direction: str, crossfit: bool = False) -> list[np.ndarray]:
    """[G] the direction's best r per latent with each document group left out in turn (best
    partners searched among the candidate pairs, which hold them but where the data barely
    changes): in-sample, or cross-fitted (crossfit_best). Both sides' are computed at once
    and kept on m: the headline's intervals, the presence split and the layers read them."""
    if crossfit not in m.left_out:
        both = []
        for g in range(len(m.group_n)):
            drop = np.zeros(len(m.group_n), dtype=bool)
            drop[g] = True
            if crossfit:
                best_a, best_b, _, _ = crossfit_best(m, drop)
            else:
                best_a, best_b = best_from_candidates(m, candidate_r(m, drop))
            both.append((best_a, best_b))
        m.left_out[crossfit] = both
    return [a if direction == "a_to_b" else b for a, b in m.left_out[crossfit]]


def leave_one_out(
    m: Measurement, s: Settings, direction: str, crossfit: bool = False
) -> list[dict[str, float]]:
    """The direction's headline with each document group left out in turn (the judged set
    stays that of all the units)."""
    fires = m.fires_a if direction == "a_to_b" else m.fires_b
    return [headline(best, fires, s) for best in dropped_best(m, direction, crossfit)]


def share_curve(
    m: Measurement, s: Settings, direction: str, threshold: float, seed: int = 0
) -> list[list[float]]:
    """[[share of documents, the direction's share of judged latents with r >= threshold]]:
    how the statistic moves with the amount of text (it is a maximum over candidates)."""
    rng = np.random.default_rng(seed)
    n_groups = len(m.group_n)
    order = rng.permutation(n_groups)
    out = []
    for k in sorted({max(1, round(f * n_groups)) for f in (0.25, 0.5, 0.75, 1.0)}):
        drop = np.ones(n_groups, dtype=bool)
        drop[order[:k]] = False
        best_a, best_b = best_from_candidates(m, candidate_r(m, drop))
        best, fires = (best_a, m.fires_a) if direction == "a_to_b" else (best_b, m.fires_b)
        out.append([k / n_groups, headline(best, fires, s)[f"share_r{threshold:g}"]])
    return out


# ---------------------------------------------------------------- nulls


def shifted_within_documents(units: Units, seed: int = 0) -> np.ndarray:
    """A permutation of the units that shifts them circularly inside each document by a
    random nonzero amount (topic kept, alignment broken); documents with one unit stay."""
    rng = np.random.default_rng(seed)
    perm = np.arange(len(units))
    starts = np.flatnonzero(np.diff(units.doc, prepend=-1))
    ends = np.append(starts[1:], len(units))
    for lo, hi in zip(starts, ends, strict=True):
        n = hi - lo
        if n > 1:
            perm[lo:hi] = lo + (np.arange(n) + rng.integers(1, n)) % n
    return perm


def across_documents(
    units: Units, skip: int = 3, max_offset: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(rows of a, rows of b): each document's units paired in order with another
    document's, past the first `skip` units of both (where the text after a BOS would match
    trivially), from starting points `skip + 0..max_offset` drawn apart for the two sides so
    that the documents' starts never line up (a latent that follows the position in the
    document finds no partner there), as long as both last."""
    rng = np.random.default_rng(seed)
    starts = np.flatnonzero(np.diff(units.doc, prepend=-1))
    ends = np.append(starts[1:], len(units))
    n_docs = len(starts)
    if n_docs < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    other = (np.arange(n_docs) + rng.integers(1, n_docs)) % n_docs  # never itself
    off_a = rng.integers(0, max_offset + 1, n_docs)
    off_b = (off_a + rng.integers(1, max_offset + 1, n_docs)) % (max_offset + 1)  # != off_a
    rows_a, rows_b = [], []
    for d in range(n_docs):
        o = other[d]
        lo_a, lo_b = starts[d] + skip + off_a[d], starts[o] + skip + off_b[d]
        n = min(ends[d] - lo_a, ends[o] - lo_b)
        if n > 0:
            rows_a.append(lo_a + np.arange(n))
            rows_b.append(lo_b + np.arange(n))
    if not rows_a:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows_a), np.concatenate(rows_b)


def document_groups(units: Units, n_groups: int, seed: int = 0) -> np.ndarray:
    """[units] a document group for each unit: documents dealt at random into n_groups."""
    docs = np.unique(units.doc)
    g = np.random.default_rng(seed).permutation(len(docs)) % max(1, min(n_groups, len(docs)))
    return g[np.searchsorted(docs, units.doc)]
