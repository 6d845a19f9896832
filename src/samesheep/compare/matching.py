"""Matching latents of two SAEs from their correlations: best partners both ways, mutual
pairs, a one-to-one assignment, and families (one latent whose activity is split over
several of the other)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

FAMILY_R = 0.3
"""A latent joins a family when its best partner is the family's head with at least this r."""


def mutual_pairs(a_best: np.ndarray, b_best: np.ndarray) -> np.ndarray:
    """[n, 2] pairs (i, j) where j is i's best partner and i is j's."""
    i = np.arange(len(a_best))
    mutual = b_best[a_best] == i
    return np.stack([i[mutual], a_best[mutual]], axis=1)


def candidate_pairs(
    a_idx: np.ndarray, a_val: np.ndarray, b_idx: np.ndarray, b_val: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, r) of every pair that is among the top partners of either side, once each."""
    m_a, k = a_idx.shape
    m_b = b_idx.shape[0]
    i = np.concatenate([np.repeat(np.arange(m_a), k), b_idx.ravel()])
    j = np.concatenate([a_idx.ravel(), np.repeat(np.arange(m_b), b_idx.shape[1])])
    r = np.concatenate([a_val.ravel(), b_val.ravel()])
    ok = np.isfinite(r)
    key, first = np.unique(i[ok] * m_b + j[ok], return_index=True)
    return key // m_b, key % m_b, r[ok][first]


def assignment(
    i: np.ndarray, j: np.ndarray, r: np.ndarray, m_a: int, m_b: int, min_r: float = 0.0
) -> np.ndarray:
    """[n, 2] the one-to-one pairing that maximises the sum of r over pairs with r > min_r,
    among the candidate pairs (i, j, r) (the Hungarian problem on the sparse candidate graph).

    Every latent may also stay unpaired: each gets a private dummy partner, and each
    candidate edge a zero-cost edge between the two dummies, so a full matching always exists
    and a candidate pair's cost is -r against 0 for leaving both unpaired."""
    good = r > min_r
    i, j, r = i[good], j[good], r[good]
    n = len(i)
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    # rows: A latents then B's dummies; columns: B latents then A's dummies
    big = float(r.max()) + 1.0  # costs must be positive: shift every edge by the same amount
    rows = np.concatenate([i, np.arange(m_a), m_a + j, m_a + np.arange(m_b)])
    cols = np.concatenate([j, m_b + np.arange(m_a), m_b + i, np.arange(m_b)])
    cost = np.concatenate([big - r, np.full(m_a, big), np.full(n, big), np.full(m_b, big)])
    # the dummy-dummy edges carry the same shift: a pair (i, j) costs 2 big - r against 2 big
    graph = sp.csr_matrix((cost, (rows, cols)), shape=(m_a + m_b, m_b + m_a))
    graph.sum_duplicates()
    row, col = min_weight_full_bipartite_matching(graph)
    real = (row < m_a) & (col < m_b)
    pairs = np.stack([row[real], col[real]], axis=1).astype(np.int64)
    return pairs[np.argsort(pairs[:, 0], kind="stable")]


def families(
    best_of_b: np.ndarray, r_of_b: np.ndarray, min_r: float = FAMILY_R
) -> dict[int, np.ndarray]:
    """{head: members}: latents of one side (the head, on the other) that two or more latents
    of this side pick as their best partner with r >= min_r."""
    ok = r_of_b >= min_r
    heads, counts = np.unique(best_of_b[ok], return_counts=True)
    out = {}
    for h in heads[counts >= 2]:
        out[int(h)] = np.flatnonzero(ok & (best_of_b == h))
    return out
