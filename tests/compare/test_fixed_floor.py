"""The answer on one scale: fixed-source floors and ceilings, the surface split and
cross-fitted partners, on synthetic codes with planted structure (surface features that an
untrained copy also carries, deep features shared or not) and on pure noise."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from samesheep.compare.measurement import (
    Settings,
    crossfit_best,
    document_groups,
    group_halves,
    measure,
)
from samesheep.compare.pair import SURFACE_R, answer, headline_table, surface_scores, verdict


class FakeUnits:
    """The one field document_groups reads."""

    def __init__(self, doc: np.ndarray) -> None:
        self.doc = doc


def sparse_factor(rng, n: int, p: float) -> np.ndarray:
    """[n] a sparse nonnegative signal firing on a share p of the units."""
    return (rng.random(n) < p) * rng.exponential(1.0, n)


def copy_of(rng, x: np.ndarray, noise: float = 0.2) -> np.ndarray:
    """A noisy copy of a nonnegative signal: same units, values jittered."""
    return x * np.clip(1 + noise * rng.standard_normal(len(x)), 0.05, None)


def planted(shared_deep: int, seed: int = 0):
    """Codes [units, latents] of A, B, their untrained copies and A's second seed, and the
    document of each unit. A: 40 surface latents (token detectors an untrained network also
    has) and 60 deep ones, 12 of them unstable (no second seed finds them), of the 48 stable
    `shared_deep` also in B. B: the same surface latents, its shared ones, its own. The
    untrained copies: surface detectors only."""
    rng = np.random.default_rng(seed)
    docs, per_doc = 200, 40
    n = docs * per_doc
    doc = np.repeat(np.arange(docs), per_doc)
    token = rng.integers(0, 60, n)
    surface = [(token == k) * rng.uniform(0.5, 1.5, n) for k in range(40)]
    deep = [sparse_factor(rng, n, 0.06) for _ in range(60)]  # A's deep factors
    own_b = [sparse_factor(rng, n, 0.06) for _ in range(60 - shared_deep)]
    a = [copy_of(rng, x) for x in surface + deep]
    # the first 12 deep factors are unstable: the second seed has fresh latents instead
    ca = [copy_of(rng, x) for x in surface] + [sparse_factor(rng, n, 0.06) for _ in range(12)]
    ca += [copy_of(rng, x) for x in deep[12:]]
    b = [copy_of(rng, x) for x in surface + deep[12 : 12 + shared_deep] + own_b]
    # an untrained network's latents are all surface detectors: the tokens A uses, and
    # others (later tokens, the previous token) that both untrained copies carry
    previous = np.roll(token, 1)
    more = [(token == k) * 1.0 for k in range(40, 60)] + [(previous == k) * 1.0 for k in range(40)]
    fa = [copy_of(rng, x) for x in surface + more]
    fb = [copy_of(rng, x) for x in surface + more]
    cb = [copy_of(rng, x) for x in b]
    mats = {
        k: sp.csr_matrix(np.stack(v, 1))
        for k, v in {"a": a, "b": b, "fa": fa, "fb": fb, "ca": ca, "cb": cb}.items()
    }
    return mats, doc


def measure_all(mats, doc, s: Settings):
    """The measurements the compare stage runs, by the same names."""
    groups = document_groups(FakeUnits(doc), s.groups, seed=0)
    a, b, fa, fb, ca, cb = (mats[k] for k in ("a", "b", "fa", "fb", "ca", "cb"))
    plan = {
        "raw": (a, b, True),
        "floor_a": (a, fb, True),
        "floor_b": (b, fa, True),
        "surface_a": (a, fa, False),
        "surface_b": (b, fb, False),
        "untrained_pair": (fa, fb, False),
        "ceiling_a": (a, ca, True),
        "ceiling_b": (b, cb, True),
    }
    return {k: measure(x, y, None, groups, s, h) for k, (x, y, h) in plan.items()}


KEY = "share_r0.5"


def test_fixed_source_floor_recovers_the_surface_and_the_score_the_deep_share():
    s = Settings(min_fires=20, groups=20, residual=False)
    mats, doc = planted(shared_deep=24)
    runs = measure_all(mats, doc, s)
    numbers = headline_table(runs, s, n_docs=200)
    e = numbers["raw"]["a_to_b"]
    ans = e["answer"]
    assert ans["mode"] == "crossfit"
    # 40 surface latents of A's 100 are what an untrained B supplies
    assert abs(ans["floor"][KEY] - 0.40) < 0.02
    assert abs(ans["raw"][KEY] - 0.64) < 0.02  # surface + 24 shared deep
    assert abs(ans["ceiling"][KEY] - 0.88) < 0.02  # all but the 12 unstable
    norm = ans["normalised"][KEY]
    lo, hi = ans["intervals"][KEY]["normalised"]
    assert abs(norm - 0.5) < 0.05  # 24 of the 48 stable deep latents
    assert lo - 1e-9 <= 0.5 <= hi + 1e-9
    # the untrained pair, matched to each other, is above the ceiling, as in the real run
    assert e["untrained_pair"][KEY] > e["ceiling"][KEY]
    # the surface split: surface latents sit at the floor, the rest carry the agreement
    split = e["split"]
    assert split["surface"]["raw"]["judged"] == 40
    assert split["rest"]["raw"]["judged"] == 60
    assert abs(split["surface"]["floor"][KEY] - 1.0) < 0.03
    assert split["rest"]["floor"][KEY] < 0.03
    assert abs(split["rest"]["raw"][KEY] - 24 / 60) < 0.03
    # every latent's surface score: A's first 40 latents are the surface ones
    sc = surface_scores(runs)["a"]
    assert (sc["r"][:40] >= SURFACE_R).all() and (sc["r"][40:] < SURFACE_R).all()
    text = answer("A", "B", numbers)
    assert text.splitlines()[0].startswith("Normalised agreement at r >= 0.5 (cross-fitted")
    assert "two untrained networks' dictionaries" in text
    assert verdict("A", "B", numbers)[0].endswith(
        "lies above its floor and below its seed ceiling."
    )


def test_no_shared_deep_features_gives_an_interval_around_zero():
    s = Settings(min_fires=20, groups=20, residual=False)
    mats, doc = planted(shared_deep=0, seed=1)
    numbers = headline_table(measure_all(mats, doc, s), s, n_docs=200)
    ans = numbers["raw"]["a_to_b"]["answer"]
    lo, hi = ans["intervals"][KEY]["normalised"]
    assert lo - 1e-9 <= 0.0 <= hi + 1e-9
    assert abs(ans["normalised"][KEY]) < 0.05


def test_cross_fitting_removes_the_max_over_candidates_bias_on_noise():
    """Rare independent latents: the best of 1,500 candidates, picked and measured on the
    same units, correlates by chance; picked on one half and measured on the other, not."""
    rng = np.random.default_rng(3)
    n, m = 3000, 1500
    doc = np.repeat(np.arange(100), n // 100)
    a = sp.csr_matrix(np.stack([sparse_factor(rng, n, 0.01) for _ in range(m)], 1))
    b = sp.csr_matrix(np.stack([sparse_factor(rng, n, 0.01) for _ in range(m)], 1))
    s = Settings(min_fires=20, groups=20, residual=False)
    groups = document_groups(FakeUnits(doc), s.groups, seed=0)
    meas = measure(a, b, None, groups, s, halves=True)
    in_sample = meas.partners["raw"].a_val[:, 0]
    cross, _, _, _ = crossfit_best(meas)
    judged = meas.fires_a >= s.min_fires
    assert judged.sum() > 1000
    assert (in_sample[judged] >= 0.1).mean() > 0.5  # chance maxima look like partners
    se = cross[judged].std() / math.sqrt(judged.sum())
    assert abs(cross[judged].mean()) < 3 * se + 1e-3  # centred on zero
    assert (cross[judged] >= 0.1).mean() < 0.02


def test_crossfit_best_equals_a_brute_force_reference():
    rng = np.random.default_rng(5)
    n, ma, mb = 1200, 30, 25
    doc = np.repeat(np.arange(60), n // 60)
    base = [sparse_factor(rng, n, 0.1) for _ in range(10)]
    a = np.stack([copy_of(rng, base[i % 10], 1.0) for i in range(ma)], 1)
    b = np.stack([copy_of(rng, base[i % 10], 1.0) for i in range(mb)], 1)
    s = Settings(min_fires=5, groups=10, partners=mb, residual=False)
    groups = document_groups(FakeUnits(doc), s.groups, seed=2)
    meas = measure(sp.csr_matrix(a), sp.csr_matrix(b), None, groups, s, halves=True)
    got_a, got_b, partner_a, _ = crossfit_best(meas)
    half = group_halves(s.groups)[groups]

    def corr(x, y):
        x, y = x - x.mean(0), y - y.mean(0)
        sx, sy = np.sqrt((x**2).sum(0)), np.sqrt((y**2).sum(0))
        return (x.T @ y) / np.outer(np.where(sx > 0, sx, np.inf), np.where(sy > 0, sy, np.inf))

    r = [corr(a[half == h], b[half == h]) for h in (0, 1)]
    want_a = np.zeros(ma)
    for h in (0, 1):
        pick = r[h].argmax(1)
        ok = r[h].max(1) > 0
        want_a[ok] += r[1 - h][np.flatnonzero(ok), pick[ok]] / 2
        if h == 0:
            np.testing.assert_array_equal(partner_a[ok], pick[ok])
    np.testing.assert_allclose(got_a, want_a, atol=1e-9)
    want_b = np.zeros(mb)
    for h in (0, 1):
        pick = r[h].argmax(0)
        ok = r[h].max(0) > 0
        want_b[ok] += r[1 - h][pick[ok], np.flatnonzero(ok)] / 2
    np.testing.assert_allclose(got_b, want_b, atol=1e-9)
