"""The comparison's parts against known answers: sparse correlations against numpy, alignment
of hand-made tokenizations, planted two-model data, nulls, intervals that cover the truth,
matching, and SVCCA's truncation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

from samesheep.compare.correlation import TopPartners, correlation_blocks, unit_codes
from samesheep.compare.matching import assignment, candidate_pairs, families, mutual_pairs
from samesheep.compare.measurement import (
    Settings,
    across_documents,
    by_decile,
    candidate_r,
    document_groups,
    headline,
    histogram,
    jackknife,
    leave_one_out,
    measure,
    shifted_within_documents,
)
from samesheep.core.errors import SamesheepError
from samesheep.data.alignment import TokenRows, align, unit_texts
from samesheep.layers.geometry import keep_for_variance, rsa_test, svcca, svcca_test
from samesheep.sae.model import SparseCodes, sparse_from_dense


def sparse_codes(rng, n, m, density=0.1):
    x = rng.random((n, m)) * (rng.random((n, m)) < density)
    return x


# ---- correlations ----


def test_correlation_views_equal_numpy():
    rng = np.random.default_rng(0)
    n, ma, mb = 400, 13, 9
    a, b = sparse_codes(rng, n, ma), sparse_codes(rng, n, mb)
    a[:, 3] = 0.0  # a dead latent: r = 0
    text = rng.integers(0, 25, n)
    got: dict[str, np.ndarray] = {v: np.zeros((ma, mb)) for v in ("raw", "residual", "token")}

    def visit(rows, views):
        for v, r in views.items():
            got[v][rows] = r

    correlation_blocks(sp.csr_matrix(a), sp.csr_matrix(b), text, visit, block=5)

    def corr(x, y):
        out = np.zeros((x.shape[1], y.shape[1]))
        for i in range(x.shape[1]):
            for j in range(y.shape[1]):
                if x[:, i].std() > 0 and y[:, j].std() > 0:
                    out[i, j] = np.corrcoef(x[:, i], y[:, j])[0, 1]
        return out

    def text_mean(x):
        means = np.zeros((25, x.shape[1]))
        for t in range(25):
            if (text == t).any():
                means[t] = x[text == t].mean(0)
        return means[text]

    np.testing.assert_allclose(got["raw"], corr(a, b), atol=1e-10)
    np.testing.assert_allclose(got["token"], corr(text_mean(a), text_mean(b)), atol=1e-10)
    ra, rb = a - text_mean(a), b - text_mean(b)
    # residuals have mean 0 exactly; their r is the uncentred cosine over units
    want = corr(ra, rb)
    np.testing.assert_allclose(got["residual"], want, atol=1e-8)
    assert (got["raw"][3] == 0).all()


def test_top_partners_over_blocks_equal_a_full_sort():
    rng = np.random.default_rng(1)
    r = rng.uniform(-1, 1, (50, 40))
    tp = TopPartners(50, 40, 3)
    for lo in range(0, 50, 7):
        tp.add(slice(lo, min(lo + 7, 50)), r[lo : lo + 7])
    tp.finish()
    np.testing.assert_array_equal(tp.a_idx, np.argsort(-r, axis=1)[:, :3])
    np.testing.assert_array_equal(tp.b_idx, np.argsort(-r, axis=0)[:3].T)
    np.testing.assert_allclose(tp.b_val, -np.sort(-r, axis=0)[:3].T)


# ---- alignment ----


def rows_of(tokens, doc=0, window=0, kept=None):
    """TokenRows of one document from (start, end) spans; position 0 is a BOS (no text)."""
    spans = [(0, 0), *tokens]
    n = len(spans)
    keep = np.array([i > 0 for i in range(n)]) if kept is None else np.asarray(kept)
    gid = np.where(keep, np.cumsum(keep) - 1, -1)
    return TokenRows(
        doc=np.full(n, doc),
        start=np.array([s for s, _ in spans]),
        end=np.array([e for _, e in spans]),
        window=np.full(n, window),
        position=np.arange(n),
        gid=gid,
        kept=int(keep.sum()),
    )


def test_alignment_of_hand_made_tokenizations():
    text = "unbelievable cat é!"
    # A splits the word three ways and the "é" into two byte pieces sharing its span;
    # B keeps the word whole, and its byte pieces of "é" overlap (the second runs on to "!")
    a = rows_of([(0, 2), (2, 8), (8, 12), (12, 16), (16, 18), (16, 18), (18, 19)])
    b = rows_of([(0, 12), (12, 16), (16, 18), (17, 19)])
    units = align(a, b, np.array([len(text)]))
    spans = list(zip(units.start.tolist(), units.end.tolist(), strict=True))
    # shared clean ends: 12, 16 and 19 (B's first "é" piece ends inside its second)
    assert spans == [(0, 12), (12, 16), (16, 19)]
    assert units.gid_a.tolist() == [2, 3, 6] and units.gid_b.tolist() == [0, 1, 3]
    ids, texts = unit_texts(units, [text])
    assert [texts[i] for i in ids] == ["unbelievable", " cat", " é!"]


def test_unit_values_last_max_and_mean():
    """A's three pieces of "unbelievable" are one unit: its value there is the last piece's,
    or the maximum or the mean over the pieces; B's whole word is its own value each way."""
    a = rows_of([(0, 2), (2, 8), (8, 12), (12, 16), (16, 18), (16, 18), (18, 19)])
    b = rows_of([(0, 12), (12, 16), (16, 18), (17, 19)])
    units = align(a, b, np.array([19]))
    # A's kept rows 0..6 (store rows 1..7), one latent each of two
    dense = np.array([[1, 0], [4, 0], [2, 5], [0, 3], [6, 0], [0, 0], [1, 1]], dtype=float)
    codes = codes_of(dense)
    got = {
        how: unit_codes(codes, a.gid, units.first_a, units.row_a, 2, how).toarray()
        for how in ("last", "max", "mean")
    }
    np.testing.assert_array_equal(got["last"], [[2, 5], [0, 3], [1, 1]])
    np.testing.assert_array_equal(got["max"], [[4, 5], [0, 3], [6, 1]])
    np.testing.assert_allclose(got["mean"], [[7 / 3, 5 / 3], [0, 3], [7 / 3, 1 / 3]])
    one = codes_of(np.array([[1.0, 2], [3, 4], [5, 6], [7, 8]]))
    for how in ("last", "max", "mean"):
        got_b = unit_codes(one, b.gid, units.first_b, units.row_b, 2, how).toarray()
        np.testing.assert_array_equal(
            got_b,
            [[1, 2], [3, 4], [7, 8]]
            if how == "last"
            else [[1, 2], [3, 4], [7, 8]]
            if how == "max"
            else [[1, 2], [3, 4], [6, 7]],
        )
    # a unit value that is left out (B's rows 3..4 with row 3 not kept) counts kept rows only
    b_part = rows_of([(0, 12), (12, 16), (16, 18), (17, 19)], kept=[False, True, True, False, True])
    units = align(a, b_part, np.array([19]))
    three = codes_of(np.array([[1.0, 2], [3, 4], [7, 8]]))
    got_b = unit_codes(three, b_part.gid, units.first_b, units.row_b, 2, "mean").toarray()
    np.testing.assert_array_equal(got_b[-1], [7, 8])
    with pytest.raises(SamesheepError, match="unit value 'median'"):
        unit_codes(three, b_part.gid, units.first_b, units.row_b, 2, "median")


def codes_of(dense: np.ndarray) -> SparseCodes:
    return sparse_from_dense(torch.from_numpy(dense).float())


def test_one_tokenizer_gives_token_units_and_a_token_level_comparison():
    """With the same tokenizer on both sides the units are the tokens, and the comparison
    on units equals a plain token-level one computed on the codes themselves."""
    rng = np.random.default_rng(3)
    words = rng.integers(1, 7, 300)  # word lengths
    ends = np.cumsum(words)
    spans = list(zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist(), strict=True))
    a = rows_of(spans)
    units = align(a, a, np.array([int(ends[-1])]))
    assert units.gid_a.tolist() == units.gid_b.tolist() == list(range(300))
    assert units.coverage["one_to_one_share_a"] == 1.0
    assert units.coverage["tokens_per_unit_a"] == 1.0
    xa, xb = sparse_codes(rng, 300, 11, 0.3), sparse_codes(rng, 300, 7, 0.3)
    xb[:, 0] = xa[:, 2] * rng.uniform(0.5, 1.5, 300)  # one shared latent
    ca, cb = codes_of(xa), codes_of(xb)
    s = Settings(min_fires=5, partners=3, groups=4)
    groups = np.arange(300) % 4
    on_units = measure(
        unit_codes(ca, a.gid, units.first_a, units.row_a, 11),
        unit_codes(cb, a.gid, units.first_b, units.row_b, 7),
        None,
        groups,
        s,
    )
    as_stored = [sp.csr_matrix(x.astype(np.float32).astype(np.float64)) for x in (xa, xb)]
    on_tokens = measure(*as_stored, None, groups, s)
    for side in ("a_idx", "a_val", "b_idx", "b_val"):
        np.testing.assert_allclose(
            getattr(on_units.partners["raw"], side),
            getattr(on_tokens.partners["raw"], side),
            rtol=0,
            atol=1e-12,
        )
    assert on_units.partners["raw"].a_idx[2, 0] == 0


def test_units_after_a_window_break_and_unkept_tokens_are_left_out():
    a = rows_of([(0, 3), (3, 7), (7, 8), (8, 12)], window=1)  # a later window: less context
    b = rows_of([(0, 3), (3, 7), (7, 8), (8, 12)], kept=[False, True, False, True, True])
    units = align(a, b, np.array([12]), after_break=2)
    # positions 1-2 follow the break (units ending at 3 and 7; b does not keep 7 anyway)
    assert units.end.tolist() == [8, 12]


# ---- planted two-model data ----


def planted(seed=0, n_docs=60, per_doc=80):
    """Codes of two models on the same units: A0 ~ B0 (shared, r ~ 0.8), A1 alone, A2 split
    over B1 and B2 (each fires on half of A2's units), the rest independent noise."""
    rng = np.random.default_rng(seed)
    n = n_docs * per_doc
    doc = np.repeat(np.arange(n_docs), per_doc)
    ma, mb = 12, 12
    a = sparse_codes(rng, n, ma, 0.05)
    b = sparse_codes(rng, n, mb, 0.05)
    on = rng.random(n) < 0.2
    a[:, 0] = on * rng.uniform(1, 2, n)
    b[:, 0] = np.where(rng.random(n) < 0.9, a[:, 0], 0) * rng.uniform(0.8, 1.2, n)
    a[:, 1] = (rng.random(n) < 0.2) * rng.uniform(1, 2, n)
    half = rng.random(n) < 0.5
    a[:, 2] = (rng.random(n) < 0.3) * rng.uniform(1, 2, n)
    b[:, 1] = np.where(half, a[:, 2], 0)
    b[:, 2] = np.where(~half, a[:, 2], 0)
    return sp.csr_matrix(a), sp.csr_matrix(b), doc


class _Units:
    def __init__(self, doc):
        self.doc = doc

    def __len__(self):
        return len(self.doc)


def test_planted_pair_unpartnered_and_family_are_recovered():
    a, b, doc = planted()
    s = Settings(min_fires=20, partners=3, groups=10)
    groups = document_groups(_Units(doc), 10)
    m = measure(a, b, None, groups, s)
    p = m.partners["raw"]
    assert p.a_idx[0, 0] == 0 and p.a_val[0, 0] > 0.7
    pairs = mutual_pairs(p.a_idx[:, 0], p.b_idx[:, 0])
    assert [0, 0] in pairs.tolist()
    assert p.a_val[1, 0] < 0.2  # A1 has no partner
    fam = families(p.b_idx[:, 0], p.b_val[:, 0])
    assert 2 in fam and set(fam[2].tolist()) == {1, 2}
    r = candidate_r(m)
    np.testing.assert_allclose(np.sort(r)[::-1][:3], np.sort(p.a_val.ravel())[::-1][:3])
    # nulls: shifting within documents, or pairing documents across, leaves nothing
    perm = shifted_within_documents(_Units(doc))
    null = measure(a, b[perm], None, groups, s)
    assert null.partners["raw"].a_val[:, 0].max() < 0.15
    ra, rb = across_documents(_Units(doc))
    across = measure(a[ra], b[rb], None, groups[ra], s)
    assert across.partners["raw"].a_val[:, 0].max() < 0.15


def test_across_documents_never_lines_the_starts_up():
    """Each document's units meet another document's, past the first few units, at another
    position from its start: a latent that only follows the position in the document (the
    same in both models) finds no partner there."""
    doc = np.repeat(np.arange(40), 30)
    units = _Units(doc)
    ra, rb = across_documents(units, skip=3, seed=1)
    assert len(ra) > 0 and (doc[ra] != doc[rb]).all()
    first = np.concatenate([[0], np.flatnonzero(np.diff(doc)) + 1])
    pos_a, pos_b = ra - first[doc[ra]], rb - first[doc[rb]]
    assert (pos_a >= 3).all() and (pos_b >= 3).all()
    assert (pos_a != pos_b).all()
    # a latent that fires at one position of every document, in both models: paired at the
    # same positions it would match perfectly; here it never fires on both sides at once
    at_four = np.concatenate([np.arange(30) == 4] * 40).astype(float)
    assert at_four[ra].sum() > 0 and at_four[rb].sum() > 0
    assert (at_four[ra] * at_four[rb]).sum() == 0


def test_headline_numbers_by_hand():
    """Four judged latents (one too rare) with known best partners: every headline number,
    the histogram and the deciles by hand."""
    best = np.array([0.9, 0.65, 0.4, 0.1, 0.95])
    fires = np.array([100, 30, 25, 50, 5])  # the last is too rare to judge
    s = Settings(min_fires=20, thresholds=(0.3, 0.5))
    h = headline(best, fires, s)
    assert h["judged"] == 4
    assert h["mean_best_r"] == pytest.approx(2.05 / 4)
    assert h["mean_best_r_weighted"] == pytest.approx((90 + 19.5 + 10 + 5) / 205)
    assert h["share_r0.5"] == pytest.approx(0.5)
    assert h["share_r0.5_weighted"] == pytest.approx(130 / 205)
    assert h["share_r0.3"] == pytest.approx(0.75)
    counts = histogram(best, fires, s, bins=10)
    assert counts == [0, 1, 0, 0, 1, 0, 1, 0, 0, 1]
    rows = by_decile(best, fires, s, 0.5)
    assert sum(r["latents"] for r in rows) == 4
    assert [r["share_r0.5"] for r in rows if r["latents"]] == [0.0, 1.0, 0.0, 1.0]  # by fires
    assert all("share_r0.3" in r for r in rows)


def test_jackknife_interval_covers_the_truth_at_about_its_rate():
    """Latents whose partner correlation is drawn around 0.5: the share with r >= 0.5 varies
    from sample to sample. Its 95% interval over documents covers the truth (the share of
    planted correlations above 0.5, computed on a very large sample) in most replicates."""
    rng = np.random.default_rng(7)
    m_lat = 60
    target = rng.uniform(0.3, 0.7, m_lat)

    def sample(seed, n_docs):
        g = np.random.default_rng(seed)
        n = n_docs * 50
        doc = np.repeat(np.arange(n_docs), 50)
        # each document has its own level (units inside one document are not independent)
        level = np.repeat(g.normal(0, 1, (n_docs, m_lat)), 50, axis=0)
        x = level + g.normal(0, 1, (n, m_lat))
        noise = np.repeat(g.normal(0, 1, (n_docs, m_lat)), 50, axis=0) + g.normal(0, 1, (n, m_lat))
        y = target * x + np.sqrt(1 - target**2) * noise
        a = np.maximum(x + 2.5, 0)  # shifted to stay positive: codes are activations
        b = np.maximum(y + 2.5, 0)
        return sp.csr_matrix(a), sp.csr_matrix(b), doc

    s = Settings(min_fires=10, partners=3, groups=20, thresholds=(0.5,))
    a, b, doc = sample(999, 800)
    big = measure(
        a, b, None, np.zeros(len(doc), dtype=int), Settings(thresholds=(0.5,), partners=3, groups=1)
    )
    truth = headline(big.partners["raw"].a_val[:, 0], big.fires_a, s)["share_r0.5"]
    covered, widths, estimates = 0, [], []
    replicates = 60
    for rep in range(replicates):
        a, b, doc = sample(rep, 80)
        groups = document_groups(_Units(doc), 20, seed=rep)
        m = measure(a, b, None, groups, s)
        est = headline(m.partners["raw"].a_val[:, 0], m.fires_a, s)["share_r0.5"]
        loo = [x["share_r0.5"] for x in leave_one_out(m, s, "a_to_b")]
        lo, hi, _ = jackknife(est, loo)
        covered += lo <= truth <= hi
        widths.append(hi - lo)
        estimates.append(est)
    # about its nominal rate (measured: 58 of 60), and no wider than it needs to be: a 95%
    # interval as wide as the spread of the estimates over replicates would be 3.9 sd wide
    # (measured: the jackknife's is 1.9 times that, so it errs on the safe side)
    assert 0.85 <= covered / replicates <= 1.0, (covered, truth)
    assert np.mean(widths) <= 2.5 * 2 * 1.96 * np.std(estimates), (widths, estimates)


# ---- matching and geometry ----


def test_assignment_equals_the_hungarian_solution_on_dense_candidates():
    rng = np.random.default_rng(3)
    r = rng.uniform(-0.2, 1, (15, 11))
    i, j = np.nonzero(np.ones_like(r))
    pairs = assignment(i, j, r[i, j], 15, 11, min_r=-1.0)
    rows, cols = linear_sum_assignment(-r)
    assert r[pairs[:, 0], pairs[:, 1]].sum() == pytest.approx(r[rows, cols].sum())
    # with the top partners only, and pairs below 0 never made
    a_idx = np.argsort(-r, axis=1)[:, :3]
    b_idx = np.argsort(-r, axis=0)[:3].T
    ci, cj, cr = candidate_pairs(
        a_idx, np.take_along_axis(r, a_idx, 1), b_idx, np.take_along_axis(r.T, b_idx, 1)
    )
    some = assignment(ci, cj, cr, 15, 11)
    assert len(set(some[:, 0])) == len(some) and len(set(some[:, 1])) == len(some)
    assert (r[some[:, 0], some[:, 1]] > 0).all()


def test_svcca_keeps_hundreds_of_dimensions_and_is_invariant():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 512))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    assert 300 < keep_for_variance(s, 0.99) <= 512
    assert keep_for_variance(np.array([3.0, 1.0, 0.0]), 0.9) == 1
    y = x @ rng.normal(size=(512, 512))  # an invertible map: SVCCA 1 at full rank
    assert svcca(x[:, :50], x[:, :50] @ rng.normal(size=(50, 50)), keep=50) == pytest.approx(
        1, abs=1e-6
    )
    test = svcca_test(x[:400, :40], y[:400, :40], keep=0.99, n=20)
    assert 0 <= test["value"] <= 1 and test["p"] <= 1
    z = rng.normal(size=(300, 20))
    r = rsa_test(z, z * 3, n=20)
    assert r["value"] == pytest.approx(1) and r["p"] < 0.1
