"""Similarity of two representations of the same n items (rows paired, e.g. hidden states
of two models on aligned units): linear CKA, its debiased form (the unbiased HSIC estimator
of Song et al. 2012), mutual k-nearest neighbours and CKNNA (Huh et al. 2024), and SVCCA
over a sweep of kept dimensions. Each is a pure function of two matrices [n, d1], [n, d2],
computed in float64; SVCCA itself lives in geometry.

CKA is computed in feature space (d x d products, never an n x n Gram matrix), so many
layer pairs and permutations stay cheap; the nearest-neighbour metrics need the n x n
similarities and are meant for samples of a few thousand items."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .geometry import svcca

OUTLIER_DIM_RATIO = 10.0
"""A dimension is an outlier when its root mean square over the items exceeds this multiple
of the median dimension's. Measured on the default run's held-out tokens (massive-norm
tokens left out, as every stage does): Gemma layer 12 has one such dimension (90x the
median), SmolLM2 layer 20 two (26x, 21x), the next at 6.5x and 8.2x; the random-weights
copies none (at most 2.6x)."""


def _centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a [items, dims] matrix, got shape {x.shape}")
    return x - x.mean(0)


def _paired(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _centred(x), _centred(y)
    if len(x) != len(y):
        raise ValueError(f"the two sides hold {len(x)} and {len(y)} items: rows must be paired")
    return x, y


def _ratio(xy: float, xx: float, yy: float) -> float:
    return xy / math.sqrt(xx * yy) if xx > 0 and yy > 0 else math.nan


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019): ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) on centred
    features; 1 for identical inputs, invariant to orthogonal transforms and isotropic
    scaling of either side. nan where a side is constant."""
    x, y = _paired(x, y)
    return _ratio(
        float(np.linalg.norm(y.T @ x) ** 2),
        float(np.linalg.norm(x.T @ x) ** 2),
        float(np.linalg.norm(y.T @ y) ** 2),
    )


def hsic_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased HSIC estimator (Song et al. 2012, eq. 5) of the linear kernels K = XX',
    L = YY' of centred features, from d x d products: with the diagonals of K and L zeroed,
    [tr(KL) + 1'K1 1'L1 / ((n-1)(n-2)) - 2 1'KL1 / (n-2)] / (n(n-3)). Needs n >= 4."""
    x, y = _paired(x, y)
    n = len(x)
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 items, not {n}")
    a, b = (x * x).sum(1), (y * y).sum(1)  # the diagonals of K and L
    trace = float(np.linalg.norm(x.T @ y) ** 2 - a @ b)
    k1, l1 = x @ x.sum(0) - a, y @ y.sum(0) - b  # K1 and L1 with the diagonals zeroed
    total = trace + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 * (k1 @ l1) / (n - 2)
    return float(total / (n * (n - 3)))


def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA with the unbiased HSIC in place of the biased one: near 0 for independent inputs
    where plain CKA reads well above 0 when dimensions are many against items, and 1 for
    identical inputs."""
    return _ratio(hsic_unbiased(x, y), hsic_unbiased(x, x), hsic_unbiased(y, y))


def standardized(x: np.ndarray) -> np.ndarray:
    """Each dimension centred and scaled to unit variance; constant dimensions dropped."""
    x = _centred(x)
    sd = x.std(0)
    keep = sd > 0
    return x[:, keep] / sd[keep]


def outlier_dimensions(x: np.ndarray, ratio: float = OUTLIER_DIM_RATIO) -> np.ndarray:
    """[d] bool: dimensions whose root mean square over the items exceeds `ratio` times the
    median dimension's."""
    x = np.asarray(x, dtype=np.float64)
    rms = np.sqrt((x * x).mean(0))
    return rms > ratio * np.median(rms)


def without_outlier_dimensions(x: np.ndarray, ratio: float = OUTLIER_DIM_RATIO) -> np.ndarray:
    return np.asarray(x)[:, ~outlier_dimensions(x, ratio)]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n - 2:
        raise ValueError(f"k = {k} neighbours need at least k + 2 items, not {n}")


def knn_mask(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask [n, n] bool: mask[i, j] when j is among i's k nearest neighbours by cosine, i
    itself left out; the cosine similarities [n, n])."""
    n = len(x)
    _check_k(n, k)
    u = _unit_rows(x)
    sim = u @ u.T
    ranked = sim.copy()
    np.fill_diagonal(ranked, -np.inf)
    nearest = np.argpartition(-ranked, k - 1, axis=1)[:, :k]
    mask = np.zeros((n, n), dtype=bool)
    mask[np.arange(n)[:, None], nearest] = True
    return mask, sim


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024): the mean share of each item's
    k nearest neighbours (cosine) in one representation that are also among its k nearest in
    the other. 1 for identical inputs; about k / (n - 1) for independent ones."""
    if len(x) != len(y):
        raise ValueError(f"the two sides hold {len(x)} and {len(y)} items: rows must be paired")
    mx, _ = knn_mask(x, k)
    my, _ = knn_mask(y, k)
    return float((mx & my).sum(1).mean() / k)


def _hsic_kernels(a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased HSIC of two n x n kernel matrices (not necessarily symmetric)."""
    n = len(a)
    a, b = a.copy(), b.copy()
    np.fill_diagonal(a, 0.0)
    np.fill_diagonal(b, 0.0)
    total = (
        (a * b.T).sum()
        + a.sum() * b.sum() / ((n - 1) * (n - 2))
        - 2.0 * (a.sum(0) @ b.sum(1)) / (n - 2)
    )
    return float(total / (n * (n - 3)))


def cknna(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """CKNNA (Huh et al. 2024): CKA with the unbiased HSIC, restricted to the pairs (i, j)
    where j is among i's k nearest neighbours in both representations (cosine kernels of
    unit rows). 1 for identical inputs, near 0 for independent ones."""
    if len(x) != len(y):
        raise ValueError(f"the two sides hold {len(x)} and {len(y)} items: rows must be paired")
    mx, kx = knn_mask(x, k)
    my, ky = knn_mask(y, k)

    def masked(m1: np.ndarray, m2: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        both = m1 & m2
        return _hsic_kernels(np.where(both, a, 0.0), np.where(both, b, 0.0))

    return _ratio(masked(mx, my, kx, ky), masked(mx, mx, kx, kx), masked(my, my, ky, ky))


def svcca_sweep(
    x: np.ndarray, y: np.ndarray, keeps: Sequence[int | float] = (0.5, 0.9, 0.99, 8, 32, 128)
) -> dict[str, float]:
    """SVCCA for each kept-dimension setting (a count, or a share of the variance), keyed by
    the setting as written: one truncation alone can decide the number."""
    return {str(keep): svcca(x, y, keep) for keep in keeps}


def within_group_permutation(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the items that moves each only among the items of its own group (its
    document): the null that keeps each document's topic and breaks the pairing inside it."""
    groups = np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    # a random key inside each group, then a stable sort by group: shuffles within groups
    keys = rng.random(len(groups))
    shuffled = order[np.lexsort((keys, sorted_groups))]
    perm = np.empty(len(groups), dtype=np.int64)
    perm[order] = shuffled
    return perm
