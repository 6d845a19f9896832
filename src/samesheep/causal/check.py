"""The causal check of a sample of pairs: each comparison (the pair itself, its floor, its
ceiling) reads two interventions' effect profiles over the units where either latent fires,
and its agreement is their Pearson correlation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.stats import rankdata

from ..core.progress import progress
from ..data.alignment import Units
from .effects import (
    HEAD_BATCH,
    Intervention,
    Job,
    ModelRun,
    NextUnits,
    WindowPass,
    latent_acts,
    pass_effects,
    window_pass,
)
from .sampling import Sample

KINDS = ("agreement", "floor", "ceiling")
"""The comparisons of each pair: i against j (the pair), against a random latent of B of j's
firing frequency (floor), against i's partner in A's second-seed SAE (ceiling)."""
AGREES = "agrees in activation and in effect"
ACTIVATION_ONLY = "in activation only"
TOO_FEW = "too few units"


@dataclass(frozen=True)
class CheckSettings:
    """How the check samples and decides: documents per comparison at most (0: all), the
    fewest units an agreement is read from, the floor quantile a pair must pass to agree,
    the SAE folders of the main and second-seed SAEs (ceiling "": none) and the seed."""

    max_docs: int = 16
    min_units: int = 5
    agree_quantile: float = 0.95
    main: str = "sae"
    ceiling: str = ""
    seed: int = 0


@dataclass
class Comparison:
    """One comparison: pair `pair`, kind of KINDS, two interventions (model 0 = A, 1 = B)."""

    pair: int
    kind: str
    left: tuple[int, Intervention]
    right: tuple[int, Intervention]
    units: np.ndarray | None = None  # the units its profiles run over


def comparisons(sample: Sample, s: CheckSettings) -> list[Comparison]:
    """Every comparison of the sampled pairs, ceilings only where A has a second seed and
    the latent a partner in it."""
    out = []
    for p in range(len(sample)):
        i = (0, Intervention(s.main, int(sample.latent_a[p])))
        out.append(
            Comparison(p, "agreement", i, (1, Intervention(s.main, int(sample.latent_b[p]))))
        )
        out.append(Comparison(p, "floor", i, (1, Intervention(s.main, int(sample.floor_b[p])))))
        if s.ceiling and sample.ceiling_a[p] >= 0:
            c = (0, Intervention(s.ceiling, int(sample.ceiling_a[p])))
            out.append(Comparison(p, "ceiling", i, c))
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r, NaN where either side does not vary."""
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


class CausalCheck:
    """Runs the check of `sample` on both models' held-out text (runs: A's, then B's)."""

    def __init__(
        self, runs: tuple[ModelRun, ModelRun], units: Units, nxt: NextUnits, s: CheckSettings
    ):
        self.runs, self.units, self.next, self.s = runs, units, nxt, s
        self.rows = (units.row_a, units.row_b)
        self.acts: list[dict[str, np.ndarray]] = [{}, {}]  # per model: {SAE: [rows, latents]}
        self.column: list[dict[Intervention, int]] = [{}, {}]  # the latent's column there
        self.effects: dict[tuple[int, Intervention], np.ndarray] = {}

    def read_acts(self, wanted: list[tuple[int, Intervention]]) -> None:
        """Every wanted latent's activation on every held-out row of its model."""
        for m in (0, 1):
            by_sae: dict[str, list[int]] = {}
            for model, what in dict.fromkeys(wanted):
                if model == m:
                    by_sae.setdefault(what.sae, []).append(what.latent)
            latents = {k: np.unique(v) for k, v in by_sae.items()}
            self.acts[m] = latent_acts(self.runs[m], latents)
            for sae, lat in latents.items():
                for col, latent in enumerate(lat.tolist()):
                    self.column[m][Intervention(sae, latent)] = col

    def row_acts(self, side: tuple[int, Intervention]) -> np.ndarray:
        m, what = side
        return self.acts[m][what.sae][:, self.column[m][what]]

    def unit_acts(self, side: tuple[int, Intervention]) -> np.ndarray:
        """The latent's activation on each unit (at the unit's last token in its model)."""
        return self.row_acts(side)[self.rows[side[0]]]

    def choose_units(self, comps: list[Comparison]) -> None:
        """Each comparison's units: scored units where either latent fires, in at most
        max_docs documents (drawn in one random order per pair, so a pair's comparisons
        share documents where they can)."""
        rng = np.random.default_rng(self.s.seed)
        docs = np.unique(self.units.doc)
        order: dict[int, np.ndarray] = {}
        for c in comps:
            if c.pair not in order:
                rank = np.empty(len(docs), dtype=np.int64)
                rank[rng.permutation(len(docs))] = np.arange(len(docs))
                order[c.pair] = rank
            on = self.next.valid & ((self.unit_acts(c.left) > 0) | (self.unit_acts(c.right) > 0))
            u = np.flatnonzero(on)
            if self.s.max_docs and len(u):
                rank = order[c.pair][np.searchsorted(docs, self.units.doc[u])]
                chosen = np.sort(np.unique(rank))[: self.s.max_docs]
                u = u[np.isin(rank, chosen)]
            c.units = u

    def run_effects(self, comps: list[Comparison]) -> None:
        """Every intervention's effect on the units its comparisons need."""
        need: dict[tuple[int, Intervention], list[np.ndarray]] = {}
        for c in comps:
            for side in (c.left, c.right):
                need.setdefault(side, []).append(c.units)
        n = len(self.units)
        for m in (0, 1):
            run = self.runs[m]
            t = run.tokens
            targets, target_unit = self.next.targets[m], self.next.target_unit[m]
            jobs: dict[int, list[Job]] = {}
            for side, parts in need.items():
                if side[0] != m:
                    continue
                self.effects[side] = np.zeros(n, dtype=np.float64)
                acts = self.row_acts(side)
                wanted = np.zeros(n, dtype=bool)
                wanted[np.concatenate(parts)] = True
                rows = targets[wanted[target_unit]]
                windows = t.window[rows]
                for w in np.unique(windows).tolist():
                    lo, hi = int(t.bounds[w]), int(t.bounds[w + 1])
                    if not (acts[lo:hi] > 0).any():
                        continue  # it fires nowhere in the window: it changes nothing there
                    jobs.setdefault(w, []).append(Job(side[1], acts[lo:hi], rows[windows == w]))
            total = sum(len(j) for j in jobs.values())
            unit_of = dict(zip(targets.tolist(), target_unit.tolist(), strict=True))
            with progress() as bar:
                task = bar.add_task(
                    f"causal: {run.lm.source}: interventions in {len(jobs):,} windows",
                    total=total,
                    rate="",
                )
                pending: list[WindowPass] = []
                windows = sorted(jobs.items())
                for i, (w, window_jobs) in enumerate(windows):
                    pending.append(window_pass(run, w, window_jobs))
                    last = i == len(windows) - 1
                    if not last and sum(p.positions for p in pending) < HEAD_BATCH:
                        continue
                    for p, effects in zip(pending, pass_effects(run, pending), strict=True):
                        for job, delta in zip(p.jobs, effects, strict=True):
                            rows = job.targets.tolist()
                            u = np.array([unit_of[r] for r in rows], dtype=np.int64)
                            np.add.at(self.effects[(m, job.what)], u, delta)
                        bar.update(task, advance=len(p.jobs))
                    pending = []

    def agreement(self, c: Comparison) -> float:
        """Pearson r of the two effect profiles over the comparison's units (NaN under
        min_units units)."""
        if c.units is None or len(c.units) < self.s.min_units:
            return float("nan")
        return pearson(self.effects[c.left][c.units], self.effects[c.right][c.units])

    def rank_agreement(self, c: Comparison) -> float:
        """Spearman's rank correlation of the same two profiles: the agreement with no unit
        weighing more than its rank (a few units with huge effects cannot carry it)."""
        if c.units is None or len(c.units) < self.s.min_units:
            return float("nan")
        x, y = self.effects[c.left][c.units], self.effects[c.right][c.units]
        return pearson(rankdata(x), rankdata(y))


def run_check(check: CausalCheck, sample: Sample) -> tuple[list[Comparison], np.ndarray]:
    """(the comparisons, each one's agreement)."""
    comps = comparisons(sample, check.s)
    check.read_acts([side for c in comps for side in (c.left, c.right)])
    check.choose_units(comps)
    check.run_effects(comps)
    return comps, np.array([check.agreement(c) for c in comps], dtype=np.float64)


BOOTSTRAP_DRAWS = 2000
"""Resamples of the pairs behind each median's interval."""


def median_interval(values: np.ndarray, seed: int, level: float = 0.95) -> list[float]:
    """[low, high]: the percentile bootstrap interval of the median over the pairs (nan
    values left out; [nan, nan] with fewer than two)."""
    v = values[~np.isnan(values)]
    if len(v) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    medians = np.median(v[rng.integers(0, len(v), (BOOTSTRAP_DRAWS, len(v)))], axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(medians, [tail, 1 - tail])
    return [float(lo), float(hi)]


def labels(agreement: np.ndarray, threshold: float) -> list[str]:
    """Each pair's label: agrees in effect where its agreement passes the threshold."""
    return [
        TOO_FEW if np.isnan(a) else AGREES if a > threshold else ACTIVATION_ONLY
        for a in agreement.tolist()
    ]


def threshold_of(floor: np.ndarray, quantile: float) -> float:
    """The agreement a pair must pass: the quantile of the floor distribution (NaN where no
    floor agreement could be read)."""
    floor = floor[~np.isnan(floor)]
    return float(np.quantile(floor, quantile)) if len(floor) else float("nan")


def pairs_table(
    sample: Sample,
    comps: list[Comparison],
    agreement: tuple[np.ndarray, np.ndarray],
    threshold: float,
) -> pa.Table:
    """One row per sampled pair: its latents, firing counts, stratum, agreement (Pearson,
    and Spearman beside it; `agreement`: both, per comparison), floor and ceiling latents
    with their agreements, units, and label."""
    agreement, rank_agreement = agreement
    n = len(sample)
    values = {k: np.full(n, np.nan) for k in KINDS}
    units = np.zeros(n, dtype=np.int64)
    for c, a in zip(comps, agreement.tolist(), strict=True):
        values[c.kind][c.pair] = a
        if c.kind == "agreement":
            units[c.pair] = len(c.units) if c.units is not None else 0
    agree = values["agreement"]
    label = labels(agree, threshold) if not np.isnan(threshold) else [TOO_FEW] * n
    ranks = np.full(n, np.nan)
    for c, r in zip(comps, rank_agreement.tolist(), strict=True):
        if c.kind == "agreement":
            ranks[c.pair] = r
    return pa.table(
        {
            "latent_a": sample.latent_a.astype(np.int32),
            "latent_b": sample.latent_b.astype(np.int32),
            "r": sample.r,
            "fires_a": sample.fires_a,
            "fires_b": sample.fires_b,
            "stratum": sample.stratum.astype(np.int32),
            "units": units,
            "agreement": agree,
            "agreement_spearman": ranks,
            "floor_latent": sample.floor_b.astype(np.int32),
            "floor_agreement": values["floor"],
            "ceiling_latent": sample.ceiling_a.astype(np.int32),
            "ceiling_agreement": values["ceiling"],
            "label": label,
        }
    )


def profiles_table(
    check: CausalCheck, sample: Sample, comps: list[Comparison], n_train: int
) -> pa.Table:
    """Per pair and unit where either latent fires (the units its agreement runs over): the
    unit's document (global number) and characters, the next unit's end (the text whose
    log-probability changed), both effects and both activations."""
    u_all = check.units
    cols: dict[str, list[np.ndarray]] = {
        k: []
        for k in (
            "latent_a",
            "latent_b",
            "doc",
            "start",
            "end",
            "next_end",
            "effect_a",
            "effect_b",
            "act_a",
            "act_b",
        )
    }
    for c in comps:
        if c.kind != "agreement" or c.units is None:
            continue
        u = c.units
        cols["latent_a"].append(np.full(len(u), sample.latent_a[c.pair], dtype=np.int32))
        cols["latent_b"].append(np.full(len(u), sample.latent_b[c.pair], dtype=np.int32))
        cols["doc"].append(u_all.doc[u] + n_train)
        cols["start"].append(u_all.start[u])
        cols["end"].append(u_all.end[u])
        cols["next_end"].append(u_all.end[u + 1])
        cols["effect_a"].append(check.effects[c.left][u])
        cols["effect_b"].append(check.effects[c.right][u])
        cols["act_a"].append(check.unit_acts(c.left)[u])
        cols["act_b"].append(check.unit_acts(c.right)[u])
    return pa.table({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()})
