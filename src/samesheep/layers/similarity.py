"""Similarity of two representations of the same n items (rows paired, e.g. hidden states
of two models on aligned units): linear CKA, unbiased CKA (the unbiased HSIC estimator of
Song et al. 2012: corrects the estimator's bias), input-debiased CKA (Cui et al. 2022: each
side's Gram matrix with an input-only Gram regressed out, which corrects the input's
confound), mutual k-nearest neighbours and CKNNA (Huh et al. 2024), and SVCCA over a sweep of
kept dimensions. Each is a pure function of the matrices [n, d], computed in float64; SVCCA
itself lives in geometry.

For many layer pairs and permutations, `prepare` each layer once and score pairs with
`pair_metrics` (float32 products by default). CKA is computed in feature space (d x d
products) or from packed Gram matrices (`PackedGrams`, `pairing_crosses`); the neighbour
searches need n x n similarities, a block of rows at a time, so they are meant for samples of
a few thousand items."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .geometry import leading_basis, svcca

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
    if not np.isfinite(x).all():
        raise ValueError("the states hold NaN or infinite values")
    return x - x.mean(0)


def _paired(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _centred(x), _centred(y)
    if len(x) != len(y):
        raise ValueError(f"the two sides hold {len(x)} and {len(y)} items: rows must be paired")
    return x, y


def _ratio(xy: float, xx: float, yy: float) -> float:
    return xy / math.sqrt(xx * yy) if xx > 0 and yy > 0 else math.nan


def _cross(x: np.ndarray, y: np.ndarray) -> float:
    """||Y'X||_F^2: the linear-kernel HSIC of centred features, up to its normaliser."""
    return float(np.linalg.norm(y.T @ x) ** 2)


def _hsic_linear(cross: float, sq_x: np.ndarray, sq_y: np.ndarray) -> float:
    """The unbiased HSIC (Song et al. 2012, eq. 5) of the linear kernels K = XX', L = YY' of
    centred features, from cross = ||X'Y||_F^2 and the row norms squared (K's and L's
    diagonals): with the diagonals zeroed, tr(KL) = cross - sq_x.sq_y and, as X'1 = 0,
    K1 = -sq_x, so [tr(KL) + 1'K1 1'L1 / ((n-1)(n-2)) - 2 1'KL1 / (n-2)] / (n(n-3))."""
    n = len(sq_x)
    dot = float(sq_x @ sq_y)
    total = cross - dot + sq_x.sum() * sq_y.sum() / ((n - 1) * (n - 2)) - 2.0 * dot / (n - 2)
    return float(total / (n * (n - 3)))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019): ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) on centred
    features; 1 for identical inputs, invariant to orthogonal transforms and isotropic
    scaling of either side. nan where a side is constant."""
    x, y = _paired(x, y)
    return _ratio(_cross(x, y), _cross(x, x), _cross(y, y))


def hsic_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased HSIC estimator of the linear kernels of two paired feature matrices,
    from d x d products (never an n x n Gram matrix). Needs n >= 4."""
    x, y = _paired(x, y)
    if len(x) < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 items, not {len(x)}")
    return _hsic_linear(_cross(x, y), (x * x).sum(1), (y * y).sum(1))


def unbiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA with the unbiased HSIC in place of the biased one: near 0 for independent inputs
    where plain CKA reads well above 0 when dimensions are many against items, and 1 for
    identical inputs. It corrects the estimator's bias, not the input's confound (that is
    input_debiased_cka)."""
    return _ratio(hsic_unbiased(x, y), hsic_unbiased(x, x), hsic_unbiased(y, y))


RESIDUAL_SHARE = 1e-5
"""Where the input-only Gram explains all but this share of a side's centred Gram (its
squared norm), nothing is left after the regression (float32 products agree to about 1e-6):
input-debiased CKA is nan there, not a ratio of rounding errors."""


def _ratios(xy: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """xy / sqrt(xx yy) elementwise (broadcast), nan where xx or yy is not positive."""
    xy, xx, yy = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (xy, xx, yy)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((xx > 0) & (yy > 0), xy / np.sqrt(np.abs(xx * yy)), np.nan)


def _regressed(kk: np.ndarray, kk0: np.ndarray, k0k0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(beta, residual): a centred Gram matrix K regressed by least squares on the input-only
    centred Gram K0 of the same items, from their Frobenius products <K, K>, <K, K0>,
    <K0, K0>: beta = <K, K0> / <K0, K0> (0 where K0 is 0) and ||K - beta K0||^2 =
    <K, K> - beta <K, K0>, set to 0 below RESIDUAL_SHARE of <K, K>. Elementwise over arrays.
    An intercept would change nothing: a constant matrix is orthogonal to centred ones."""
    kk, kk0, k0k0 = (np.asarray(v, dtype=np.float64) for v in (kk, kk0, k0k0))
    with np.errstate(invalid="ignore", divide="ignore"):
        beta = np.where(k0k0 > 0, kk0 / np.where(k0k0 > 0, k0k0, 1.0), 0.0)
    residual = kk - beta * kk0
    return beta, np.where(residual > RESIDUAL_SHARE * kk, residual, 0.0)


def _input_debiased(
    cross: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """CKA of the residual Grams K - beta_a K0 and L - beta_b L0, from cross = (<K, L>,
    <K, L0>, <K0, L>, <K0, L0>) and each side's (beta, residual) of _regressed; elementwise
    (broadcast), nan where a side has no residual."""
    kl, kl0, k0l, k0l0 = (np.asarray(c, dtype=np.float64) for c in cross)
    (beta_a, res_a), (beta_b, res_b) = a, b
    return _ratios(kl - beta_b * kl0 - beta_a * k0l + beta_a * beta_b * k0l0, res_a, res_b)


def input_debiased_cka(x: np.ndarray, y: np.ndarray, x0: np.ndarray, y0: np.ndarray) -> float:
    """Linear CKA with the input's confound regressed out (the deconfounded CKA of Cui et al.
    2022): each side's centred Gram matrix is regressed by least squares on its input-only
    Gram (x0, y0: the same items as represented by an untrained network, here each model's
    untrained copy at the same layer) and CKA is read from the residuals. About 0 where x and
    y share nothing beyond what x0 and y0 supply (two random functions of the same token
    identities), high for structure they share beyond it; nan where a side is a multiple of
    its input-only Gram. Not unbiased_cka, which corrects the estimator's bias."""
    x, y = _paired(x, y)
    x0, y0 = _paired(x0, y0)
    if len(x0) != len(x):
        raise ValueError(
            f"the input-only states hold {len(x0)} items, not {len(x)}: rows must be paired"
        )
    a = _regressed(_cross(x, x), _cross(x, x0), _cross(x0, x0))
    b = _regressed(_cross(y, y), _cross(y, y0), _cross(y0, y0))
    cross = (_cross(x, y), _cross(x, y0), _cross(x0, y), _cross(x0, y0))
    return float(_input_debiased(cross, a, b))


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
    """Rows scaled to unit length, in x's own float dtype (float64 for other inputs)."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(x.dtype).tiny)


@dataclass
class Neighbours:
    """Each item's k nearest neighbours by cosine, itself left out: ids [n, k] and the
    cosines there [n, k]. All that mutual kNN and CKNNA read of a representation."""

    ids: np.ndarray
    cosine: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, k: int, block: int = 1024) -> Neighbours:
        n = len(x)
        if not 1 <= k <= n - 2:
            raise ValueError(f"k = {k} neighbours need at least k + 2 items, not {n}")
        u = _unit_rows(x)
        ids = np.empty((n, k), dtype=np.int64)
        cosine = np.empty((n, k))  # float64 whatever the products' dtype
        for a in range(0, n, block):  # [block, n] similarities at a time
            sim = u[a : a + block] @ u.T
            sim[np.arange(len(sim)), np.arange(a, a + len(sim))] = -np.inf
            near = np.sort(np.argpartition(-sim, k - 1, axis=1)[:, :k], axis=1)
            ids[a : a + block] = near
            cosine[a : a + block] = np.take_along_axis(sim, near, 1)
        return cls(ids, cosine)

    def permuted(self, perm: np.ndarray) -> Neighbours:
        """The neighbours of the items taken in the order perm (item i is old item perm[i])."""
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(len(perm))
        ids = inverse[self.ids[perm]]
        order = np.argsort(ids, axis=1)
        return Neighbours(
            np.take_along_axis(ids, order, 1),
            np.take_along_axis(self.cosine[perm], order, 1),
        )

    def keys(self) -> np.ndarray:
        """[n * k] sorted keys i * n + j of the (item, neighbour) pairs."""
        n = len(self.ids)
        return (np.arange(n)[:, None] * n + self.ids).reshape(-1)


def _hsic_sparse(n: int, keys: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased HSIC of two n x n kernels that are zero but at the (sorted, off-diagonal)
    positions keys = i * n + j, where they hold a and b: the n x n formula of
    _hsic_linear's docstring, with tr(AB) = sum a_ij b_ji over positions present both ways."""
    i, j = np.divmod(keys, n)
    back = np.searchsorted(keys, j * n + i)
    back = np.minimum(back, len(keys) - 1)
    both_ways = keys[back] == j * n + i
    trace = float((a[both_ways] * b[back[both_ways]]).sum())
    col_a = np.bincount(j, weights=a, minlength=n)
    row_b = np.bincount(i, weights=b, minlength=n)
    total = trace + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2.0 * (col_a @ row_b) / (n - 2)
    return float(total / (n * (n - 3)))


def _knn_pair(nx: Neighbours, ny: Neighbours) -> tuple[float, float]:
    """(the mutual-kNN count's share of n * k, the masked unbiased HSIC of CKNNA)."""
    n, k = nx.ids.shape
    kx, ky = nx.keys(), ny.keys()
    both, at_x, at_y = np.intersect1d(kx, ky, assume_unique=True, return_indices=True)
    shared = len(both) / (n * k)
    return shared, _hsic_sparse(n, both, nx.cosine.reshape(-1)[at_x], ny.cosine.reshape(-1)[at_y])


def _knn_self(nx: Neighbours) -> float:
    c = nx.cosine.reshape(-1)
    return _hsic_sparse(len(nx.ids), nx.keys(), c, c)


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024): the mean share of each item's
    k nearest neighbours (cosine of the centred rows) in one representation that are also
    among its k nearest in the other. 1 for identical inputs; about k / (n - 1) for
    independent ones."""
    x, y = _paired(x, y)
    return _knn_pair(Neighbours.of(x, k), Neighbours.of(y, k))[0]


def cknna(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """CKNNA (Huh et al. 2024): CKA with the unbiased HSIC, restricted to the pairs (i, j)
    where j is among i's k nearest neighbours in both representations (cosine kernels of
    the centred rows). 1 for identical inputs, near 0 for independent ones."""
    x, y = _paired(x, y)
    nx, ny = Neighbours.of(x, k), Neighbours.of(y, k)
    return _ratio(_knn_pair(nx, ny)[1], _knn_self(nx), _knn_self(ny))


SVCCA_KEEPS: tuple[int | float, ...] = (0.5, 0.9, 0.99)
"""SVCCA's kept dimensions, swept: shares of each side's variance (or counts)."""


@dataclass
class Prepared:
    """One representation of the n sampled items, prepared once so that each pairing with
    another, and each permutation of the items, costs only what the pair itself needs: one
    [d1, d2] cross product (every CKA variant is read from it), a merge of neighbour lists,
    and one small product per SVCCA setting."""

    x: np.ndarray  # centred [n, d], in the products' dtype
    inv_sd: np.ndarray  # [d] 1 / standard deviation, 0 for constant dimensions
    kept: np.ndarray  # [d] bool: not an outlier dimension
    self_cross: dict[str, float]  # ||X'X||_F^2 of the raw, standardised and trimmed views
    sq: np.ndarray  # row norms squared, float64 (the linear kernel's diagonal)
    self_hsic: float  # unbiased HSIC of the raw view with itself
    neighbours: Neighbours  # of the trimmed view: one massive dimension would decide every cosine
    self_knn: float  # CKNNA's masked HSIC of the representation with itself
    basis: np.ndarray  # [n, widest] orthonormal leading directions, as the widest setting keeps
    svcca_kept: dict[str, int]  # per SVCCA setting: how many leading columns of basis it keeps

    def view(self, name: str) -> np.ndarray:
        """[n, d] centred states of a CKA view: "raw", "standardized" (each dimension over
        its standard deviation) or "trimmed" (outlier dimensions zeroed)."""
        if name == "raw":
            return self.x
        scale = self.inv_sd if name == "standardized" else self.kept
        return self.x * scale.astype(self.x.dtype)


def _crosses(
    c: np.ndarray, inv_sd: tuple[np.ndarray, np.ndarray], kept: tuple[np.ndarray, np.ndarray]
) -> dict[str, float]:
    """||.||_F^2 of the raw, standardised and trimmed views' cross product, from the raw
    one c = A'B [d1, d2] alone (inv_sd and kept: A's and B's): standardising scales its rows
    and columns, trimming drops some of them."""
    c2 = np.square(c, dtype=np.float64)
    return {
        "raw": float(c2.sum()),
        "standardized": float(np.square(inv_sd[0]) @ c2 @ np.square(inv_sd[1])),
        "trimmed": float(kept[0].astype(np.float64) @ c2 @ kept[1].astype(np.float64)),
    }


def prepare(
    x: np.ndarray,
    k: int = 10,
    keeps: Sequence[int | float] = SVCCA_KEEPS,
    dtype: type = np.float32,
) -> Prepared:
    """Everything pair_metrics reads of one representation [n, d]. Products run in `dtype`
    (float32 by default: a quarter of float64's time; CKA then agrees with float64 to about
    1e-6) and sums of squares in float64."""
    raw = _centred(x)
    if len(raw) < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 items, not {len(raw)}")
    sd = raw.std(0)
    if not (sd > 0).any():
        raise ValueError("every item has the same state: there is nothing to compare")
    inv_sd = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    kept = ~outlier_dimensions(x)  # the states as given: outliers by the documented rule
    sq = (raw * raw).sum(1)
    low = raw.astype(dtype)
    self_cross = _crosses(low.T @ low, (inv_sd, inv_sd), (kept, kept))
    neighbours = Neighbours.of(low[:, kept], k)
    basis, svcca_kept = leading_basis(low, keeps)
    return Prepared(
        x=low,
        inv_sd=inv_sd,
        kept=kept,
        self_cross=self_cross,
        sq=sq,
        self_hsic=_hsic_linear(self_cross["raw"], sq, sq),
        neighbours=neighbours,
        self_knn=_knn_self(neighbours),
        basis=basis,
        svcca_kept=svcca_kept,
    )


def _mean_canonical(m: np.ndarray) -> float:
    """Mean canonical correlation of two orthonormal bases qa, qb from m = qa'qb: the mean
    singular value of m, as square roots of the eigenvalues of the smaller Gram matrix (a
    fraction of an SVD's time). numpy's LAPACK, not scipy's: scipy brings a second BLAS
    whose threads, alternating with numpy's, spun against them and made this far slower."""
    m = m.astype(np.float64)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, 1.0)).mean())


CKA_METRICS = ("cka", "cka_unbiased", "cka_standardized", "cka_trimmed")
CKA_VIEWS = ("raw", "standardized", "trimmed")
INPUT_DEBIASED = {
    "raw": "cka_input_debiased",
    "standardized": "cka_standardized_input_debiased",
    "trimmed": "cka_trimmed_input_debiased",
}
"""The input-debiased CKA metric of each view (input_debiased_cka of the view's states)."""


def _cka_from(
    a: Prepared, b: Prepared, cross: dict[str, float], b_sq: np.ndarray
) -> dict[str, float]:
    """The CKA metrics of a pairing from its cross terms ||A'B||_F^2 per view, and b's row
    norms squared in the pairing's order (for the unbiased HSIC)."""
    return {
        "cka": _ratio(cross["raw"], a.self_cross["raw"], b.self_cross["raw"]),
        "cka_unbiased": _ratio(_hsic_linear(cross["raw"], a.sq, b_sq), a.self_hsic, b.self_hsic),
        "cka_standardized": _ratio(
            cross["standardized"], a.self_cross["standardized"], b.self_cross["standardized"]
        ),
        "cka_trimmed": _ratio(cross["trimmed"], a.self_cross["trimmed"], b.self_cross["trimmed"]),
    }


def pair_metrics(
    a: Prepared, b: Prepared, perm: np.ndarray | None = None, cka: bool = True
) -> dict[str, float]:
    """Every metric of two prepared representations of the same items: a's item i paired
    with b's item i, or with b's item perm[i] (a permutation null). Keys: cka, cka_unbiased,
    cka_standardized, cka_trimmed (outlier dimensions removed; left out where cka is False,
    for callers that compute them for many pairs at once with cka_matrices), mutual_knn and
    cknna (on the trimmed views), and svcca@<setting> for each kept-dimension setting both
    sides were prepared with (on the raw views)."""

    def rows(m: np.ndarray) -> np.ndarray:
        return m if perm is None else m[perm]

    out = {}
    if cka:
        cross = _crosses(a.x.T @ rows(b.x), (a.inv_sd, b.inv_sd), (a.kept, b.kept))
        out = _cka_from(a, b, cross, rows(b.sq))
    nb = b.neighbours if perm is None else b.neighbours.permuted(perm)
    out["mutual_knn"], knn_hsic = _knn_pair(a.neighbours, nb)
    out["cknna"] = _ratio(knn_hsic, a.self_knn, b.self_knn)
    settings = sorted(a.svcca_kept.keys() & b.svcca_kept.keys())
    if settings:
        m = a.basis.T @ rows(b.basis)  # every setting's product is a leading block of this one
        for setting in settings:
            ka, kb = a.svcca_kept[setting], b.svcca_kept[setting]
            out[f"svcca@{setting}"] = _mean_canonical(m[:ka, :kb])
    return out


GRAM_BYTES = 3 * 2**30
"""Memory the Gram form of the layer comparison may hold; past it (many items or layers)
CKA is computed pair by pair in feature space instead."""
GRAM_CHUNK = 2**18
"""Gram entries summed in float32 at a time; the chunks' sums are added in float64."""


def gram_bytes(n: int, layers_a: int, layers_b: int) -> int:
    """What PackedGrams and pairing_crosses hold for n items: the packed Grams of both sides
    in every view, and one permuted copy of the smaller side's."""
    return 4 * len(CKA_VIEWS) * (layers_a + layers_b + min(layers_a, layers_b)) * n * (n + 1) // 2


@dataclass
class PackedGrams:
    """The Gram matrices X X' of every layer of two models on the same n items, in each CKA
    view, packed as their upper triangles (i <= j, row by row): ||A'B||_F^2 of two layers
    is the Frobenius product of their Grams, a weighted dot product of two packed rows."""

    a: np.ndarray  # [views, La, n(n+1)/2]
    b: np.ndarray  # [views, Lb, n(n+1)/2]
    iu: np.ndarray  # [n(n+1)/2] row of each packed entry
    ju: np.ndarray  # [n(n+1)/2] column
    weight: np.ndarray  # [n(n+1)/2] 2 off the diagonal (each entry stands for two), else 1

    @classmethod
    def of(cls, pa: list[Prepared], pb: list[Prepared]) -> PackedGrams:
        n = pa[0].x.shape[0]
        iu, ju = np.triu_indices(n)
        upper = iu * n + ju
        sides = []
        gram = np.empty((n, n), dtype=pa[0].x.dtype)  # one n x n buffer for every Gram
        for preps in (pa, pb):
            out = np.empty((len(CKA_VIEWS), len(preps), len(upper)), dtype=preps[0].x.dtype)
            for layer, p in enumerate(preps):
                for v, name in enumerate(CKA_VIEWS):
                    if name == "trimmed" and p.kept.all():  # no outlier dimension: the raw view
                        out[v, layer] = out[CKA_VIEWS.index("raw"), layer]
                        continue
                    x = p.view(name)
                    np.matmul(x, x.T, out=gram)
                    np.take(gram.ravel(), upper, out=out[v, layer])
            sides.append(out)
        weight = np.where(iu == ju, 1.0, 2.0).astype(sides[0].dtype)
        return cls(sides[0], sides[1], iu, ju, weight)

    @property
    def n(self) -> int:
        return int(self.iu[-1]) + 1


def _products(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """[La, Lb] float64 dot products of the rows of left [La, m] and right [Lb, m], in
    float32 chunks summed in float64."""
    out = np.zeros((len(left), len(right)))
    for lo in range(0, left.shape[1], GRAM_CHUNK):
        out += left[:, lo : lo + GRAM_CHUNK] @ right[:, lo : lo + GRAM_CHUNK].T
    return out


def pairing_crosses(
    pa: list[Prepared],
    pb: list[Prepared],
    perms: Sequence[np.ndarray | None],
    grams: PackedGrams | None = None,
) -> list[np.ndarray]:
    """[views, La, Lb] ||A'PB||_F^2 of every layer of A with every layer of B in each CKA
    view (CKA_VIEWS), for each pairing in perms (None: the true one; else A's item i with B's
    item perm[i], as pair_metrics). Given `grams` (PackedGrams.of(pa, pb)): ||A'PB||_F^2 is
    the Frobenius product of A's Gram matrix with B's permuted, so each pairing costs a
    gather of the smaller side's Grams and one [La, n^2/2] x [n^2/2, Lb] product per view,
    instead of an n x d_a x d_b product per layer pair (memory: gram_bytes). Without, pair
    by pair in feature space."""
    out = []
    if grams is None:
        for perm in perms:
            cross = np.empty((len(CKA_VIEWS), len(pa), len(pb)))
            for j, b in enumerate(pb):
                bx = b.x if perm is None else b.x[perm]
                for i, a in enumerate(pa):
                    views = _crosses(a.x.T @ bx, (a.inv_sd, b.inv_sd), (a.kept, b.kept))
                    cross[:, i, j] = [views[name] for name in CKA_VIEWS]
            out.append(cross)
        return out
    n, iu, ju = grams.n, grams.iu, grams.ju
    move_a = len(pa) <= len(pb)  # permute the side with fewer layers
    still, source = (grams.b, grams.a) if move_a else (grams.a, grams.b)
    moved = np.empty_like(source)  # one buffer for every pairing: fresh pages cost more
    for perm in perms:
        if perm is None:
            np.multiply(source, grams.weight, out=moved)
        else:
            # A's i with B's perm[i]: sum_ij Ka[i,j] Kb[perm i, perm j], which is
            # sum_ij Ka[inv i, inv j] Kb[i,j] where A is the side that moves
            inverse = np.empty_like(perm)
            inverse[perm] = np.arange(n)
            order = inverse if move_a else perm
            r, c = order[iu], order[ju]
            lo, hi = np.minimum(r, c), np.maximum(r, c)
            at = lo * n - lo * (lo - 1) // 2 + (hi - lo)  # (lo, hi)'s place in the triangle
            for v in range(len(CKA_VIEWS)):  # row by row: steadier than one 3-d take
                for layer in range(source.shape[1]):
                    np.take(source[v, layer], at, out=moved[v, layer])
            moved *= grams.weight
        xa, xb = (moved, still) if move_a else (still, moved)
        out.append(np.stack([_products(xa[v], xb[v]) for v in range(len(CKA_VIEWS))]))
    return out


def self_crosses(preps: list[Prepared]) -> np.ndarray:
    """[views, L] ||X'X||_F^2 of each layer in each CKA view (CKA's normalisers)."""
    return np.array([[p.self_cross[name] for p in preps] for name in CKA_VIEWS])


def cka_from_crosses(
    pa: list[Prepared], pb: list[Prepared], cross: np.ndarray, perm: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """{metric: [La, Lb]} the CKA metrics (CKA_METRICS) of every layer pair from a pairing's
    cross terms [views, La, Lb] (pairing_crosses; perm: the pairing, for the unbiased HSIC's
    row norms)."""
    sa, sb = self_crosses(pa), self_crosses(pb)  # [views, La], [views, Lb]
    sq_a = np.stack([p.sq for p in pa])  # [La, n]
    sq_b = np.stack([p.sq if perm is None else p.sq[perm] for p in pb])  # [Lb, n]
    n = sq_a.shape[1]
    # _hsic_linear of every layer pair at once
    dot = sq_a @ sq_b.T
    sums = np.outer(sq_a.sum(1), sq_b.sum(1)) / ((n - 1) * (n - 2))
    hsic = (cross[CKA_VIEWS.index("raw")] - dot + sums - 2.0 * dot / (n - 2)) / (n * (n - 3))
    hsic_a, hsic_b = np.array([p.self_hsic for p in pa]), np.array([p.self_hsic for p in pb])
    out = {"cka_unbiased": _ratios(hsic, hsic_a[:, None], hsic_b[None])}
    of_view = (("cka", "raw"), ("cka_standardized", "standardized"), ("cka_trimmed", "trimmed"))
    for metric, name in of_view:
        v = CKA_VIEWS.index(name)
        out[metric] = _ratios(cross[v], sa[v][:, None], sb[v][None])
    return {metric: out[metric] for metric in CKA_METRICS}


def copy_crosses(real: list[Prepared], copies: list[Prepared]) -> np.ndarray:
    """[views, L] <K, K0> of each layer with the same layer of its input-only copy (the same
    items), in each CKA view: what the regression of input_debiased_cka needs of a side."""
    out = np.empty((len(CKA_VIEWS), len(real)))
    for layer, (p, q) in enumerate(zip(real, copies, strict=True)):
        views = _crosses(p.x.T @ q.x, (p.inv_sd, q.inv_sd), (p.kept, q.kept))
        out[:, layer] = [views[name] for name in CKA_VIEWS]
    return out


def input_debiased_blocks(
    cross: np.ndarray,
    layers: tuple[int, int],
    selves: tuple[np.ndarray, np.ndarray],
    copies: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """[..., La, Lb] input-debiased CKA of every layer pair of A and B from the cross terms
    [..., La + La0, Lb + Lb0] of A's layers followed by its input-only copy's with B's
    followed by its copy's (layers: (La, Lb)), each side's <K, K> stacked likewise (selves:
    [..., La + La0], [..., Lb + Lb0]) and <K, K0> of each layer with its copy's (copies:
    [..., La], [..., Lb]). Leading axes (views, or unions of documents) broadcast."""
    la, lb = layers
    sa, sb = selves
    beta_a, res_a = _regressed(sa[..., :la], copies[0], sa[..., la:])
    beta_b, res_b = _regressed(sb[..., :lb], copies[1], sb[..., lb:])
    parts = (cross[..., :la, :lb], cross[..., :la, lb:], cross[..., la:, :lb], cross[..., la:, lb:])
    return _input_debiased(
        parts,
        (beta_a[..., :, None], res_a[..., :, None]),
        (beta_b[..., None, :], res_b[..., None, :]),
    )


def input_debiased_matrices(
    cross: np.ndarray,
    layers: tuple[int, int],
    selves: tuple[np.ndarray, np.ndarray],
    copies: tuple[np.ndarray, np.ndarray],
) -> dict[str, np.ndarray]:
    """{metric: [La, Lb]} input-debiased CKA of every layer pair in each view (INPUT_DEBIASED)
    from a pairing's cross terms [views, La + La0, Lb + Lb0] (pairing_crosses of the two
    stacked lists), self_crosses of each stacked list and copy_crosses of each side."""
    values = input_debiased_blocks(cross, layers, selves, copies)
    return {INPUT_DEBIASED[name]: values[v] for v, name in enumerate(CKA_VIEWS)}


def cka_matrices(
    pa: list[Prepared],
    pb: list[Prepared],
    perms: Sequence[np.ndarray | None],
    grams: PackedGrams | None = None,
) -> list[dict[str, np.ndarray]]:
    """The CKA metrics of every pair of a layer of A with a layer of B, for each pairing in
    perms (None: the true one; else A's item i with B's item perm[i], as pair_metrics):
    [{metric: [La, Lb]}], one per pairing, in Gram form (pairing_crosses; the Grams are made
    here where not given)."""
    grams = grams or PackedGrams.of(pa, pb)
    crosses = pairing_crosses(pa, pb, perms, grams)
    return [cka_from_crosses(pa, pb, c, p) for c, p in zip(crosses, perms, strict=True)]


def group_blocks(grams: PackedGrams, view: str, groups: np.ndarray) -> np.ndarray:
    """[La, Lb, G, G] M_gh = <A_g'B_g, A_h'B_h> for every layer pair, from the Grams of a
    view: sum over i in g, j in h of Ka[i,j] Kb[i,j], the Frobenius product of the Grams'
    (g, h) blocks (what subset_cka needs of a pairing, besides the group sums)."""
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1
    gi, gj = groups[grams.iu], groups[grams.ju]
    lo, hi = np.minimum(gi, gj), np.maximum(gi, gj)
    # an entry off the diagonal of an off-diagonal block stands for (i, j) in (g, h) and
    # (j, i) in (h, g): M_gh once; inside a diagonal block it counts twice, as in the whole
    coef = np.where(gi == gj, grams.weight, 1.0).astype(grams.a.dtype)
    order = np.argsort(lo * n_groups + hi, kind="stable")
    bounds = np.searchsorted((lo * n_groups + hi)[order], np.arange(n_groups * n_groups + 1))
    v = CKA_VIEWS.index(view)
    out = np.zeros((grams.a.shape[1], grams.b.shape[1], n_groups, n_groups))
    for g in range(n_groups):
        for h in range(g, n_groups):
            at = order[bounds[g * n_groups + h] : bounds[g * n_groups + h + 1]]
            left = np.take(grams.a[v], at, axis=1) * coef[at]
            block = _products(left, np.take(grams.b[v], at, axis=1))
            out[:, :, g, h] = out[:, :, h, g] = block
    return out


def svcca_sweep(
    x: np.ndarray, y: np.ndarray, keeps: Sequence[int | float] = SVCCA_KEEPS
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


@dataclass
class Groups:
    """One representation [n, d] split into groups of items (documents, or sets of them),
    summarised so that linear CKA on any union of groups, recentred on that union, costs a
    few G x G x G products (Group sums, not the rows): x is kept sorted by group for the
    cross products a pairing needs."""

    x: np.ndarray  # [n, d] rows in group order, in the products' dtype
    bounds: np.ndarray  # [G + 1] row offsets of the groups in x
    sums: np.ndarray  # [G, d] float64 column sums per group
    counts: np.ndarray  # [G] rows per group
    self_terms: tuple[np.ndarray, np.ndarray]  # (M, T) of the pairing with itself

    @classmethod
    def of(cls, x: np.ndarray, groups: np.ndarray) -> Groups:
        """x [n, d] with each row's group number in 0..G-1 (every group non-empty)."""
        groups = np.asarray(groups)
        order = np.argsort(groups, kind="stable")
        counts = np.bincount(groups)
        if (counts == 0).any():
            raise ValueError("every group must hold at least one item")
        xs = np.ascontiguousarray(np.asarray(x)[order])
        bounds = np.concatenate([[0], np.cumsum(counts)])
        sums = np.stack(
            [xs[lo:hi].sum(0, dtype=np.float64) for lo, hi in itertools.pairwise(bounds)]
        )
        g = cls(xs, bounds, sums, counts, (np.zeros(0), np.zeros(0)))
        g.self_terms = _group_terms(g, g)
        return g

    def select(self, columns: np.ndarray) -> Groups:
        """The same items and groups with only some dimensions (columns: [d] bool): the
        others are set to zero, which takes them out of every product and sum, and keeps the
        shape, so the pairing's group products can be masked instead of copied out."""
        keep = np.asarray(columns, dtype=bool)
        x, sums = self.x * keep.astype(self.x.dtype), self.sums * keep
        g = Groups(x, self.bounds, sums, self.counts, (np.zeros(0), np.zeros(0)))
        g.self_terms = _group_terms(g, g)
        return g


def group_products(a: Groups, b: Groups) -> np.ndarray:
    """[G, d1, d2] C_g = A_g'B_g for every group g, in the states' dtype: one full [d1, d2]
    product's work in all."""
    return np.stack([a.x[lo:hi].T @ b.x[lo:hi] for lo, hi in itertools.pairwise(a.bounds)])


def _group_terms(
    a: Groups, b: Groups, parts: np.ndarray | None = None, m: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(M [G, G], T [G, G, G]) with C_g = A_g'B_g (parts, if given: group_products(a, b)):
    M_gh = <C_g, C_h> and T_ghl = sa_h' C_g sb_l, all that ||A_S'B_S - sa_S sb_S' / n_S||_F^2
    needs for a union S of groups (sa_S, sb_S: the union's column sums). Products run in the
    states' dtype (float32 states: each CKA within about 1e-6 of float64). Where M is given
    (group_blocks, from Gram matrices), T comes from each row's products with the group
    sums, T_ghl = sum over i in g of (a_i . sa_h)(b_i . sb_l), and no C_g is formed."""
    if m is not None:
        ua, ub = a.x @ a.sums.T, b.x @ b.sums.T  # [n, G] float64, rows in group order
        t = np.stack([ua[lo:hi].T @ ub[lo:hi] for lo, hi in itertools.pairwise(a.bounds)])
        return m, t
    parts = group_products(a, b) if parts is None else parts
    m = group_m(parts)
    low = parts.dtype
    t = np.matmul(a.sums.astype(low)[None], parts) @ b.sums.T.astype(low)  # [g, h, l]
    return m, t.astype(np.float64)


def _subset_cross(
    terms: tuple[np.ndarray, np.ndarray],
    sa: np.ndarray,
    sb: np.ndarray,
    w: np.ndarray,
    n: np.ndarray,
) -> np.ndarray:
    """[S] ||A_S'B_S||_F^2 of the recentred union for each row of w [S, G] (0/1 weights)."""
    m, t = terms
    plain = np.einsum("sg,gh,sh->s", w, m, w)
    mixed = np.einsum("sg,sh,sl,ghl->s", w, w, w, t)
    sums = np.einsum("sg,sh,gh->s", w, w, sa @ sa.T) * np.einsum("sg,sh,gh->s", w, w, sb @ sb.T)
    return plain - 2.0 * mixed / n + sums / (n * n)


def subset_cka(
    a: Groups,
    b: Groups,
    subsets: np.ndarray,
    parts: np.ndarray | None = None,
    m: np.ndarray | None = None,
    selves: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """[S] linear CKA of two grouped representations of the same items (same groups, same
    item order) on each union of groups subsets [S, G] (0/1 rows) marks, each recentred on
    its own items; a row of ones gives linear_cka of the whole. Where already computed:
    `parts`, their group_products, or `m`, their M (group_blocks); `selves`, subset_self of
    each side."""
    if not (np.array_equal(a.bounds, b.bounds) and a.x.shape[0] == b.x.shape[0]):
        raise ValueError("the two sides must hold the same items in the same groups")
    w = np.asarray(subsets, dtype=np.float64)
    n = w @ a.counts
    cross = _subset_cross(_group_terms(a, b, parts, m), a.sums, b.sums, w, n)
    xx, yy = selves or (subset_self(a, subsets), subset_self(b, subsets))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((xx > 0) & (yy > 0), cross / np.sqrt(np.abs(xx * yy)), np.nan)


def subset_self(a: Groups, subsets: np.ndarray) -> np.ndarray:
    """[S] ||A_S'A_S||_F^2 of each recentred union of groups (subset_cka's normalisers)."""
    w = np.asarray(subsets, dtype=np.float64)
    return _subset_cross(a.self_terms, a.sums, a.sums, w, w @ a.counts)


def subset_crosses(
    left: list[Groups], right: list[Groups], subsets: np.ndarray, m: np.ndarray
) -> np.ndarray:
    """[S, L1, L2] ||A_S'B_S||_F^2 of every grouped representation in left with every one in
    right (the same items in the same groups), each recentred on the union of groups a row
    of subsets [S, G] (0/1) marks, from each pair's M [L1, L2, G, G] (group_blocks, or
    group_m of their group products): _subset_cross of every pair at once."""
    w = np.asarray(subsets, dtype=np.float64)
    n = w @ left[0].counts  # [S]
    ua = np.stack([g.x @ g.sums.T for g in left])  # [L1, n, G] rows . group sums
    ub = np.stack([g.x @ g.sums.T for g in right])  # [L2, n, G]
    # T[a, b, g, h, l] = sum over i in g of (a_i . sa_h)(b_i . sb_l)
    t = np.stack(
        [
            np.einsum("aih,bil->abhl", ua[:, lo:hi], ub[:, lo:hi], optimize=True)
            for lo, hi in itertools.pairwise(left[0].bounds)
        ],
        axis=2,
    )
    l1, l2 = t.shape[:2]
    plain = np.einsum("sg,abgh,sh->sab", w, m, w, optimize=True)
    w3 = np.einsum("sg,sh,sl->sghl", w, w, w).reshape(len(w), -1)
    mixed = (t.reshape(l1 * l2, -1) @ w3.T).reshape(l1, l2, -1).transpose(2, 0, 1)
    sums_a = np.stack([np.square(w @ x.sums).sum(1) for x in left], axis=1)  # [S, L1]
    sums_b = np.stack([np.square(w @ y.sums).sum(1) for y in right], axis=1)  # [S, L2]
    nn = n[:, None, None]
    return plain - 2.0 * mixed / nn + sums_a[:, :, None] * sums_b[:, None, :] / (nn * nn)


def group_m(parts: np.ndarray) -> np.ndarray:
    """[G, G] M_gh = <C_g, C_h> from a pairing's group products C_g [G, d1, d2]."""
    flat = parts.reshape(len(parts), -1)
    return (flat @ flat.T).astype(np.float64)


def half_subsets(n_groups: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count, n_groups] 0/1 rows, each marking a random half of the groups (drawn without
    replacement inside a row: no group is repeated, unlike a bootstrap)."""
    if n_groups < 2:
        raise ValueError(f"half-subsampling needs at least 2 groups, not {n_groups}")
    rows = np.zeros((count, n_groups))
    for r in rows:
        r[rng.choice(n_groups, n_groups // 2, replace=False)] = 1.0
    return rows
