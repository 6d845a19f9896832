"""Conditional probes: the closed-form cross-validated ridge against a brute-force numpy
reference, and the three labels on synthetic two-model data with planted features."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from samesheep.compare.probes import (
    DirectionProbes,
    LabelRule,
    ProbeData,
    ProbeSettings,
    document_folds,
    fit_probes,
    label_split,
)


def _docs(n_docs: int, per_doc: int) -> np.ndarray:
    return np.repeat(np.arange(n_docs), per_doc)


def _reference(data: ProbeData, s: ProbeSettings, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(held-out R^2, chosen alpha) of every latent, by explicit fits: numpy solves of the
    ridge normal equations on each fold's design matrix, every latent on its own."""
    x = {
        "target": data.x["target"],
        "floor": data.x["floor"],
        "both": np.concatenate([data.x["target"], data.x["floor"]], 1),
    }[name].astype(np.float64)
    train = data.doc < data.first_heldout
    full = np.concatenate([data.x["target"], data.x["floor"]], 1).astype(np.float64)
    mean, std = full[train].mean(0), full[train].std(0)
    std[std == 0] = 1
    d_t = data.x["target"].shape[1]
    cols = {"target": slice(0, d_t), "floor": slice(d_t, None), "both": slice(None)}[name]
    z = ((full - mean) / std)[:, cols]
    assert z.shape[1] == x.shape[1]
    y = data.y.toarray()
    fold = document_folds(data.doc, data.first_heldout, s.folds, s.seed)

    def fit(rows: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        zr, yr = z[rows], y[rows]
        mz, my = zr.mean(0), yr.mean(0)
        a = (zr - mz).T @ (zr - mz) + alpha * len(rows) * np.eye(z.shape[1])
        w = np.linalg.solve(a, (zr - mz).T @ (yr - my))
        return w, my - mz @ w

    errors = np.zeros((len(s.alphas), y.shape[1]))
    for k in range(fold.max() + 1):
        held_in, rest = np.flatnonzero(fold == k), np.flatnonzero((fold >= 0) & (fold != k))
        for i, alpha in enumerate(s.alphas):
            w, b = fit(rest, alpha)
            errors[i] += ((y[held_in] - z[held_in] @ w - b) ** 2).sum(0)
    choice = errors.argmin(0)
    r2 = np.zeros(y.shape[1])
    heldout = ~train
    for j in range(y.shape[1]):
        w, b = fit(np.flatnonzero(train), s.alphas[choice[j]])
        pred = z[heldout] @ w[:, j] + b[j]
        yh = y[heldout, j]
        r2[j] = 1 - ((yh - pred) ** 2).sum() / ((yh - yh.mean()) ** 2).sum()
    return r2, np.asarray(s.alphas)[choice]


def test_probes_match_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    n_docs, per_doc = 30, 40
    doc = _docs(n_docs, per_doc)
    n = len(doc)
    xt = rng.normal(size=(n, 6)).astype(np.float32) * [1, 5, 0.1, 2, 1, 3]
    xf = rng.normal(size=(n, 4)).astype(np.float32) + 2
    signal = xt[:, 0] - 0.5 * xt[:, 3] + 0.3 * xf[:, 1]
    y = np.stack(
        [
            np.maximum(signal + rng.normal(size=n), 0),  # mostly predictable, sparse
            np.maximum(rng.normal(size=n), 0) * (rng.random(n) < 0.1),  # noise, rare
            np.maximum(xf[:, 0] - 2 + 0.3 * rng.normal(size=n), 0),  # from the floor
        ],
        1,
    )
    data = ProbeData(sp.csr_matrix(y), {"target": xt, "floor": xf}, doc, 22, doc % 4)
    s = ProbeSettings(folds=4, alphas=(1e-3, 1e-1, 1.0, 30.0))
    result, _ = fit_probes(data, s)
    for name in ("target", "floor", "both"):
        r2, alpha = _reference(data, s, name)
        np.testing.assert_allclose(result.r2[name], r2, atol=2e-4)
        np.testing.assert_array_equal(result.alpha[name], alpha)
    assert result.r2["both"][0] > 0.5 and result.r2["floor"][2] > 0.5
    assert result.r2["target"][2] < 0.05  # the target holds nothing of the third


def test_dropped_groups_are_the_r2_without_their_heldout_units() -> None:
    rng = np.random.default_rng(1)
    doc = _docs(24, 30)
    n = len(doc)
    xt = rng.normal(size=(n, 5)).astype(np.float32)
    xf = rng.normal(size=(n, 3)).astype(np.float32)
    y = np.maximum(xt[:, :2] @ [1.0, -1.0] + rng.normal(size=n), 0)[:, None]
    group = doc % 3
    data = ProbeData(sp.csr_matrix(y), {"target": xt, "floor": xf}, doc, 16, group)
    s = ProbeSettings(folds=3, alphas=(1e-2,))
    full, _ = fit_probes(data, s)
    for g in range(3):
        keep = ~((doc >= 16) & (group == g))
        # the same probes (training units unchanged), scored without group g's held-out units
        part = ProbeData(
            data.y[keep], {k: v[keep] for k, v in data.x.items()}, doc[keep], 16, group[keep]
        )
        alone, _ = fit_probes(part, s)
        np.testing.assert_allclose(full.dropped["both"][g], alone.r2["both"], atol=1e-5)


def _planted(seed: int = 0) -> tuple[ProbeData, np.ndarray]:
    """Units of 100 documents; A's latents: 0 a concept both models hold (B as a latent), 1
    one B holds spread over two directions, 2 one B lacks, 3 a surface feature of the text
    that B and B's untrained copy both carry. B's hidden state and its untrained copy's."""
    rng = np.random.default_rng(seed)
    doc = _docs(100, 60)
    n = len(doc)
    concepts = rng.normal(size=(n, 4))
    token = rng.integers(0, 20, n)  # the text: its surface feature is a token's identity
    surface = np.where(token < 3, 1.0, 0.0) + 0.1 * rng.normal(size=n)
    concepts[:, 3] = surface
    y = np.maximum(concepts - 0.3, 0)
    y[:, 3] = np.maximum(surface - 0.5, 0)
    embed = rng.normal(size=(20, 24))
    d = 56
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    xb = 0.5 * rng.normal(size=(n, d))
    xb += np.outer(concepts[:, 0], basis[0]) * 2
    xb += np.outer(concepts[:, 1], basis[1] + basis[2]) * 1.5  # spread over two directions
    xb[:, 32:] += embed[token]  # the trained model also carries the token
    xf = 0.5 * rng.normal(size=(n, 32))
    xf[:, :24] = embed[token]  # the untrained copy carries the token alone, and exactly
    data = ProbeData(
        sp.csr_matrix(y),
        {"target": xb.astype(np.float32), "floor": xf.astype(np.float32)},
        doc,
        75,
        doc % 10,
    )
    best_r = np.array([0.9, 0.3, 0.1, 0.2])  # B's SAE holds concept 0 as a latent
    return data, best_r


def _shift(doc: np.ndarray) -> np.ndarray:
    perm = np.arange(len(doc))
    for d in np.unique(doc):
        rows = np.flatnonzero(doc == d)
        perm[rows] = np.roll(rows, 7)
    return perm


def test_the_null_is_the_same_probe_on_shifted_units() -> None:
    """The null (fitted from moments, at the real probes' ridge strengths) against a plain
    fit on the shifted units at that one strength."""
    data, _ = _planted(2)
    s = ProbeSettings(folds=3, alphas=(1e-2,))
    _, null = fit_probes(data, s, null_order=_shift(data.doc))
    perm = _shift(data.doc)
    shifted = ProbeData(data.y[perm], data.x, data.doc, data.first_heldout, data.group)
    plain, _ = fit_probes(shifted, s)
    for name in ("target", "floor", "both"):
        np.testing.assert_allclose(null.r2[name], plain.r2[name], atol=1e-4)


def test_planted_features_get_their_labels() -> None:
    data, best_r = _planted()
    s = ProbeSettings(folds=5)
    result, null = fit_probes(data, s, null_order=_shift(data.doc))
    cond = result.conditional()
    assert result.r2["target"][3] > 0.6  # B's state predicts the surface feature well...
    assert abs(cond[3]) < 0.03  # ...but no better than its untrained copy does
    assert cond[0] > 0.5 and cond[1] > 0.5 and abs(cond[2]) < 0.03
    assert np.all(np.abs(null.conditional()) < 0.05)
    probes = DirectionProbes(result, null, np.ones(4, dtype=bool))
    dropped = [best_r] * result.dropped["both"].shape[0]
    labels, split = label_split(probes, (best_r, dropped), LabelRule(0.5, 0.05))
    assert labels.tolist() == ["shared", "spread", "absent", "absent"]
    assert split["shares"] == {"shared": 0.25, "spread": 0.25, "absent": 0.5}
    assert split["counts"] == {"shared": 1, "spread": 1, "absent": 2}
    for k, (lo, hi) in split["intervals"].items():
        assert lo <= split["shares"][k] <= hi


def test_without_the_untrained_copy_the_surface_feature_would_pass_as_spread() -> None:
    """The floor is what keeps a surface feature from being labelled present: the plain
    R^2 from B alone would call it present."""
    data, _ = _planted(1)
    result, _ = fit_probes(data, ProbeSettings(folds=3))
    assert result.r2["target"][3] - result.r2["floor"][3] < 0.05
    assert result.r2["target"][3] > 0.05


@pytest.mark.parametrize("folds", [2, 5])
def test_folds_deal_whole_training_documents(folds: int) -> None:
    doc = _docs(12, 5)
    fold = document_folds(doc, 9, folds, 0)
    assert (fold[doc >= 9] == -1).all()
    for d in range(9):
        assert len(set(fold[doc == d])) == 1
    assert set(fold[doc < 9]) == set(range(folds))
