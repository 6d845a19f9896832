"""Representation-similarity metrics against known answers: identity, invariances, chance
levels, and references computed another way (n x n Gram matrices, a brute-force U-statistic)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from samesheep.layers.geometry import svcca
from samesheep.layers.similarity import (
    CKA_METRICS,
    INPUT_DEBIASED,
    PackedGrams,
    cka_matrices,
    cknna,
    copy_crosses,
    hsic_unbiased,
    input_debiased_cka,
    input_debiased_matrices,
    linear_cka,
    mutual_knn,
    outlier_dimensions,
    pair_metrics,
    pairing_crosses,
    prepare,
    self_crosses,
    standardized,
    svcca_sweep,
    unbiased_cka,
    within_group_permutation,
    without_outlier_dimensions,
)


def data(n=300, d=20, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


def orthogonal(d, seed=1):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def cka_by_gram(x, y):
    """Linear CKA through centred n x n Gram matrices (the kernel form)."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    return (kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum())


def hsic_by_quadruples(x, y):
    """The unbiased HSIC as its U-statistic: the mean over ordered distinct (i, j, q, r) of
    k_ij l_ij + k_ij l_qr - 2 k_ij l_iq (linear kernels of centred features)."""
    x, y = x - x.mean(0), y - y.mean(0)
    kx, ky = x @ x.T, y @ y.T
    n = len(x)
    terms = [
        kx[i, j] * ky[i, j] + kx[i, j] * ky[q, r] - 2 * kx[i, j] * ky[i, q]
        for i, j, q, r in itertools.permutations(range(n), 4)
    ]
    return float(np.mean(terms))


def test_linear_cka_is_one_on_identical_inputs_and_equals_the_kernel_form():
    x, y = data(), data(seed=5) @ np.random.default_rng(2).standard_normal((20, 7))
    assert linear_cka(x, x) == pytest.approx(1.0)
    y = y + 0.5 * x[:, :7]
    assert linear_cka(x, y) == pytest.approx(cka_by_gram(x, y), rel=1e-10)


def test_linear_cka_is_invariant_to_rotation_scaling_and_shift_not_to_stretching_one_axis():
    x = data()
    y = x[:, :10] + 0.7 * data(seed=3)[:, :10]
    base = linear_cka(x, y)
    assert linear_cka(3.5 * x @ orthogonal(20) + 7.0, y) == pytest.approx(base, rel=1e-10)
    stretched = x.copy()
    stretched[:, 0] *= 50
    assert abs(linear_cka(stretched, y) - base) > 0.05


def test_unbiased_hsic_equals_its_u_statistic_and_the_gram_formula():
    x, y = data(n=7, d=3, seed=4), data(n=7, d=2, seed=6)
    y[:, 0] += x[:, 0]
    assert hsic_unbiased(x, y) == pytest.approx(hsic_by_quadruples(x, y), rel=1e-9)
    xc, yc = x - x.mean(0), y - y.mean(0)
    kx, ky = xc @ xc.T, yc @ yc.T
    np.fill_diagonal(kx, 0)
    np.fill_diagonal(ky, 0)
    n = 7
    gram = (
        (kx * ky).sum() + kx.sum() * ky.sum() / ((n - 1) * (n - 2)) - 2 * (kx @ ky).sum() / (n - 2)
    ) / (n * (n - 3))
    assert hsic_unbiased(x, y) == pytest.approx(gram, rel=1e-9)


def test_unbiased_cka_is_near_zero_for_independent_inputs_where_plain_cka_is_not():
    x, y = data(n=200, d=100, seed=1), data(n=200, d=100, seed=2)
    assert linear_cka(x, y) > 0.3  # many dimensions against few items
    assert abs(unbiased_cka(x, y)) < 0.03
    assert unbiased_cka(x, x) == pytest.approx(1.0)
    assert unbiased_cka(x, 2.0 * x @ orthogonal(100)) == pytest.approx(1.0)


def tokens(n, vocab=1000, seed=0):
    """Token ids with Zipf frequencies, as in text: a few very common, most rare."""
    p = 1.0 / np.arange(1, vocab + 1)
    return np.random.default_rng(seed).choice(vocab, n, p=p / p.sum())


def random_function(ids, d, seed, noise=0.2):
    """A random function of the token identities (a random embedding table read at the ids,
    as an untrained network's states mostly are), with a little noise of its own."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((ids.max() + 1, d))
    return table[ids] + noise * rng.standard_normal((len(ids), d))


def input_debiased_by_gram(x, y, x0, y0):
    """Cui et al.'s deconfounded CKA written out with n x n centred Gram matrices: each side's
    Gram regressed by least squares (np.linalg.lstsq, with an intercept) on its input-only
    Gram over every entry, then linear CKA of the two residual matrices."""
    n = len(x)
    h = np.eye(n) - 1.0 / n

    def residual(a, a0):
        k, k0 = h @ a @ a.T @ h, h @ a0 @ a0.T @ h
        design = np.c_[k0.ravel(), np.ones(n * n)]
        coef, *_ = np.linalg.lstsq(design, k.ravel(), rcond=None)
        return k - (design @ coef).reshape(n, n)

    rx, ry = residual(x, x0), residual(y, y0)
    return (rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum())


def test_input_debiased_cka_equals_the_residual_grams_cka_and_keeps_ckas_invariances():
    ids = tokens(120, vocab=40)
    x0, y0 = random_function(ids, 9, 1), random_function(ids, 7, 2)
    z = np.random.default_rng(3).standard_normal((120, 3))
    x = x0 @ np.random.default_rng(4).standard_normal((9, 9)) + z @ np.ones((3, 9))
    y = random_function(ids, 6, 5) + z @ np.random.default_rng(6).standard_normal((3, 6))
    want = input_debiased_by_gram(x, y, x0, y0)
    assert input_debiased_cka(x, y, x0, y0) == pytest.approx(want, rel=1e-9)
    assert abs(want - linear_cka(x, y)) > 0.05  # the regression did something
    # invariant to rotating, scaling and shifting any of the four, as CKA is
    moved = input_debiased_cka(
        2.0 * x @ orthogonal(9) + 3.0, y, 0.5 * x0 @ orthogonal(9, seed=2) - 1.0, y0 @ orthogonal(7)
    )
    assert moved == pytest.approx(want, rel=1e-9)
    assert input_debiased_cka(x, x, x0, x0) == pytest.approx(1.0)
    # a side that is its input-only representation (rotated) leaves nothing: nan, not noise
    assert np.isnan(input_debiased_cka(x0 @ orthogonal(9), y, x0, y0))
    with pytest.raises(ValueError, match="paired"):
        input_debiased_cka(x, y, x0[:100], y0[:100])


# (items, A's width, B's width): a small case, and the default run's layer comparison
# (2,000 aligned units, Gemma-3-270m's 640 dimensions against SmolLM2-135M's 576)
SHAPES = [(800, 256, 192), (2000, 640, 576)]


@pytest.mark.parametrize("n, da, db", SHAPES)
def test_input_debiased_cka_is_about_zero_for_random_functions_of_the_same_tokens(n, da, db):
    """Two models whose states are different random functions of the same token identities
    (and their untrained copies, two more) agree under plain and unbiased CKA, both reading
    the shared token identity; with each side's untrained copy's Gram regressed out, about
    0 is left. The rest is the regression's attenuation by the copies' own cross-token
    scatter (0.07 on average at 256 dimensions, 0.04 at 640) and a few frequent tokens'
    random norms. Structure the two share beyond the tokens stays high."""
    plain, debiased = [], []
    for seed in range(4):
        ids = tokens(n, seed=seed)
        x, y = random_function(ids, da, 10 * seed + 1), random_function(ids, db, 10 * seed + 2)
        x0, y0 = random_function(ids, da, 10 * seed + 3), random_function(ids, db, 10 * seed + 4)
        plain.append(linear_cka(x, y))
        debiased.append(input_debiased_cka(x, y, x0, y0))
        assert unbiased_cka(x, y) > 0.8  # the estimator's bias is not the input's confound
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((n, 8))  # a signal each item carries in both, beyond its token
        shared = input_debiased_cka(
            x + z @ rng.standard_normal((8, da)), y + z @ rng.standard_normal((8, db)), x0, y0
        )
        assert shared > 0.8
    assert min(plain) > 0.8
    assert max(abs(v) for v in debiased) < 0.15 and abs(np.mean(debiased)) < 0.1


def test_one_huge_dimension_decides_raw_cka_until_it_is_removed_or_standardised():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((500, 30))
    x = shared + 0.3 * rng.standard_normal((500, 30))
    y = shared @ orthogonal(30) + 0.3 * rng.standard_normal((500, 30))
    good = linear_cka(x, y)
    assert good > 0.8
    x_out = np.concatenate([x, 5000.0 * rng.standard_normal((500, 3))], axis=1)
    assert linear_cka(x_out, y) < 0.05  # the massive dimensions, unrelated to y, dominate
    mask = outlier_dimensions(x_out)
    assert mask.tolist() == [False] * 30 + [True] * 3
    # against the median dimension, not the mean, which a few massive ones would raise
    assert outlier_dimensions(np.c_[data(d=20), 20 * data(d=5, seed=1)]).sum() == 5
    assert linear_cka(without_outlier_dimensions(x_out), y) == pytest.approx(good)
    assert linear_cka(standardized(x_out), y) > 0.75
    assert standardized(np.c_[x, np.ones(500)]).shape == (500, 30)  # constant column dropped


def test_mutual_knn_is_one_on_identical_and_rotated_inputs_and_k_over_n_at_chance():
    x = data(n=400, d=16)
    assert mutual_knn(x, x) == 1.0
    assert mutual_knn(x, 4.0 * x @ orthogonal(16)) == 1.0
    chance = [mutual_knn(x, data(n=400, d=16, seed=s), k=10) for s in range(10, 15)]
    assert np.mean(chance) == pytest.approx(10 / 399, rel=0.25)


def cknna_by_loops(x, y, k):
    """CKNNA written out: cosine kernels of the centred rows, each row's k nearest (itself
    left out) by sorting, the kernels kept only where both neighbourhoods agree, the
    unbiased HSIC with ones vectors."""
    n = len(x)

    def kernel_and_nearest(z):
        z = z - z.mean(0)
        u = z / np.linalg.norm(z, axis=1, keepdims=True)
        kern = u @ u.T
        near = [
            set(sorted((j for j in range(n) if j != i), key=lambda j: -kern[i, j])[:k])
            for i in range(n)
        ]
        return kern, near

    def hsic(a, b):
        a, b = a.copy(), b.copy()
        np.fill_diagonal(a, 0)
        np.fill_diagonal(b, 0)
        one = np.ones(n)
        return (
            np.trace(a @ b)
            + (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
            - 2 * (one @ a @ b @ one) / (n - 2)
        ) / (n * (n - 3))

    def masked(ka, na, kb, nb):
        keep = np.array([[j in na[i] and j in nb[i] for j in range(n)] for i in range(n)])
        return hsic(ka * keep, kb * keep)

    kx, nx = kernel_and_nearest(x)
    ky, ny = kernel_and_nearest(y)
    return masked(kx, nx, ky, ny) / np.sqrt(masked(kx, nx, kx, nx) * masked(ky, ny, ky, ny))


def test_cknna_equals_its_definition_written_out():
    x = data(n=60, d=5, seed=2)
    y = x @ np.random.default_rng(1).standard_normal((5, 4)) + 0.8 * data(n=60, d=4, seed=3)
    assert cknna(x, y, k=6) == pytest.approx(cknna_by_loops(x, y, 6), rel=1e-9)


def test_cknna_is_one_on_identical_inputs_and_near_zero_for_independent_ones():
    x = data(n=300, d=16)
    assert cknna(x, x) == pytest.approx(1.0)
    assert cknna(x, 3.0 * x @ orthogonal(16)) == pytest.approx(1.0)
    related = cknna(x, x + 0.3 * data(n=300, d=16, seed=9))
    unrelated = cknna(x, data(n=300, d=16, seed=8))
    assert related > 0.5 and abs(unrelated) < 0.1


def test_svcca_of_x_against_an_invertible_transform_of_x_is_one_at_full_rank():
    x = data(n=400, d=12)
    a = np.random.default_rng(3).standard_normal((12, 12)) + 3 * np.eye(12)
    sweep = svcca_sweep(x, x @ a, keeps=(12, 0.999999))
    assert sweep["12"] == pytest.approx(1.0, abs=1e-9)
    assert sweep["0.999999"] == pytest.approx(1.0, abs=1e-9)
    low = svcca_sweep(x, data(n=400, d=12, seed=4), keeps=(4,))
    assert low["4"] < 0.3


def test_within_group_permutation_moves_items_only_inside_their_group():
    groups = np.array([3, 1, 3, 3, 2, 1, 2, 3, 3, 1] * 30)
    rng = np.random.default_rng(0)
    perm = within_group_permutation(groups, rng)
    assert sorted(perm.tolist()) == list(range(len(groups)))
    assert (groups[perm] == groups).all()
    assert (perm != np.arange(len(groups))).mean() > 0.5  # it does shuffle
    again = within_group_permutation(groups, np.random.default_rng(0))
    assert (again == perm).all()


def test_bad_shapes_and_too_few_items_say_so():
    with pytest.raises(ValueError, match="paired"):
        linear_cka(data(n=10), data(n=11))
    with pytest.raises(ValueError, match="at least 4"):
        hsic_unbiased(data(n=3), data(n=3))
    with pytest.raises(ValueError, match="neighbours"):
        mutual_knn(data(n=5), data(n=5), k=10)
    with pytest.raises(ValueError, match="same state"):
        prepare(np.ones((50, 8)))
    with pytest.raises(ValueError, match="items, dims"):
        prepare(np.ones(50))
    broken = data(n=50)
    broken[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(broken, data(n=50))


def related_pair(n=240, seed=0):
    """Two representations of the same items sharing part of their structure, one with a
    massive dimension."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6))
    x = z @ rng.standard_normal((6, 24)) + 0.5 * rng.standard_normal((n, 24))
    y = np.tanh(z @ rng.standard_normal((6, 16))) + 0.5 * rng.standard_normal((n, 16))
    x[:, 3] *= 300
    return x, y


# float64 products agree with the plain functions exactly; the default float32 ones closely
PRECISIONS = [(np.float64, dict(rel=1e-9, abs=1e-12)), (np.float32, dict(rel=0, abs=2e-5))]


@pytest.mark.parametrize("dtype, tolerance", PRECISIONS)
def test_prepared_pair_metrics_equal_the_plain_functions(dtype, tolerance):
    x, y = related_pair()
    prep = dict(keeps=(0.9, 5), dtype=dtype)
    got = pair_metrics(prepare(x, **prep), prepare(y, **prep))
    want = {
        "cka": linear_cka(x, y),
        "cka_unbiased": unbiased_cka(x, y),
        "cka_standardized": linear_cka(standardized(x), standardized(y)),
        "cka_trimmed": linear_cka(without_outlier_dimensions(x), without_outlier_dimensions(y)),
        "mutual_knn": mutual_knn(without_outlier_dimensions(x), without_outlier_dimensions(y)),
        "cknna": cknna(without_outlier_dimensions(x), without_outlier_dimensions(y)),
        "svcca@0.9": svcca(x, y, 0.9),
        "svcca@5": svcca(x, y, 5),
    }
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, **tolerance), key
    assert got["cka_trimmed"] > got["cka"] + 0.1  # the massive dimension hid the agreement


def test_prepared_views_trim_the_dimensions_outlier_dimensions_names():
    x, y = related_pair(seed=2)
    x[:, 7] += 500.0  # a massive offset with ordinary variance, as SmolLM2's dimension 507
    assert outlier_dimensions(x)[[3, 7]].all()
    a, b = prepare(x), prepare(y)
    assert (a.kept == ~outlier_dimensions(x)).all()
    want = linear_cka(without_outlier_dimensions(x), without_outlier_dimensions(y))
    assert pair_metrics(a, b)["cka_trimmed"] == pytest.approx(want, abs=2e-5)


@pytest.mark.parametrize("dtype, tolerance", PRECISIONS)
def test_a_permuted_pairing_equals_the_metrics_of_the_permuted_rows(dtype, tolerance):
    x, y = related_pair(seed=1)
    perm = np.random.default_rng(5).permutation(len(y))
    a, b = prepare(x, dtype=dtype), prepare(y, dtype=dtype)
    got = pair_metrics(a, b, perm)
    want = pair_metrics(a, prepare(y[perm], dtype=dtype))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, **tolerance), key
    assert got["cka"] < pair_metrics(a, b)["cka"] - 0.2  # the pairing was broken
    moved, fresh = b.neighbours.permuted(perm), prepare(y[perm], dtype=dtype).neighbours
    assert (moved.ids == fresh.ids).all()
    np.testing.assert_allclose(moved.cosine, fresh.cosine, rtol=1e-6)


def layer_stack(z, dims, seed):
    """Layers of one model on the same items: a signal z [n, 5] shared with the other
    model, read differently per layer, one massive dimension in some."""
    rng = np.random.default_rng(seed)
    n = len(z)
    out = []
    for i, d in enumerate(dims):
        x = np.tanh(z @ rng.standard_normal((5, d)) / (1 + i)) + 0.3 * rng.standard_normal((n, d))
        if i % 2:
            x[:, 0] *= 200
        out.append(x)
    return out


@pytest.mark.parametrize("dtype, tolerance", PRECISIONS)
@pytest.mark.parametrize("layers_a, layers_b", [(2, 3), (3, 2)])
def test_cka_matrices_equal_pair_by_pair_metrics(dtype, tolerance, layers_a, layers_b):
    """The Gram form (every layer pair and pairing at once, whichever side is permuted)
    gives the feature-space metrics of each pair, for the true pairing and permuted ones."""
    n = 90
    z = np.random.default_rng(0).standard_normal((n, 5))
    xa = layer_stack(z, [12, 7, 9][:layers_a], seed=1)
    xb = layer_stack(z, [8, 11, 6][:layers_b], seed=2)
    pa = [prepare(x, dtype=dtype) for x in xa]
    pb = [prepare(y, dtype=dtype) for y in xb]
    docs = np.repeat(np.arange(9), 10)
    rng = np.random.default_rng(3)
    pairings = [None, within_group_permutation(docs, rng), rng.permutation(n)]
    got = cka_matrices(pa, pb, pairings)
    assert len(got) == len(pairings)
    for values, perm in zip(got, pairings, strict=True):
        assert set(values) == set(CKA_METRICS)
        for i, a in enumerate(pa):
            for j, b in enumerate(pb):
                want = pair_metrics(a, b, perm)
                for name in CKA_METRICS:
                    assert values[name][i, j] == pytest.approx(want[name], **tolerance), name
    # a broken pairing reads lower than the true one on the shared signal
    assert (got[2]["cka_trimmed"] < got[0]["cka_trimmed"] - 0.1).all()


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_leading_basis_spans_the_leading_singular_directions(rank_deficient):
    """The covariance route gives the SVD's leading subspace and kept counts: orthonormal
    columns, the same span; a rank-deficient matrix (kept directions with no variance)
    falls back to the SVD itself."""
    from samesheep.layers.geometry import leading_basis

    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 30)) @ rng.standard_normal((30, 30))
    x[:, 2] *= 90.0  # a massive dimension: most of the variance on one direction
    if rank_deficient:
        x[:, 10:] = x[:, :20] @ rng.standard_normal((20, 20)) * 0  # 20 dead dimensions
    keeps = (0.9, 0.99, 25)
    u, kept = leading_basis(x.astype(np.float32), keeps)
    ref_u, ref_s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    for keep in keeps:
        want = max(
            int(np.searchsorted(np.cumsum(ref_s**2) / (ref_s**2).sum(), keep - 1e-12) + 1)
            if isinstance(keep, float)
            else keep,
            1,
        )
        assert kept[str(keep)] == want
    k = kept["0.99"]
    np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)
    overlap = np.linalg.svd(u[:, :k].T @ ref_u[:, :k], compute_uv=False)
    assert overlap.min() > 1 - 1e-4  # the same subspace


def copy_of(x, rng):
    """An input-only stand-in for x: its standardised states mixed, plus noise of its own."""
    return 0.7 * standardized(x) @ rng.standard_normal((x.shape[1],) * 2) + rng.standard_normal(
        x.shape
    )


VIEWS = {"raw": lambda x: x, "standardized": standardized, "trimmed": without_outlier_dimensions}


@pytest.mark.parametrize("dtype, tolerance", PRECISIONS)
@pytest.mark.parametrize("gram", [True, False])
def test_input_debiased_matrices_equal_the_plain_function_for_every_pairing(dtype, tolerance, gram):
    """The stage's form (cross terms of A's layers then its copy's against B's then its
    copy's, from packed Grams or in feature space, B's copy moved with B under a
    permutation) gives input_debiased_cka of each view's states, pair by pair."""
    n = 90
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, 5))
    xa, xb = layer_stack(z, [12, 7], seed=1), layer_stack(z, [8, 11, 6], seed=2)
    # the copies: part of each layer's structure (not its massive dimension, as an untrained
    # network has none), plus their own
    fa = [copy_of(x, rng) for x in xa]
    fb = [copy_of(y, rng) for y in xb]
    left = [prepare(x, dtype=dtype) for x in [*xa, *fa]]
    right = [prepare(y, dtype=dtype) for y in [*xb, *fb]]
    perms = [None, within_group_permutation(np.repeat(np.arange(9), 10), rng)]
    grams = PackedGrams.of(left, right) if gram else None
    selves = (self_crosses(left), self_crosses(right))
    copies = (copy_crosses(left[:2], left[2:]), copy_crosses(right[:3], right[3:]))
    for cross, perm in zip(pairing_crosses(left, right, perms, grams), perms, strict=True):
        got = input_debiased_matrices(cross, (2, 3), selves, copies)
        assert set(got) == set(INPUT_DEBIASED.values())
        p = np.arange(n) if perm is None else perm
        for view, f in VIEWS.items():
            for i in range(2):
                for j in range(3):
                    want = input_debiased_cka(f(xa[i]), f(xb[j])[p], f(fa[i]), f(fb[j])[p])
                    value = got[INPUT_DEBIASED[view]][i, j]
                    assert value == pytest.approx(want, **tolerance), (view, i, j)
