"""Layer-by-layer comparison on planted data: CKA on unions of document groups against
linear CKA computed directly, the corrected threshold, best-matching layers and their
intervals, and the whole layer x layer matrix where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from samesheep.config import RepresentationsConfig
from samesheep.representations import (
    best_layers,
    bonferroni_z,
    compare_layers,
    document_groups,
    layers_table,
)
from samesheep.similarity import Groups, half_subsets, linear_cka, subset_cka


def orthogonal(d, seed=1):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_subset_cka_equals_linear_cka_on_each_union_recentred():
    rng = np.random.default_rng(0)
    n, groups = 240, rng.integers(0, 6, 240)
    x = rng.standard_normal((n, 9)) + 3.0  # an offset: each union must be recentred
    y = x[:, :5] @ rng.standard_normal((5, 7)) + 0.5 * rng.standard_normal((n, 7)) - 2.0
    subsets = np.vstack([np.ones(6), half_subsets(6, 20, rng), [1, 0, 0, 0, 0, 1]])
    got = subset_cka(Groups.of(x, groups), Groups.of(y, groups), subsets)
    for row, value in zip(subsets, got, strict=True):
        rows = np.isin(groups, np.flatnonzero(row))
        assert value == pytest.approx(linear_cka(x[rows], y[rows]), abs=1e-9)
    assert got[0] == pytest.approx(linear_cka(x, y), abs=1e-9)  # the whole sample


def test_subset_cka_is_one_for_a_rotated_and_scaled_copy():
    rng = np.random.default_rng(1)
    x, groups = rng.standard_normal((100, 8)), rng.integers(0, 4, 100)
    y = 3.0 * x @ orthogonal(8)
    got = subset_cka(Groups.of(x, groups), Groups.of(y, groups), half_subsets(4, 10, rng))
    assert np.allclose(got, 1.0)


def test_half_subsets_never_repeat_a_group():
    rows = half_subsets(7, 50, np.random.default_rng(0))
    assert set(np.unique(rows)) <= {0.0, 1.0} and (rows.sum(1) == 3).all()
    with pytest.raises(ValueError):
        half_subsets(1, 5, np.random.default_rng(0))


def test_document_groups_keep_each_document_whole():
    docs = np.repeat(np.arange(13), 5)
    g = document_groups(docs, 4, np.random.default_rng(0))
    assert set(g) == {0, 1, 2, 3}
    for d in range(13):
        assert len(set(g[docs == d])) == 1
    counts = np.bincount([g[docs == d][0] for d in range(13)])
    assert counts.max() - counts.min() <= 1  # documents dealt evenly
    assert set(document_groups(np.array([0, 0, 1]), 10, np.random.default_rng(0))) == {0, 1}


def test_bonferroni_threshold():
    assert bonferroni_z(0.05, 1) == pytest.approx(1.6449, abs=1e-4)
    z = bonferroni_z(0.05, 540)  # 18 x 30 layer pairs: the normal tail beyond z is 0.05 / 540
    assert 0.5 * math.erfc(z / math.sqrt(2)) == pytest.approx(0.05 / 540, rel=1e-6)
    assert bonferroni_z(0.05, 540) > bonferroni_z(0.05, 16)


def test_best_layers_and_their_interval():
    m = np.array([[0.1, 0.9, 0.2], [0.3, 0.4, 0.8]])
    sub = np.repeat(m[None], 10, axis=0)
    sub[:3, 0] = [0.95, 0.1, 0.1]  # three halves of ten prefer B's layer 0 for A's layer 0
    best = best_layers(m, sub)
    assert [r["best"] for r in best["a_to_b"]] == [1, 2]
    assert best["a_to_b"][0]["interval"] == [0, 1] and best["a_to_b"][0]["agree"] == 0.7
    assert best["a_to_b"][1]["interval"] == [2, 2] and best["a_to_b"][1]["agree"] == 1.0
    assert [r["best"] for r in best["b_to_a"]] == [1, 0, 1]
    assert best_layers(m)["a_to_b"][1] == {"layer": 1, "best": 2, "value": 0.8}


def planted(n_docs=40, per_doc=30, d=12, seed=0):
    """A: three layers; B: four, B's layer i + 1 a rotated, scaled copy of A's layer i (plus a
    little noise) and B's layer 0 independent of A."""
    rng = np.random.default_rng(seed)
    n = n_docs * per_doc
    docs = np.repeat(np.arange(n_docs), per_doc)
    base = rng.standard_normal((n, d))
    xa = [base]
    for _ in range(2):  # each layer a new mixture: layers differ, but stay related
        xa.append(np.tanh(xa[-1] @ rng.standard_normal((d, d)) / np.sqrt(d)) * 2)
    xb = [rng.standard_normal((n, d + 3))]
    for x in xa:
        q = orthogonal(d, seed=len(xb))
        xb.append(np.hstack([2.5 * x @ q, 0.01 * rng.standard_normal((n, 3))]))
    return xa, xb, docs


def test_compare_layers_finds_the_planted_correspondence():
    xa, xb, docs = planted()
    rep = RepresentationsConfig(permutations=6, subsets=40, groups=8)
    floor = ([np.random.default_rng(5).standard_normal(x.shape) for x in xa], xb)
    result = compare_layers(xa, xb, docs, rep, floor)
    cka = result["metrics"]["cka"]
    assert cka["value"].shape == (3, 4)
    for i in range(3):
        assert cka["value"][i, i + 1] == pytest.approx(1.0, abs=1e-3)
        assert cka["value"][i, 0] < 0.05  # B's independent layer
        assert cka["value"][i, i + 1] > cka["threshold"][i, i + 1]
    # the null breaks the pairing: near zero, far below the matched value
    assert (cka["null_mean"] < 0.1).all() and (cka["null_sd"] >= 0).all()
    assert not (cka["value"][:, 0] > cka["threshold"][:, 0]).any()
    for name in ("cka", "cka_trimmed", "mutual_knn", "svcca@0.99"):
        best = result["best"][name]["a_to_b"]
        assert [r["best"] for r in best] == [1, 2, 3], name
    for r in result["best"]["cka_trimmed"]["a_to_b"]:
        assert r["interval"] == [r["best"], r["best"]] and r["agree"] == 1.0
    assert [r["best"] for r in result["best"]["cka"]["b_to_a"]][1:] == [0, 1, 2]
    # the floor: random A against the same B, so near the independent level
    assert (result["metrics"]["cka"]["floor"] < 0.1).all()
    assert result["seconds"].keys() >= {"prepare", "metrics and null", "floor", "intervals"}


def test_metric_matrices_and_intervals_are_the_same_in_gram_form_and_pair_by_pair(monkeypatch):
    """With the layers' Gram matrices the CKA metrics and the document-half intervals come
    from them; without (they would not fit in memory), pair by pair in feature space: both
    ways give the same matrices, for the true pairing, the null and every union of groups."""
    from samesheep import representations
    from samesheep.similarity import PackedGrams, prepare, within_group_permutation

    xa, xb, docs = planted(n_docs=12, per_doc=15)
    xa[1][:, 4] *= 80.0  # a massive dimension, so the trimmed view differs from the raw
    pa, pb = [prepare(x) for x in xa], [prepare(y) for y in xb]
    rng = np.random.default_rng(1)
    perms = [within_group_permutation(docs, rng) for _ in range(3)]
    grams = representations.gram_form(pa, pb, len(perms))
    assert isinstance(grams, PackedGrams)
    gram_values, gram_nulls = representations.metric_matrices(pa, pb, perms, grams)
    values, nulls = representations.metric_matrices(pa, pb, perms)
    assert values.keys() == gram_values.keys() and "cka_debiased" in values
    for name in values:
        np.testing.assert_allclose(gram_values[name], values[name], rtol=1e-5, atol=2e-6)
        assert nulls[name].shape == (3, 3, 4)
        np.testing.assert_allclose(gram_nulls[name], nulls[name], rtol=1e-5, atol=2e-6)
    groups = document_groups(docs, 5, rng)
    subsets = np.vstack([np.ones(5), half_subsets(5, 12, rng)])
    via_grams = representations.subset_matrices(pa, pb, groups, subsets, grams)
    direct = representations.subset_matrices(pa, pb, groups, subsets)
    for name in ("cka", "cka_trimmed"):
        np.testing.assert_allclose(via_grams[name], direct[name], rtol=1e-5, atol=2e-6)
        # the union of every group is the whole sample
        np.testing.assert_allclose(direct[name][0], values[name], rtol=1e-5, atol=2e-6)
    assert not np.allclose(direct["cka"], direct["cka_trimmed"])
    monkeypatch.setattr(representations, "GRAM_BYTES", 0)
    assert representations.gram_form(pa, pb, len(perms)) is None
    assert representations.gram_form(pa, pb, 0) is None  # nothing to permute: not worth it


def test_layers_table_is_long_and_complete():
    xa, xb, docs = planted(n_docs=10, per_doc=20)
    result = compare_layers(xa, xb, docs, RepresentationsConfig(permutations=3, subsets=5))
    t = layers_table(result, 3, 4).to_pandas()
    metrics = set(result["metrics"])
    assert len(t) == 3 * 4 * len(metrics) and set(t.metric) == metrics
    assert {"cka", "cka_debiased", "cka_standardized", "cka_trimmed", "mutual_knn", "cknna"} <= (
        metrics
    )
    assert t.floor.isna().all()  # no floor given
    row = t[(t.metric == "cka") & (t.layer_a == 0) & (t.layer_b == 1)].iloc[0]
    assert row.value == pytest.approx(result["metrics"]["cka"]["value"][0, 1])
    assert row.above_null == (row.value > row.threshold)
    assert row.depth_a == pytest.approx(1 / 3) and row.depth_b == pytest.approx(0.5)


def test_selected_dimensions_and_given_products_give_the_same_cka():
    from samesheep.similarity import group_products

    rng = np.random.default_rng(2)
    x, y, groups = rng.standard_normal((90, 6)), rng.standard_normal((90, 5)), np.arange(90) % 3
    ka, kb = np.array([1, 1, 0, 1, 0, 1], bool), np.array([0, 1, 1, 1, 1], bool)
    subsets = half_subsets(3, 6, rng)
    direct = subset_cka(Groups.of(x[:, ka], groups), Groups.of(y[:, kb], groups), subsets)
    gx, gy = Groups.of(x, groups), Groups.of(y, groups)
    parts = group_products(gx, gy)
    parts[:, ~ka] = 0.0
    parts[:, :, ~kb] = 0.0
    via = subset_cka(gx.select(ka), gy.select(kb), subsets, parts)
    np.testing.assert_allclose(via, direct, atol=1e-12)
