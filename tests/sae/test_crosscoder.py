"""The crosscoder on synthetic models with planted shared, A-only and B-only features, read
through two tokenizations of one text and aligned as the compare stage aligns them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samesheep.compare.crosscode import units_of_all
from samesheep.compare.crosscoder import Thresholds, latent_classes, shared_share
from samesheep.core.config import TrainConfig
from samesheep.core.errors import SamesheepError
from samesheep.data.alignment import TokenRows, align
from samesheep.sae.crosscoder import (
    CrosscoderShape,
    CrosscodeSettings,
    Workplace,
    load_crosscoder,
    train_crosscoder,
)

SURFACE, SHARED, A_ONLY, B_ONLY = 4, 6, 4, 4
D_A, D_B = 24, 20


def rows_of(spans: list[tuple[int, int]]) -> TokenRows:
    """TokenRows of one document; row 0 is a BOS (no text, not kept)."""
    spans = [(0, 0), *spans]
    n = len(spans)
    keep = np.arange(n) > 0
    return TokenRows(
        doc=np.zeros(n, dtype=np.int64),
        start=np.array([s for s, _ in spans]),
        end=np.array([e for _, e in spans]),
        window=np.zeros(n, dtype=np.int64),
        position=np.arange(n),
        gid=np.where(keep, np.cumsum(keep) - 1, -1),
        kept=int(keep.sum()),
    )


def planted(n_words: int, seed: int = 0):
    """(units, A's and B's hidden states per store row, the planted activations per unit
    [units, features], the random-B hidden states per B row). Features: SURFACE word
    classes (one per word, in A, B and the random B), SHARED concepts (in A and B), A-only
    and B-only ones. A splits longer words into two tokens, B keeps words whole; only the
    last token of a word carries its features (A's first pieces are noise)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 7, n_words)
    n_feat = SURFACE + SHARED + A_ONLY + B_ONLY
    acts = np.zeros((n_words, n_feat))
    acts[np.arange(n_words), rng.integers(0, SURFACE, n_words)] = rng.uniform(1, 2, n_words)
    concept = rng.random((n_words, n_feat - SURFACE)) < 0.15
    acts[:, SURFACE:] = concept * (rng.exponential(1.0, concept.shape) + 0.5)
    in_a = np.r_[np.arange(SURFACE + SHARED + A_ONLY)]
    in_b = np.r_[np.arange(SURFACE + SHARED), np.arange(SURFACE + SHARED + A_ONLY, n_feat)]
    dir_a = rng.normal(size=(len(in_a), D_A))
    dir_b = rng.normal(size=(len(in_b), D_B))
    dir_r = rng.normal(size=(SURFACE, D_B))
    word_a = acts[:, in_a] @ (dir_a / np.linalg.norm(dir_a, axis=1, keepdims=True))
    word_b = acts[:, in_b] @ (dir_b / np.linalg.norm(dir_b, axis=1, keepdims=True))
    word_r = acts[:, :SURFACE] @ (dir_r / np.linalg.norm(dir_r, axis=1, keepdims=True))
    spans_a, spans_b, hid_a, hid_b, hid_r = [], [], [np.zeros(D_A)], [np.zeros(D_B)], []
    hid_r.append(np.zeros(D_B))
    pos = 0
    for w, n in enumerate(lengths.tolist()):
        start, end = pos, pos + n + (1 if w else 0)  # a leading space after the first word
        if n >= 4:
            mid = (start + end) // 2
            spans_a += [(start, mid), (mid, end)]
            hid_a.append(rng.normal(size=D_A))
        else:
            spans_a.append((start, end))
        spans_b.append((start, end))
        hid_a.append(word_a[w] + 0.05 * rng.normal(size=D_A))
        hid_b.append(word_b[w] + 0.05 * rng.normal(size=D_B))
        hid_r.append(word_r[w] + 0.05 * rng.normal(size=D_B))
        pos = end
    units = align(rows_of(spans_a), rows_of(spans_b), np.array([pos]))
    as_t = lambda h: torch.tensor(np.array(h), dtype=torch.float32)  # noqa: E731
    return units, as_t(hid_a), as_t(hid_b), acts, as_t(hid_r)


def train(blocks, rows, tmp_path, d_sae=48, dedicated=0.0, seed=0):
    tc = TrainConfig(batch_tokens=256, dead_tokens=2048, checkpoint_seconds=3600, lr=3e-3)
    widths = tuple(b.shape[1] for b in blocks)
    xs = CrosscodeSettings(CrosscoderShape(widths, d_sae, 4, dedicated), 256 * 300, seed)
    return train_crosscoder(blocks, rows, tc, xs, Workplace(tmp_path / f"cc{seed}{dedicated}", "k"))


def best_latent_classes(cc, blocks, acts, t=None):
    """(for each planted feature: the class of the crosscoder latent whose codes correlate
    best with it, and that r)."""
    codes = cc.encode(blocks).to_dense(cc.shape.d_sae).numpy()
    z = lambda m: (m - m.mean(0)) / (m.std(0) + 1e-9)  # noqa: E731
    r = z(acts).T @ z(codes) / len(acts)
    classes = latent_classes(cc.relative_norms().numpy(), t or Thresholds())
    best = r.argmax(1)
    return classes[best], r.max(1)


def test_crosscoder_recovers_shared_a_only_and_b_only_through_two_tokenizations(tmp_path):
    units, hid_a, hid_b, acts, hid_r = planted(9000)
    assert len(units) == len(acts)  # every word a unit, although A splits the longer ones
    assert (units.row_a != units.row_b).any()
    blocks = [hid_a[units.row_a], hid_b[units.row_b]]
    rows = np.arange(7000)
    cc, summary = train(blocks, rows, tmp_path)
    held = [b[7000:] for b in blocks]
    classes, r = best_latent_classes(cc, held, acts[7000:])
    assert (r > 0.8).all(), r
    expected = np.r_[[2] * (SURFACE + SHARED), [0] * A_ONLY, [1] * B_ONLY]
    assert (classes == expected).mean() >= 0.9, (classes, expected)
    assert summary["units"] == 256 * 300 and summary["dead_at_end"] < 48

    # the floor: B replaced by a network that carries only the surface word classes. Its
    # shared latents are the surface ones; every concept is A's alone.
    floor = [hid_a[units.row_a], hid_r[units.row_b]]
    fc, _ = train(floor, rows, tmp_path, seed=1)
    f_classes, _f_r = best_latent_classes(fc, [b[7000:] for b in floor], acts[7000:])
    surface, concepts = slice(0, SURFACE), slice(SURFACE, SURFACE + SHARED + A_ONLY)
    assert (f_classes[surface] == 2).mean() >= 0.75
    assert (f_classes[concepts] == 0).all(), f_classes
    # the floor's shared latents are the surface features': over 80% of their firings are
    # on latents that follow a surface feature (r > 0.5); a few rare concept latents sit
    # near the threshold (relative norms 0.6-0.66 in this run)
    codes = fc.encode([b[7000:] for b in floor]).to_dense(fc.shape.d_sae).numpy()
    n_fired = (codes > 0).sum(0)
    live = n_fired >= 10
    shared = latent_classes(fc.relative_norms().numpy(), Thresholds()) == 2
    with np.errstate(invalid="ignore", divide="ignore"):
        surface_r = np.corrcoef(np.c_[acts[7000:, surface], codes].T)[:SURFACE, SURFACE:]
    follows = np.nan_to_num(np.abs(surface_r)).max(0) > 0.5
    assert n_fired[shared & live & follows].sum() >= 0.8 * n_fired[shared & live].sum()

    # the headline shares: the trained pair shares more than the floor
    main_live = (cc.encode(held).to_dense(48).numpy() > 0).sum(0) >= 10
    runs = {
        "raw": (latent_classes(cc.relative_norms().numpy(), Thresholds()), main_live),
        "floor": (latent_classes(fc.relative_norms().numpy(), Thresholds()), live),
    }
    out = shared_share(runs, 2)
    assert out["raw"]["share"] > out["floor"]["share"] + 0.2
    lo, hi = out["raw"]["interval"]
    assert lo <= out["raw"]["share"] <= hi


def test_dedicated_latents_never_write_to_the_other_model(tmp_path):
    units, hid_a, hid_b, _acts, _ = planted(3000)
    blocks = [hid_a[units.row_a], hid_b[units.row_b]]
    cc, _ = train(blocks, np.arange(2500), tmp_path, d_sae=40, dedicated=0.1)
    norms = cc.decoder_norms()
    assert (norms[:4, 1] == 0).all() and (norms[4:8, 0] == 0).all()
    assert (norms[:4, 0] > 0.99).all() and (norms[4:8, 1] > 0.99).all()
    assert (norms[8:].sum(1) > 0).all()
    # and saved and loaded, the same codes
    path = tmp_path / "cc.safetensors"
    cc.save(path)
    again = load_crosscoder(path)
    a, b = cc.encode(blocks), again.encode(blocks)
    assert torch.equal(a.latents, b.latents) and torch.allclose(a.values, b.values)


def test_three_models_and_the_resume(tmp_path):
    units, hid_a, hid_b, _acts, hid_r = planted(3000)
    blocks = [hid_a[units.row_a], hid_b[units.row_b], hid_r[units.row_b]]
    cc, _ = train(blocks, np.arange(2500), tmp_path)
    assert cc.relative_norms().shape == (48, 3)
    classes = latent_classes(cc.relative_norms().numpy(), Thresholds())
    assert set(classes.tolist()) <= {0, 1, 2, 3, 4}
    # a second call with the same key resumes from the finished checkpoint: same weights
    again, summary = train(blocks, np.arange(2500), tmp_path)
    assert summary["resumed"] and torch.equal(cc.sae.W_dec, again.sae.W_dec)


def test_classes_at_the_stated_thresholds():
    rel = np.array([[0.5, 0.5], [0.71, 0.29], [0.2, 0.8], [0.31, 0.69]])
    assert latent_classes(rel, Thresholds()).tolist() == [2, 0, 1, 2]
    three = np.array([[0.34, 0.33, 0.33], [0.8, 0.1, 0.1], [0.5, 0.45, 0.05]])
    assert latent_classes(three, Thresholds()).tolist() == [3, 0, 4]


def test_bad_shapes_fail_in_one_line(tmp_path):
    with pytest.raises(SamesheepError, match="two or more"):
        CrosscoderShape((8,), 16, 4)
    with pytest.raises(SamesheepError, match="shared"):
        CrosscoderShape((8, 8), 16, 4, dedicated=0.5)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(SamesheepError, match="unreadable"):
        load_crosscoder(tmp_path / "bad.safetensors")


def test_units_of_three_tokenizations_are_the_spans_all_share():
    """ "unbelievable cat!" cut three ways: A in pieces, B whole words, C joins " cat!"; a
    unit of the three is a span that is a unit of A-B and of A-C."""
    a = rows_of([(0, 2), (2, 12), (12, 16), (16, 17)])
    b = rows_of([(0, 12), (12, 16), (16, 17)])
    c = rows_of([(0, 12), (12, 17)])
    rows, doc = units_of_all(a, [b, c], np.array([17]), after_break=4)
    # A-B units: "unbelievable", " cat", "!"; A-C: "unbelievable", " cat!"
    assert [r.tolist() for r in rows] == [[2], [1], [1]] and doc.tolist() == [0]
    rows, _ = units_of_all(a, [b], np.array([17]), after_break=4)
    assert [r.tolist() for r in rows] == [[2, 3, 4], [1, 2, 3]]


def test_a_killed_training_resumes_to_the_same_crosscoder(tmp_path, monkeypatch):
    import samesheep.sae.crosscoder as module

    units, hid_a, hid_b, _, _ = planted(2000)
    blocks = [hid_a[units.row_a], hid_b[units.row_b]]
    rows = np.arange(1500)
    tc = TrainConfig(batch_tokens=256, dead_tokens=2048, checkpoint_seconds=0, lr=3e-3)
    xs = CrosscodeSettings(CrosscoderShape((D_A, D_B), 32, 4), 256 * 40, 0)
    whole, _ = train_crosscoder(blocks, rows, tc, xs, Workplace(tmp_path / "whole", "k"))

    real_step, calls = module.train_step, []

    def dies_at_25(*args, **kwargs):
        calls.append(1)
        if len(calls) == 25:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(module, "train_step", dies_at_25)
    with pytest.raises(KeyboardInterrupt):
        train_crosscoder(blocks, rows, tc, xs, Workplace(tmp_path / "killed", "k"))
    monkeypatch.setattr(module, "train_step", real_step)
    again, summary = train_crosscoder(blocks, rows, tc, xs, Workplace(tmp_path / "killed", "k"))
    assert summary["resumed"]
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "batch_threshold"):
        assert torch.allclose(getattr(whole.sae, name), getattr(again.sae, name), atol=1e-6), name
