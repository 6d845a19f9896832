"""Representation similarity of paired rows (decoder directions of matched latents, or
hidden states): SVCCA and RSA, each against random pairings (Lan et al. 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata


def keep_for_variance(singular: np.ndarray, share: float) -> int:
    """The fewest leading components whose variance (singular values squared) reaches
    `share` of the total: the correct form of SVCCA's truncation (the published code compares
    a normalised cumulative sum with 0.99 times the total, so it keeps one component)."""
    var = singular.astype(np.float64) ** 2
    total = var.sum()
    if total <= 0:
        return 0
    cumulative = np.cumsum(var) / total
    return int(min(np.searchsorted(cumulative, share - 1e-12) + 1, len(var)))


def _top_directions(x: np.ndarray, keep: int) -> np.ndarray:
    """The data (centred) projected onto its `keep` leading singular directions."""
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :keep] * s[:keep]


def cca_mean(x: np.ndarray, y: np.ndarray) -> float:
    """Mean canonical correlation of two centred data matrices (rows paired)."""
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    rho = np.linalg.svd(qx.T @ qy, compute_uv=False)
    k = min(x.shape[1], y.shape[1])
    return float(np.clip(rho[:k], 0.0, 1.0).mean()) if k else math.nan


def _kept(keep: int | float, singular: np.ndarray, shape: tuple[int, ...]) -> int:
    """How many leading directions SVCCA keeps of data of `shape` [n, d] with these singular
    values: `keep` itself (a count), or as many as hold that share of the variance; never
    more than d or n - 1."""
    kept = keep if isinstance(keep, int) else keep_for_variance(singular, keep)
    return min(kept, shape[1], shape[0] - 1)


def kept_dimensions(x: np.ndarray, keep: int | float) -> int:
    """How many leading directions SVCCA keeps of x [n, d] (see _kept)."""
    singular = np.zeros(0) if isinstance(keep, int) else _sv(x)  # a count needs no SVD
    return _kept(keep, singular, x.shape)


def leading_basis(x: np.ndarray, keeps: Sequence[int | float]) -> tuple[np.ndarray, dict[str, int]]:
    """(u [n, widest], {setting as written: kept}): the centred x's leading left singular
    vectors, as many as the widest setting keeps, and how many each setting keeps. Every
    setting's basis is a leading slice of u, so one SVD (and, for SVCCA of two such
    bases, one product) serves every setting."""
    x = x - x.mean(0)
    # The right singular vectors from the float64 d x d covariance, the left ones as
    # x v / s: a third of an SVD's time on a tall [n, d] matrix, and as exact where the kept
    # singular values are not tiny against the largest (else the SVD itself).
    x64 = x.astype(np.float64)
    lam, v = np.linalg.eigh(x64.T @ x64)
    s = np.sqrt(np.clip(lam[::-1], 0.0, None))
    kept = {str(keep): max(_kept(keep, s, x.shape), 1) for keep in keeps}
    widest = max(kept.values(), default=1)
    if s[widest - 1] > 1e-6 * s[0]:
        u = (x64 @ v[:, ::-1][:, :widest]) / s[:widest]
        return u.astype(x.dtype if x.dtype == np.float32 else np.float64), kept
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    kept = {str(keep): max(_kept(keep, s, x.shape), 1) for keep in keeps}
    return u[:, : max(kept.values(), default=1)], kept


def kept_bases(x: np.ndarray, keeps: Sequence[int | float]) -> dict[str, np.ndarray]:
    """For each setting (keyed as written), an orthonormal basis [n, kept] of the centred
    x's kept leading directions, the left singular vectors: SVCCA's canonical correlations
    are computed between such bases."""
    u, kept = leading_basis(x, keeps)
    return {setting: u[:, :k] for setting, k in kept.items()}


def kept_basis(x: np.ndarray, keep: int | float) -> np.ndarray:
    """kept_bases for one setting."""
    return kept_bases(x, [keep])[str(keep)]


def svcca(x: np.ndarray, y: np.ndarray, keep: int | float = 0.99) -> float:
    """SVCCA of paired rows x [n, d1] and y [n, d2]: each side reduced to its leading singular
    directions (`keep` of them, or as many as hold that share of the variance), then the mean
    canonical correlation of the two reductions."""
    kx, ky = kept_dimensions(x, keep), kept_dimensions(y, keep)
    if kx < 1 or ky < 1:
        return math.nan
    return cca_mean(_top_directions(x, kx), _top_directions(y, ky))


def _sv(x: np.ndarray) -> np.ndarray:
    return np.linalg.svd(x - x.mean(0), compute_uv=False)


def rsa(x: np.ndarray, y: np.ndarray, max_rows: int = 2000, seed: int = 0) -> float:
    """RSA: Spearman correlation between the two sides' pairwise cosine similarities (upper
    triangles), on at most max_rows rows (a seeded sample)."""
    if len(x) > max_rows:
        pick = np.random.default_rng(seed).choice(len(x), max_rows, replace=False)
        x, y = x[pick], y[pick]
    iu = np.triu_indices(len(x), 1)
    sx, sy = _cosines(x)[iu], _cosines(y)[iu]
    return float(np.corrcoef(rankdata(sx), rankdata(sy))[0, 1])


def _cosines(x: np.ndarray) -> np.ndarray:
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return u @ u.T


def _result(value: float, null: np.ndarray) -> dict[str, float]:
    return {
        "value": value,
        "null_mean": float(null.mean()),
        "null_sd": float(null.std()),
        "p": float((1 + (null >= value).sum()) / (1 + len(null))),
        "pairings": len(null),
    }


def svcca_test(
    x: np.ndarray, y: np.ndarray, keep: int | float = 0.99, n: int = 100, seed: int = 0
) -> dict[str, float]:
    """SVCCA on the true pairing of rows against n random pairings (y's rows shuffled), with
    p = (1 + #null >= value) / (1 + n). The reductions do not depend on the pairing, so each
    random pairing costs one small SVD."""
    qx, qy = kept_basis(x, keep), kept_basis(y, keep)
    kx, ky = qx.shape[1], qy.shape[1]
    k = min(kx, ky)

    def stat(perm: np.ndarray | None) -> float:
        rho = np.linalg.svd(qx.T @ (qy if perm is None else qy[perm]), compute_uv=False)
        return float(np.clip(rho[:k], 0.0, 1.0).mean())

    rng = np.random.default_rng(seed)
    null = np.array([stat(rng.permutation(len(y))) for _ in range(n)])
    return {**_result(stat(None), null), "kept_a": kx, "kept_b": ky}


def rsa_test(
    x: np.ndarray, y: np.ndarray, n: int = 100, seed: int = 0, max_rows: int = 2000
) -> dict[str, float]:
    """RSA on the true pairing against n random pairings: the Spearman correlation of the two
    sides' pairwise cosine similarities (on at most max_rows rows, a seeded sample)."""
    rng = np.random.default_rng(seed)
    if len(x) > max_rows:
        pick = rng.choice(len(x), max_rows, replace=False)
        x, y = x[pick], y[pick]
    iu = np.triu_indices(len(x), 1)
    rank_x = rankdata(_cosines(x)[iu])
    rank_y = np.zeros((len(y), len(y)))
    rank_y[iu] = rankdata(_cosines(y)[iu])
    rank_y = rank_y + rank_y.T  # symmetric, so a permuted pairing reads it back in place

    def stat(perm: np.ndarray | None) -> float:
        ry = rank_y if perm is None else rank_y[np.ix_(perm, perm)]
        return float(np.corrcoef(rank_x, ry[iu])[0, 1])

    null = np.array([stat(rng.permutation(len(y))) for _ in range(n)])
    return _result(stat(None), null)
