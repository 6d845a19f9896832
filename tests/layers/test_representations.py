"""Layer-by-layer comparison on planted data: CKA on unions of document groups against
linear CKA computed directly, the corrected threshold, best-matching layers and their
intervals, and the whole layer x layer matrix where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from samesheep.core.config import RepresentationsConfig
from samesheep.layers.similarity import Groups, half_subsets, linear_cka, standardized, subset_cka
from samesheep.layers.stage import (
    best_layers,
    bonferroni_z,
    compare_layers,
    document_groups,
    headline_summary,
    layers_answer,
    layers_table,
)


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
    # only cells that survive may be chosen; a layer with none has no best
    mask = np.array([[True, False, True], [False, False, False]])
    masked = best_layers(m, sub, mask)
    assert masked["a_to_b"][0]["best"] == 2 and masked["a_to_b"][0]["interval"] == [0, 2]
    assert masked["a_to_b"][1] == {"layer": 1, "best": None, "value": None}
    assert [r["best"] for r in masked["b_to_a"]] == [0, None, 0]
    # B -> A read from its own scores (each direction less its own floor)
    back = best_layers(m, reverse=(np.array([[0.9, 0.0, 0.0], [0.0, 0.9, 0.9]]), None))
    assert [r["best"] for r in back["a_to_b"]] == [1, 2]
    assert [r["best"] for r in back["b_to_a"]] == [0, 1, 1]


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


def untrained(xs, seed):
    """Stand-ins for a model's untrained copy: random states of its layers' shapes."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(x.shape) for x in xs]


def test_compare_layers_finds_the_planted_correspondence():
    xa, xb, docs = planted()
    rep = RepresentationsConfig(permutations=6, subsets=40, groups=8)
    result = compare_layers(xa, xb, docs, rep, (untrained(xa, 5), untrained(xb, 6)))
    cka = result["metrics"]["cka"]
    assert cka["value"].shape == (3, 4)
    for i in range(3):
        assert cka["value"][i, i + 1] == pytest.approx(1.0, abs=1e-3)
        assert cka["value"][i, 0] < 0.05  # B's independent layer
        assert cka["value"][i, i + 1] > cka["threshold"][i, i + 1]
    # the null breaks the pairing: near zero, far below the matched value
    assert (cka["null_mean"] < 0.1).all() and (cka["null_sd"] >= 0).all()
    assert not (cka["value"][:, 0] > cka["threshold"][:, 0]).any()
    assert not cka["survives"][:, 0].any() and all(cka["survives"][i, i + 1] for i in range(3))
    for name in ("cka", "cka_trimmed", "mutual_knn", "svcca@0.99", "cka_trimmed_input_debiased"):
        best = result["best"][name]["a_to_b"]
        assert [r["best"] for r in best] == [1, 2, 3], name
    for name in ("cka_trimmed", "cka_trimmed_input_debiased"):
        for r in result["best"][name]["a_to_b"]:
            assert r["interval"] == [r["best"], r["best"]] and r["agree"] == 1.0, name
    assert [r["best"] for r in result["best"]["cka"]["b_to_a"]][1:] == [0, 1, 2]
    # B's independent layer 0 has no match in A that survives
    assert result["best"]["cka"]["b_to_a"][0]["best"] is None
    # copies that share nothing with the models: every floor near the independent level,
    # and regressing them out changes little
    for kind in ("floor_a_to_b", "floor_b_to_a", "random_pair"):
        assert (cka[kind] < 0.1).all(), kind
    np.testing.assert_allclose(
        result["metrics"]["cka_input_debiased"]["value"], cka["value"], atol=0.05
    )
    np.testing.assert_allclose(
        cka["corrected"], cka["value"] - np.fmax(cka["floor_a_to_b"], cka["floor_b_to_a"])
    )
    assert result["headline"] == "cka_trimmed_input_debiased"
    assert result["seconds"].keys() >= {"prepare", "metrics and null", "floor", "intervals"}
    # without the untrained copies: no floors, no input-debiased metrics, plain trimmed CKA
    bare = compare_layers(xa, xb, docs, rep)
    assert bare["headline"] == "cka_trimmed" and "cka_input_debiased" not in bare["metrics"]
    assert np.isnan(bare["metrics"]["cka"]["floor_a_to_b"]).all()
    assert [r["best"] for r in bare["best"]["cka_trimmed"]["a_to_b"]] == [1, 2, 3]


def test_the_corrected_values_see_past_what_the_untrained_copies_share():
    """A's layer 0 and B's layer 0 both follow the token identities (as untrained networks'
    states do), which their untrained copies supply as well; A's layer 1 and B's layer 1
    share structure beyond the tokens. Plain CKA pairs A's layer 0 with B's token layer;
    against the fixed-source floors and with the copies regressed out it does not, and the
    layers that share structure stay matched."""
    rng = np.random.default_rng(0)
    n_docs, per_doc = 40, 40
    n = n_docs * per_doc
    docs = np.repeat(np.arange(n_docs), per_doc)
    p = 1.0 / np.arange(1, 301)
    ids = rng.choice(300, n, p=p / p.sum())

    def token_layer(d):
        return rng.standard_normal((300, d))[ids] + 0.2 * rng.standard_normal((n, d))

    z = rng.standard_normal((n, 6))
    xa = [token_layer(48), z @ rng.standard_normal((6, 40)) + 0.5 * token_layer(40)]
    xb = [token_layer(56), z @ rng.standard_normal((6, 32)) + 0.5 * token_layer(32)]
    copies = ([token_layer(48), token_layer(40)], [token_layer(56), token_layer(32)])
    rep = RepresentationsConfig(permutations=6, subsets=20, groups=8)
    result = compare_layers(xa, xb, docs, rep, copies)
    cka = result["metrics"]["cka_trimmed"]
    debiased = result["metrics"]["cka_trimmed_input_debiased"]
    assert cka["value"][0, 0] > 0.5  # the token identities, shared by every layer here
    assert cka["floor_a_to_b"][0, 0] > 0.5 and cka["floor_b_to_a"][0, 0] > 0.5
    # A -> B holds A's layer fixed against B's copy's: A's token layer 0 reads high against
    # B's copy's layer 1 (a token layer), B's layer 1 low against A's copy's layer 0
    assert cka["floor_a_to_b"][0, 1] > 0.3 > cka["floor_b_to_a"][0, 1]
    assert cka["floor_b_to_a"][1, 0] > 0.3 > cka["floor_a_to_b"][1, 0]
    assert debiased["value"][0, 0] < 0.2 < debiased["value"][1, 1]
    assert debiased["survives"][1, 1] and cka["survives"][1, 1]
    assert cka["corrected"][0, 0] < 0.1 < cka["corrected"][1, 1]
    for name in ("cka_trimmed", "cka_trimmed_input_debiased"):
        assert result["best"][name]["b_to_a"][1]["best"] == 1, name
        assert result["best"][name]["a_to_b"][1]["best"] == 1, name


@pytest.mark.parametrize("with_copies", [True, False])
def test_metric_matrices_and_intervals_are_the_same_in_gram_form_and_pair_by_pair(
    monkeypatch, with_copies
):
    """With the layers' Gram matrices (the models' layers followed by their untrained
    copies') the CKA metrics, their floors, the input-debiased metrics and the document-half
    scores come from them; without (they would not fit in memory), pair by pair in feature
    space: both ways give the same matrices, for the true pairing, the null and every union
    of groups, and the union of every group gives the whole sample's values."""
    from samesheep.layers import stage as representations
    from samesheep.layers.similarity import PackedGrams, prepare, within_group_permutation

    xa, xb, docs = planted(n_docs=12, per_doc=15)
    xa[1][:, 4] *= 80.0  # a massive dimension, so the trimmed view differs from the raw
    pa, pb = [prepare(x) for x in xa], [prepare(y) for y in xb]
    rng = np.random.default_rng(1)
    # copies that carry part of each layer (so the regression removes something), not its
    # massive dimension (an untrained network has none)
    fa = [
        prepare(standardized(x) @ orthogonal(x.shape[1], 7) + rng.standard_normal(x.shape))
        for x in xa
    ]
    fb = [prepare(0.5 * y + rng.standard_normal(y.shape)) for y in xb]
    copies = (fa, fb) if with_copies else None
    left, right = (pa + fa, pb + fb) if with_copies else (pa, pb)
    perms = [within_group_permutation(docs, rng) for _ in range(3)]
    grams = representations.gram_form(left, right, len(perms), with_copies)
    assert isinstance(grams, PackedGrams)
    gram_values, gram_nulls, gram_floors = representations.metric_matrices(
        pa, pb, perms, grams, copies
    )
    values, nulls, floors = representations.metric_matrices(pa, pb, perms, None, copies)
    assert values.keys() == gram_values.keys() and "cka_unbiased" in values
    assert ("cka_trimmed_input_debiased" in values) == with_copies
    cka_names = {"cka", "cka_unbiased", "cka_standardized", "cka_trimmed"}
    assert floors.keys() == gram_floors.keys() == (cka_names if with_copies else set())
    for name in values:
        np.testing.assert_allclose(gram_values[name], values[name], rtol=1e-5, atol=2e-6)
        assert nulls[name].shape == (3, 3, 4)
        np.testing.assert_allclose(gram_nulls[name], nulls[name], rtol=1e-5, atol=2e-6)
    for name, kinds in floors.items():
        for kind, m in kinds.items():
            np.testing.assert_allclose(gram_floors[name][kind], m, rtol=1e-5, atol=2e-6)
    groups = document_groups(docs, 5, rng)
    subsets = np.vstack([np.ones(5), half_subsets(5, 12, rng)])
    via_grams = representations.subset_matrices(pa, pb, groups, subsets, grams, copies)
    direct = representations.subset_matrices(pa, pb, groups, subsets, None, copies)
    assert via_grams.keys() == direct.keys()
    debiased = {"cka_input_debiased", "cka_trimmed_input_debiased"} if with_copies else set()
    assert set(direct) == {"cka", "cka_trimmed"} | debiased
    for name in direct:
        for k, want in enumerate(
            (values[name] - floors[name]["a_to_b"], values[name] - floors[name]["b_to_a"])
            if name in floors
            else (values[name], values[name])
        ):
            np.testing.assert_allclose(via_grams[name][k], direct[name][k], rtol=1e-5, atol=2e-6)
            # the union of every group is the whole sample
            np.testing.assert_allclose(direct[name][k][0], want, rtol=1e-5, atol=2e-6)
    assert not np.allclose(direct["cka"][0], direct["cka_trimmed"][0])
    monkeypatch.setattr(representations, "GRAM_BYTES", 0)
    assert representations.gram_form(left, right, len(perms), with_copies) is None


def test_gram_form_pays_with_a_null_or_the_floors():
    from samesheep.layers import stage as representations
    from samesheep.layers.similarity import prepare

    xa, xb, _ = planted(n_docs=4, per_doc=10)
    pa, pb = [prepare(x) for x in xa], [prepare(y) for y in xb]
    assert representations.gram_form(pa, pb, 0) is None  # one pairing: not worth it
    assert representations.gram_form(pa + pa, pb + pb, 0, floor=True) is not None


def test_layers_table_is_long_and_complete():
    xa, xb, docs = planted(n_docs=10, per_doc=20)
    rep = RepresentationsConfig(permutations=3, subsets=5)
    result = compare_layers(xa, xb, docs, rep)
    t = layers_table(result, 3, 4).to_pandas()
    metrics = set(result["metrics"])
    assert len(t) == 3 * 4 * len(metrics) and set(t.metric) == metrics
    assert {"cka", "cka_unbiased", "cka_standardized", "cka_trimmed", "mutual_knn", "cknna"} <= (
        metrics
    )
    for column in ("floor_a_to_b", "floor_b_to_a", "random_pair"):
        assert t[column].isna().all()  # no floor given
    assert (t.corrected == t.value).all()
    row = t[(t.metric == "cka") & (t.layer_a == 0) & (t.layer_b == 1)].iloc[0]
    assert row.value == pytest.approx(result["metrics"]["cka"]["value"][0, 1])
    assert row.above_null == (row.value > row.threshold) and row.survives == row.above_null
    assert row.depth_a == pytest.approx(1 / 3) and row.depth_b == pytest.approx(0.5)
    floored = compare_layers(xa, xb, docs, rep, (untrained(xa, 1), untrained(xb, 2)))
    t = layers_table(floored, 3, 4).to_pandas()
    assert set(t.metric) == metrics | {
        "cka_input_debiased",
        "cka_standardized_input_debiased",
        "cka_trimmed_input_debiased",
    }
    plain = t[~t.metric.str.endswith("_input_debiased")]
    assert plain.floor_a_to_b.notna().all() and plain.floor_b_to_a.notna().all()
    # the untrained pair (a diagnostic) comes with the CKA metrics only
    assert (plain.random_pair.notna() == plain.metric.str.startswith("cka")).all()
    top = np.fmax(plain.floor_a_to_b, plain.floor_b_to_a)
    np.testing.assert_allclose(plain.corrected, plain.value - top)
    assert (plain.survives == (plain.above_null & (plain.value > top))).all()
    debiased = t[t.metric.str.endswith("_input_debiased")]
    assert debiased.floor_a_to_b.isna().all() and (debiased.corrected == debiased.value).all()


def test_selected_dimensions_and_given_products_give_the_same_cka():
    from samesheep.layers.similarity import group_products

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


def test_the_answer_leads_with_the_headline_and_its_floors():
    xa, xb, docs = planted(n_docs=20, per_doc=20)
    rep = RepresentationsConfig(permutations=4, subsets=10, groups=5)
    result = compare_layers(xa, xb, docs, rep, (untrained(xa, 1), untrained(xb, 2)))
    head = headline_summary(result)
    assert head["metric"] == "cka_trimmed_input_debiased" and head["pairs"] == 12
    assert head["survive"] == int(result["metrics"][head["metric"]]["survives"].sum())
    floors = np.array(head["cells"]["plain_floor_a_to_b"], dtype=float)
    want = result["metrics"]["cka_trimmed"]["floor_a_to_b"]
    np.testing.assert_allclose(floors, want, atol=1e-4)
    summary = {
        "model_a": "a",
        "model_b": "b",
        "units": len(docs),
        "floor": True,
        "best": result["best"],
        "headline": head,
    }
    text = layers_answer(summary, layers_table(result, 3, 4))
    assert text.startswith(f"layers a / b: {head['survive']} of 12 layer pairs have input-debiased")
    assert "a's last layer 2 matches b layer 3 (95% range over document halves 3-3)" in text
    cell = result["metrics"]["cka_trimmed"]
    assert f"against its fixed-source floors {cell['floor_a_to_b'][2, 3]:.2f}" in text
    # a last layer with nothing that survives says so
    summary["best"]["cka_trimmed_input_debiased"]["a_to_b"][-1] = {
        "layer": 2,
        "best": None,
        "value": None,
    }
    assert layers_answer(summary, layers_table(result, 3, 4)).endswith(
        "a's last layer 2: no layer of b survives"
    )
