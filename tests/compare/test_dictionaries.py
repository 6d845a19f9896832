"""PCA, ICA and NMF dictionaries through the comparison code, on synthetic hidden states
with known answers: a planted rotation, shared independent sources, and nothing shared."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from samesheep.compare.correlation import is_dense, products
from samesheep.compare.dictionaries import FitPlan, compare_dictionary, fit_rows
from samesheep.compare.measurement import group_sums
from samesheep.core.config import CompareConfig
from samesheep.core.errors import SamesheepError
from samesheep.data.alignment import Units
from samesheep.sae.dictionaries import DictionarySettings, fit_dictionary

DOCS, PER_DOC, TRAIN_DOCS = 120, 40, 100
WORDS = [f"w{i}" for i in range(300)]
KEY = "share_r0.5"
CFG = CompareConfig(min_fires=20, groups=20)


def corpus(rng) -> tuple[list[str], Units, np.ndarray]:
    """(every document's text, one unit per word, each unit's word id)."""
    texts, doc, start, end, word = [], [], [], [], []
    for d in range(DOCS):
        ids = rng.integers(0, len(WORDS), PER_DOC)
        pos = 0
        for w in ids:
            doc.append(d)
            start.append(pos)
            end.append(pos + len(WORDS[w]))
            word.append(w)
            pos += len(WORDS[w]) + 1
        texts.append(" ".join(WORDS[w] for w in ids))
    n = len(doc)
    rows = np.arange(n)
    units = Units(np.array(doc), np.array(start), np.array(end), rows, rows, rows, rows, rows, rows)
    return texts, units, np.array(word)


def sources(rng, n: int, d: int) -> np.ndarray:
    """[n, d] independent right-skewed sources with distinct scales."""
    return (rng.exponential(1.0, (n, d)) - 1.0) * np.linspace(3.0, 0.5, d)


def surface(rng, word: np.ndarray, d: int) -> np.ndarray:
    """An untrained copy: a random vector per word, a little noise."""
    table = rng.standard_normal((len(WORDS), d))
    return table[word] + 0.05 * rng.standard_normal((len(word), d))


def run(method: str, hidden: dict[str, np.ndarray], texts, units) -> dict:
    s = DictionarySettings(method, max_iter=400, seed=0)
    return compare_dictionary(hidden, units, (texts, TRAIN_DOCS), CFG, s, FitPlan(5000, 0))


def answer(out: dict) -> tuple[dict, float]:
    ans = out["headline"]["raw"]["a_to_b"]["answer"]
    return ans, ans["normalised"][KEY]


def test_pca_of_a_rotated_model_is_shared_and_of_an_unrelated_one_is_not():
    rng = np.random.default_rng(0)
    texts, units, word = corpus(rng)
    n, d = len(units), 12
    a = sources(rng, n, d) @ rng.standard_normal((d, d))
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    hidden = {"a": a, "b": a @ rotation, "fa": surface(rng, word, d), "fb": surface(rng, word, d)}
    ans, norm = answer(run("pca", hidden, texts, units))
    assert ans["raw"][KEY] > 0.95  # every principal direction has its partner
    assert ans["floor"][KEY] < 0.05  # B's untrained copy holds only the words
    assert ans["ceiling"][KEY] > 0.95  # the other half of the documents finds them again
    assert norm > 0.9
    hidden["b"] = sources(rng, n, d) @ rng.standard_normal((d, d))  # nothing shared
    ans, norm = answer(run("pca", hidden, texts, units))
    assert ans["raw"][KEY] < 0.1
    lo, hi = ans["intervals"][KEY]["normalised"]
    assert abs(norm) < 0.1 and lo - 1e-9 <= 0.0 <= hi + 1e-9


def test_ica_finds_sources_two_different_mixings_share_where_pca_does_not():
    rng = np.random.default_rng(1)
    texts, units, word = corpus(rng)
    n, d = len(units), 8
    s = sources(rng, n, d)
    hidden = {
        "a": s @ rng.standard_normal((d, d)),
        "b": s @ rng.standard_normal((d, d)),  # the same sources, mixed another way
        "fa": surface(rng, word, d),
        "fb": surface(rng, word, d),
    }
    ica, norm_ica = answer(run("ica", hidden, texts, units))
    pca, _ = answer(run("pca", hidden, texts, units))
    assert ica["raw"][KEY] > 0.95 and ica["ceiling"][KEY] > 0.95
    assert ica["floor"][KEY] < 0.05 and norm_ica > 0.9
    # PCA's directions are mixtures of the sources, a different mixture in each model
    assert pca["raw"]["mean_best_r"] < ica["raw"]["mean_best_r"] - 0.1
    assert ica["raw"]["mean_best_r"] > 0.95


def test_nmf_codes_are_nonnegative_and_the_comparison_runs_on_them():
    rng = np.random.default_rng(2)
    texts, units, word = corpus(rng)
    n, d = len(units), 8
    parts = rng.exponential(1.0, (n, d)) * (rng.random((n, d)) < 0.3)
    hidden = {
        "a": parts @ rng.random((d, d)),
        "b": parts @ rng.random((d, d)),
        "fa": surface(rng, word, d),
        "fb": surface(rng, word, d),
    }
    out = run("nmf", hidden, texts, units)
    ans, _ = answer(out)
    assert out["width"] == dict.fromkeys(("a", "b", "fa", "fb", "ca", "cb"), d)
    assert ans["raw"][KEY] > ans["floor"][KEY]
    codes = fit_dictionary(hidden["a"], DictionarySettings("nmf", seed=0)).encode(hidden["a"])
    assert codes.min() >= 0 and (codes == 0).any()


def test_pca_signs_follow_the_skew_and_two_fits_agree():
    rng = np.random.default_rng(3)
    x = sources(rng, 4000, 6) @ rng.standard_normal((6, 6))
    one = fit_dictionary(x[:2000], DictionarySettings("pca")).encode(x)
    two = fit_dictionary(x[2000:], DictionarySettings("pca")).encode(x)
    centred = one - one.mean(0)
    assert ((centred**3).mean(0) > 0).all()
    r = np.array([np.corrcoef(one[:, k], two[:, k])[0, 1] for k in range(6)])
    assert (r > 0.99).all()


def test_fit_rows_split_training_documents_in_halves():
    rng = np.random.default_rng(4)
    _, units, _ = corpus(rng)
    every, (first, second) = fit_rows(units, TRAIN_DOCS, FitPlan(10**9, 0))
    assert (units.doc[every] < TRAIN_DOCS).all() and len(every) == TRAIN_DOCS * PER_DOC
    assert not set(units.doc[first]) & set(units.doc[second])
    assert len(first) + len(second) == len(every)
    capped, _ = fit_rows(units, TRAIN_DOCS, FitPlan(100, 0))
    assert len(capped) == 100


def test_unknown_method_and_too_few_units_are_one_line_errors():
    with pytest.raises(SamesheepError, match="unknown dictionary"):
        DictionarySettings("svd")
    with pytest.raises(SamesheepError, match="too few"):
        fit_dictionary(np.zeros((3, 8)), DictionarySettings("pca"))


def test_dense_codes_take_the_dense_products_with_the_same_sums():
    rng = np.random.default_rng(5)
    n, ma, mb, groups = 600, 7, 5, 4
    a = sp.csr_matrix(rng.standard_normal((n, ma)) * (rng.random((n, ma)) < 0.6))
    b = sp.csr_matrix(rng.standard_normal((n, mb)))
    assert is_dense(a) and is_dense(b)
    assert not is_dense(sp.csr_matrix((rng.random((n, ma)) < 0.01) * 1.0))
    ad, bd = a.toarray(), b.toarray()
    np.testing.assert_allclose(products(a, b), ad.T @ bd, rtol=1e-12, atol=1e-9)
    group = rng.integers(0, groups, n)
    ci, cj = rng.integers(0, ma, 20), rng.integers(0, mb, 20)
    counts, cross, mom = group_sums(a, b, group, groups, ci, cj)
    for g in range(groups):
        rows = group == g
        assert counts[g] == rows.sum()
        want = (ad[rows][:, ci] * bd[rows][:, cj]).sum(0)
        np.testing.assert_allclose(cross[g], want, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(mom["qa"][g], (ad[rows] ** 2).sum(0), rtol=1e-10)


def test_nmf_codes_are_what_sklearn_transform_gives():
    """The NMF encoding computes X H^T and H H^T once; it is MiniBatchNMF.transform."""
    rng = np.random.default_rng(3)
    x = (np.abs(rng.normal(size=(3000, 24))) * rng.exponential(size=(1, 24))).astype(np.float32)
    d = fit_dictionary(x[:1500], DictionarySettings("nmf", 12, 20, 0))
    want = d.estimator.transform(d._input(x))
    got = d.encode(x)
    assert got.dtype == np.float32 and (got >= 0).all()
    assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)
