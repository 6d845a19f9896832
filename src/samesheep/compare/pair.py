"""The compare stage for one pair of models: the trained pair, its floor, nulls and
ceilings measured on the same units, the headline numbers with their intervals, the
partner, pair and family tables, matching by meaning, per-topic agreement and geometry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.config import CompareConfig
from ..core.constants import SUMMARY
from ..core.errors import SamesheepError
from ..core.files import read_json
from ..core.progress import step
from ..data.alignment import TokenRows, Units, align, same_tokens, unit_texts
from ..data.store import Store
from ..layers.geometry import rsa_test, svcca_test
from ..sae.model import SparseCodes
from .correlation import HALVES, unit_codes
from .matching import assignment, families
from .measurement import (
    DIRECTIONS,
    Measurement,
    Settings,
    across_documents,
    by_decile,
    candidate_r,
    crossfit_best,
    curve,
    document_groups,
    dropped_best,
    headline,
    histogram,
    jackknife,
    measure,
    mutual_count,
    share_curve,
    shifted_within_documents,
)

HEADLINE_R = 0.5
"""The threshold of the printed answer and of the per-decile and per-topic tables."""


@dataclass
class Side:
    """One SAE and the codes it gives on every kept token of its layer's store."""

    model: str  # model source
    layer: int
    sae_name: str
    rows: TokenRows
    codes: SparseCodes
    d_sae: int
    decoder: np.ndarray | None = None  # [d_sae, d_model] raw-space decoder rows
    features: pa.Table | None = None  # the feature table, where the features stage ran
    centroids: np.ndarray | None = None  # [d_sae, dim]
    store: Store | None = None  # the layer's activations (the probes read the hidden states)


@dataclass
class PairInputs:
    """Everything one comparison reads."""

    a: Side
    b: Side
    floor: tuple[Side, Side] | None  # the random-weights copies
    ceiling: tuple[Side, Side] | None  # each model's second-seed SAE
    texts: list[str]  # every document, train then held-out
    n_train_docs: int


@dataclass
class Comparison:
    """One comparison as the compare stage wrote it: the summary and the three tables."""

    folder: Path
    summary: dict[str, Any]
    partners: pa.Table
    pairs: pa.Table
    families: pa.Table

    @classmethod
    def load(cls, folder: str | Path) -> Comparison:
        """Read a compare/<A>__<B> folder (a clear error where it is incomplete)."""
        folder = Path(folder)
        summary = read_json(folder / SUMMARY, corrupt_is_missing=True)
        if not summary:
            raise SamesheepError(f"no comparison in {folder}: run `samesheep compare` first")
        tables = {n: pq.read_table(folder / f"{n}.parquet") for n in TABLES}
        return cls(folder, summary, **tables)


TABLES = ("partners", "pairs", "families")


def settings_of(cfg: CompareConfig) -> Settings:
    return Settings(
        min_fires=cfg.min_fires,
        thresholds=tuple(cfg.thresholds),
        partners=cfg.partners,
        groups=cfg.groups,
        residual=cfg.residual,
    )


def common_units(inp: PairInputs, cfg: CompareConfig) -> Units:
    """The aligned units of the trained pair that every side also keeps (the random copies
    have their own outlier limits): raw, floor, nulls and ceilings then share their units."""
    lengths = np.array([len(t) for t in inp.texts], dtype=np.int64)
    units = align(inp.a.rows, inp.b.rows, lengths, cfg.after_break)
    if inp.floor is not None:
        fa, fb = inp.floor
        for side, floor in ((inp.a, fa), (inp.b, fb)):
            if not same_tokens(side.rows, floor.rows):
                raise SamesheepError(
                    f"the stores of {side.model} and {floor.model} hold different tokens: "
                    "extract both again with the same settings"
                )
        keep = (fa.rows.gid[units.row_a] >= 0) & (fb.rows.gid[units.row_b] >= 0)
        coverage = units.coverage
        units = units.take(np.flatnonzero(keep))
        units.coverage = {
            **coverage,
            "units": len(units),
            "left_out_by_the_floor": int((~keep).sum()),
        }
    return units


def _side_matrix(side: Side, units: Units, which: str, how: str) -> Any:
    """[units, latents] CSR: the side's codes on the units (model `which` of the pair)."""
    first, last = getattr(units, f"first_{which}"), getattr(units, f"row_{which}")
    return unit_codes(side.codes, side.rows.gid, first, last, side.d_sae, how)


def run_pair(inp: PairInputs, cfg: CompareConfig) -> dict[str, Any]:
    """Every measurement of one pair of SAEs; returns the units, the measurements, the
    settings, both sides' unit matrices and the jackknife groups (see measure_pair)."""
    units = common_units(inp, cfg)
    if len(units) < 2 * cfg.min_fires:
        raise SamesheepError(f"only {len(units)} aligned units: too few to compare the models")
    how = cfg.unit_value
    mats = {"a": _side_matrix(inp.a, units, "a", how), "b": _side_matrix(inp.b, units, "b", how)}
    if inp.floor is not None:
        mats["fa"] = _side_matrix(inp.floor[0], units, "a", how)
        mats["fb"] = _side_matrix(inp.floor[1], units, "b", how)
    if inp.ceiling is not None:
        mats["ca"] = _side_matrix(inp.ceiling[0], units, "a", how)
        mats["cb"] = _side_matrix(inp.ceiling[1], units, "b", how)
    label = f"compare {inp.a.model} / {inp.b.model}"
    return measure_pair(mats, units, (inp.texts, inp.n_train_docs), cfg, label)


def measure_pair(
    mats: dict[str, Any],
    units: Units,
    corpus: tuple[list[str], int],
    cfg: CompareConfig,
    label: str,
) -> dict[str, Any]:
    """Every measurement of one pair of dictionaries, from their codes on the units: `mats`
    {"a", "b"; with the floor "fa", "fb"; with the ceiling "ca", "cb"} [units, latents]
    (CSR, or dense arrays: see correlation.Codes); `corpus`: every document's text and the
    number of training documents.

    Each direction holds its source latents fixed and changes only the target: A's latents
    against B's dictionary (the number), against that of B's untrained copy (the floor) and
    against A's second seed (the ceiling). The two untrained copies' dictionaries matched to
    each other are kept as a diagnostic, and each against its own untrained copy gives, with
    the floor, every latent's surface score."""
    s = settings_of(cfg)
    texts, n_train_docs = corpus
    text, _ = unit_texts(units, texts)
    groups = document_groups(units, cfg.groups, cfg.seed)
    a, b = mats["a"], mats["b"]
    runs: dict[str, Measurement] = {}

    def run(name: str, what: str, x: Any, y: Any, grp: Any, full: bool) -> None:
        """Measure x against y; `full` adds the view beyond the unit's text (where there is
        text) and the cross-fitting halves."""
        with step(f"{label}: {what}"):
            runs[name] = measure(x, y, text if full else None, grp, s, full)

    # One unit per document (per-text runs): no unit has another in its document to be
    # shifted onto, and no two units share a text, so the within-document null and the
    # view beyond the unit's text do not exist; the across-document null remains.
    single = len(np.unique(units.doc)) == len(units)
    if len(np.unique(text)) == len(text):
        text = None
    run("raw", f"the trained pair on {len(units):,} units", a, b, groups, True)
    if "fa" in mats:
        fa, fb = mats["fa"], mats["fb"]
        run("floor_a", "A's latents against B's untrained copy (floor)", a, fb, groups, True)
        run("floor_b", "B's latents against A's untrained copy (floor)", b, fa, groups, True)
        run("surface_a", "A's latents against its own untrained copy", a, fa, groups, False)
        run("surface_b", "B's latents against its own untrained copy", b, fb, groups, False)
        run("untrained_pair", "the two untrained copies (diagnostic)", fa, fb, groups, False)
    if "ca" in mats:
        ca, cb = mats["ca"], mats["cb"]
        run("ceiling_a", "the seed ceiling of A", a, ca, groups, True)
        run("ceiling_b", "the seed ceiling of B", b, cb, groups, True)
    if cfg.null and not single:
        perm = shifted_within_documents(units, cfg.seed)
        run("null", "the within-document null", a, b[perm], groups, False)
    if cfg.null:
        if single:
            ra, rb = other_document(units, cfg.seed)
        else:
            ra, rb = across_documents(units, seed=cfg.seed)
        if len(ra) >= 2 * cfg.min_fires:
            run("across", "the across-document null", a[ra], b[rb], groups[ra], False)
    heldout = np.flatnonzero(units.doc >= n_train_docs)
    if len(heldout) >= 2 * cfg.min_fires:
        run("heldout", "the held-out check", a[heldout], b[heldout], groups[heldout], False)
    return {"units": units, "runs": runs, "settings": s, "a": a, "b": b, "groups": groups}


def other_document(units: Units, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of a, rows of b) pairing each unit with a unit of another document, at random
    (one cycle through a shuffled order, so no unit keeps its own): the across-document
    null where every document is one unit."""
    order = np.random.default_rng(seed).permutation(len(units))
    rb = np.empty(len(units), dtype=np.int64)
    rb[order] = np.roll(order, -1)
    return np.arange(len(units)), rb


# ---------------------------------------------------------------- the numbers


ROLES = ("raw", "floor", "ceiling", "untrained_pair", "null", "across", "heldout")
"""Every number of a direction: the trained pair (raw), the fixed-source floor and ceiling,
the two untrained copies matched to each other (a diagnostic), the nulls, held-out units."""

SCALE = ("raw", "floor", "ceiling")
"""The three numbers of one population, on which the normalised score is read."""

SURFACE_R = 0.5
"""A latent whose best r against either untrained copy's latents reaches this is a surface
latent: what an untrained network with one of the two tokenizers already carries."""

MIN_CROSSFIT_DOCUMENTS = 40
"""Documents a comparison needs before its headline is the cross-fitted one (each half
then holds at least 20); with fewer, the in-sample number is shown, and said so."""


def direction_of(role: str, direction: str) -> tuple[str, str]:
    """(measurement, its direction) that gives a direction's number for a role. The source
    is held fixed: a -> b's floor is a against b's untrained copy (floor_a), its ceiling a
    against its second seed (ceiling_a); b -> a's are floor_b and ceiling_b, each read from
    its first side."""
    if role in ("floor", "ceiling"):
        return (f"{role}_a", "a_to_b") if direction == "a_to_b" else (f"{role}_b", "a_to_b")
    return role, direction


def best_of(m: Measurement, view: str, direction: str) -> tuple[np.ndarray, np.ndarray]:
    p = m.partners[view]
    return (p.a_val[:, 0], m.fires_a) if direction == "a_to_b" else (p.b_val[:, 0], m.fires_b)


def crossfit_of(m: Measurement, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """(cross-fitted best r [latents], fires) of one direction of a measurement."""
    best_a, best_b, _, _ = crossfit_best(m)
    return (best_a, m.fires_a) if direction == "a_to_b" else (best_b, m.fires_b)


def surface_scores(runs: dict[str, Measurement]) -> dict[str, dict[str, np.ndarray]] | None:
    """Per side ("a", "b"): each latent's best r against the latents of both untrained SAEs
    (`r`), that partner (`partner`) and whose untrained copy holds it (`copy`: "a" or "b")."""
    if not {"surface_a", "surface_b", "floor_a", "floor_b"} <= runs.keys():
        return None
    out = {}
    for side, other in (("a", "b"), ("b", "a")):
        own = runs[f"surface_{side}"].partners["raw"]  # against its own untrained copy
        far = runs[f"floor_{side}"].partners["raw"]  # against the other's untrained copy
        use_own = own.a_val[:, 0] >= far.a_val[:, 0]
        out[side] = {
            "r": np.where(use_own, own.a_val[:, 0], far.a_val[:, 0]),
            "partner": np.where(use_own, own.a_idx[:, 0], far.a_idx[:, 0]),
            "copy": np.where(use_own, side, other),
        }
    return out


def headline_table(runs: dict[str, Measurement], s: Settings, n_docs: int) -> dict[str, Any]:
    """For each view and direction: every role's numbers (ROLES), the normalised score
    (raw - floor) / (ceiling - floor), curves, histograms and deciles; in the raw view also
    the delete-one-group jackknife intervals, the cross-fitted numbers, the split into
    surface latents and the rest, and `answer`: the numbers the headline shows (cross-fitted
    where the run has MIN_CROSSFIT_DOCUMENTS documents, else in-sample)."""
    surface = surface_scores(runs)
    out: dict[str, Any] = {}
    for view in runs["raw"].partners:
        if view in HALVES:
            continue
        out[view] = {}
        for direction in DIRECTIONS:
            entry: dict[str, Any] = {}
            curves, histograms, deciles = {}, {}, {}
            for role in ROLES:
                name, d = direction_of(role, direction)
                m = runs.get(name)
                if m is None or view not in m.partners:
                    continue
                best, fires = best_of(m, view, d)
                entry[role] = headline(best, fires, s)
                curves[role] = curve(best, fires, s)
                histograms[role] = histogram(best, fires, s)
                if role in SCALE:
                    deciles[role] = by_decile(best, fires, s, HEADLINE_R)
            entry["curve"] = curves["raw"]
            entry["curves"] = curves
            entry["histograms"] = histograms
            entry["deciles"] = deciles["raw"]
            entry["deciles_by_role"] = deciles
            entry["normalised"] = normalised(entry)
            if view == "raw":
                scale = Scale(runs, s, direction)
                in_sample = scale.numbers(crossfit=False)
                entry["intervals"] = in_sample["intervals"]
                entry["normalised_curve"] = in_sample.get("normalised_curve", [])
                if scale.can_crossfit:
                    entry["crossfit"] = scale.numbers(crossfit=True)
                shown = scale.can_crossfit and n_docs >= MIN_CROSSFIT_DOCUMENTS
                entry["answer"] = entry["crossfit"] if shown else in_sample
                if surface is not None:
                    src = surface["a" if direction == "a_to_b" else "b"]["r"]
                    entry["split"] = {
                        "threshold": SURFACE_R,
                        "surface": scale.numbers(shown, src >= SURFACE_R),
                        "rest": scale.numbers(shown, src < SURFACE_R),
                    }
                entry["by_share_of_documents"] = share_curve(runs["raw"], s, direction, HEADLINE_R)
            else:
                entry["answer"] = {
                    "mode": "in_sample",
                    **{k: entry[k] for k in SCALE if k in entry},
                    "normalised": entry["normalised"],
                    "intervals": {},
                }
            out[view][direction] = entry
        out[view]["mutual_pairs"] = {
            f"r{t:g}": mutual_count(runs["raw"], view, t, s) for t in s.thresholds
        }
        out[view]["mutual_pairs_by_role"] = {
            name: {f"r{t:g}": mutual_count(m, view, t, s) for t in s.thresholds}
            for name, m in runs.items()
            if view in m.partners
        }
    return out


CURVE_GRID = np.round(np.linspace(0, 1, 21), 2)
"""The thresholds of r at which the curves and the normalised curve are read."""


class Scale:
    """The trained number of one direction between its fixed-source floor and ceiling, for
    any subset of the source latents, in-sample or cross-fitted, with jackknife intervals
    (each left-out group's best r computed once, kept on the measurement, and reused for
    every subset)."""

    def __init__(self, runs: dict[str, Measurement], s: Settings, direction: str) -> None:
        self.s = s
        self.direction = direction
        self.runs = {}
        for role in SCALE:
            name, d = direction_of(role, direction)
            if name in runs:
                self.runs[role] = (runs[name], d)
        self.can_crossfit = bool(self.runs) and all(
            m.half_of_group is not None for m, _ in self.runs.values()
        )
        self._best: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray]] = {}

    def best(self, role: str, crossfit: bool) -> tuple[np.ndarray, np.ndarray]:
        if (role, crossfit) not in self._best:
            m, d = self.runs[role]
            self._best[role, crossfit] = crossfit_of(m, d) if crossfit else best_of(m, "raw", d)
        return self._best[role, crossfit]

    def dropped(self, role: str, crossfit: bool) -> list[np.ndarray]:
        m, d = self.runs[role]
        return dropped_best(m, d, crossfit)

    def numbers(self, crossfit: bool, latents: np.ndarray | None = None) -> dict[str, Any]:
        """Each role's numbers over the source latents `latents` (boolean; None: all), the
        normalised score, their intervals, curves and the normalised curve with its
        interval at every threshold of the curve."""
        keep = slice(None) if latents is None else latents
        out: dict[str, Any] = {"mode": "crossfit" if crossfit else "in_sample"}
        loo: dict[str, list[np.ndarray]] = {}
        fires = None
        for role in self.runs:
            best, fires = self.best(role, crossfit)
            out[role] = headline(best[keep], fires[keep], self.s)
            out.setdefault("curves", {})[role] = curve(best[keep], fires[keep], self.s)
            loo[role] = [x[keep] for x in self.dropped(role, crossfit)]
        if fires is None:
            return out
        fires = fires[keep]
        out["normalised"] = normalised(out)
        dropped = {r: [headline(x, fires, self.s) for x in loo[r]] for r in self.runs}
        out["intervals"] = {}
        for key in out["raw"]:
            if key == "judged":
                continue
            row = {}
            for role in self.runs:
                lo, hi, _ = jackknife(out[role][key], [h[key] for h in dropped[role]])
                row[role] = _within(key, lo, hi)
            if set(SCALE) <= self.runs.keys():
                groups = zip(*(dropped[r] for r in SCALE), strict=True)
                lo, hi, _ = jackknife(out["normalised"][key], [_norm(*g, key) for g in groups])
                row["normalised"] = [lo, hi]
            out["intervals"][key] = row
        if set(SCALE) <= self.runs.keys():
            bests = [self.best(r, crossfit)[0][keep] for r in SCALE]
            left_out = [loo[r] for r in SCALE]
            out["normalised_curve"] = normalised_curve(bests, left_out, fires, self.s)
        return out


def _within(key: str, lo: float, hi: float) -> list[float]:
    """A share's or a mean r's interval cut to the values it can take (a jackknife interval
    is symmetric, so a share near 0 would reach below it)."""
    bound = (0.0, 1.0) if key.startswith("share_") else (-1.0, 1.0)
    return [max(lo, bound[0]), min(hi, bound[1])] if math.isfinite(lo) else [lo, hi]


def _shares(best: np.ndarray, fires: np.ndarray, s: Settings) -> np.ndarray:
    """[grid] share of the judged latents with best r >= each threshold of CURVE_GRID."""
    b = np.where(np.isfinite(best), best, 0.0)[fires >= s.min_fires]
    if not len(b):
        return np.full(len(CURVE_GRID), math.nan)
    return (b[None, :] >= CURVE_GRID[:, None]).mean(1)


def normalised_curve(
    best: list[np.ndarray], loo: list[list[np.ndarray]], fires: np.ndarray, s: Settings
) -> list[list[float]]:
    """[[r, normalised share at r, low, high]] over CURVE_GRID, from the (raw, floor,
    ceiling) best r and their left-out-group values (nan where the floor is not below the
    ceiling)."""

    def norm(shares: list[np.ndarray]) -> np.ndarray:
        raw, floor, ceiling = shares
        span = ceiling - floor
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(span > 0, (raw - floor) / span, np.nan)

    value = norm([_shares(b, fires, s) for b in best])
    drops = np.array([norm([_shares(x, fires, s) for x in g]) for g in zip(*loo, strict=True)])
    out = []
    for t, v, col in zip(CURVE_GRID, value, drops.T, strict=True):
        lo, hi, _ = jackknife(float(v), col)
        out.append([float(t), float(v), lo, hi])
    return out


def normalised(entry: dict[str, Any]) -> dict[str, float]:
    """(raw - floor) / (ceiling - floor) of every number that has all three; nan where the
    floor is not below the ceiling (then no scale runs from one to the other)."""
    if not set(SCALE) <= entry.keys():
        return {}
    return {
        key: _norm(entry["raw"], entry["floor"], entry["ceiling"], key)
        for key in entry["raw"]
        if key != "judged"
    }


def _norm(raw: dict, floor: dict, ceiling: dict, key: str) -> float:
    span = ceiling[key] - floor[key]
    return (raw[key] - floor[key]) / span if span > 0 else math.nan


# ---------------------------------------------------------------- tables


def partners_table(inp: PairInputs, runs: dict[str, Measurement], s: Settings) -> pa.Table:
    """Per latent of A and of B: best partner and r (raw, residual, token views), the
    runner-up, mutual or not, firing counts and decile, too rare to judge, and the partner by
    meaning (nearest embedding centroid) for comparison."""
    raw = runs["raw"]
    cols: dict[str, list] = {}
    meaning = meaning_partners(inp)
    surface = surface_scores(runs)
    crossfit = crossfit_best(raw) if raw.half_of_group is not None else None
    for side in ("a", "b"):
        p = raw.partners["raw"]
        if side == "a":
            best_i, best_v, other_best = p.a_idx, p.a_val, p.b_idx[:, 0]
            fires = raw.fires_a
        else:
            best_i, best_v, other_best = p.b_idx, p.b_val, p.a_idx[:, 0]
            fires = raw.fires_b
        n = len(fires)
        mutual = other_best[best_i[:, 0]] == np.arange(n)
        decile = np.zeros(n, dtype=np.int32)
        judged = np.flatnonzero(fires >= s.min_fires)
        order = judged[np.argsort(fires[judged], kind="stable")]
        for d, part in enumerate(np.array_split(order, 10)):
            decile[part] = d + 1
        values = {
            "side": [side] * n,
            "model": [(inp.a if side == "a" else inp.b).model] * n,
            "latent": np.arange(n, dtype=np.int32),
            "fires": fires,
            "too_rare": fires < s.min_fires,
            "frequency_decile": decile,
            "partner": best_i[:, 0].astype(np.int32),
            "r": best_v[:, 0],
            "runner_up": best_i[:, 1].astype(np.int32),
            "r_runner_up": best_v[:, 1],
            "mutual": mutual,
        }
        if crossfit is not None:
            values["crossfit_r"] = crossfit[0 if side == "a" else 1]
            values["crossfit_partner"] = crossfit[2 if side == "a" else 3].astype(np.int32)
        for role in ("floor", "ceiling"):
            name, _ = direction_of(role, "a_to_b" if side == "a" else "b_to_a")
            if name in runs:  # the source side is the measurement's first
                q = runs[name].partners["raw"]
                values[f"{role}_partner"] = q.a_idx[:, 0].astype(np.int32)
                values[f"{role}_r"] = q.a_val[:, 0]
        if surface is not None:
            sc = surface[side]
            values["surface_r"] = sc["r"]
            values["surface_partner"] = sc["partner"].astype(np.int32)
            copies = {"a": inp.floor[0].model, "b": inp.floor[1].model} if inp.floor else {}
            values["surface_model"] = [copies.get(c, "") for c in sc["copy"].tolist()]
            values["surface"] = sc["r"] >= SURFACE_R
        for view in ("residual", "token"):
            if view in raw.partners:
                q = raw.partners[view]
                idx, val = (q.a_idx, q.a_val) if side == "a" else (q.b_idx, q.b_val)
                values[f"partner_{view}"] = idx[:, 0].astype(np.int32)
                values[f"r_{view}"] = val[:, 0]
        if meaning is not None:
            nearest, cosine = meaning[side]
            values["partner_by_meaning"] = nearest.astype(np.int32)
            values["meaning_cosine"] = cosine.astype(np.float32)
            values["meaning_agrees"] = nearest == best_i[:, 0]
        for k, v in values.items():
            cols.setdefault(k, []).append(v)
    return pa.table({k: _cat(v) for k, v in cols.items()})


def _cat(parts: list) -> Any:
    if isinstance(parts[0], list):
        return [x for p in parts for x in p]
    return np.concatenate(parts)


def meaning_partners(inp: PairInputs) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Each latent's nearest latent of the other model by embedding centroid (cosine)."""
    if inp.a.centroids is None or inp.b.centroids is None:
        return None
    ca, cb = inp.a.centroids, inp.b.centroids
    out = {}
    for side, x, y in (("a", ca, cb), ("b", cb, ca)):
        nearest = np.zeros(len(x), dtype=np.int64)
        cosine = np.zeros(len(x))
        for lo in range(0, len(x), 2048):
            sim = x[lo : lo + 2048] @ y.T
            nearest[lo : lo + 2048] = sim.argmax(1)
            cosine[lo : lo + 2048] = sim.max(1)
        empty = np.linalg.norm(x, axis=1) == 0  # dead latents have no centroid
        nearest[empty], cosine[empty] = -1, np.nan
        out[side] = (nearest, cosine)
    return out


def pairs_table(runs: dict[str, Measurement], inp: PairInputs) -> tuple[pa.Table, np.ndarray]:
    """The one-to-one pairing that maximises the summed correlation (the Hungarian problem
    over the candidate pairs), each pair with its r and whether it is mutual."""
    raw = runs["raw"]
    r = candidate_r(raw)
    pairs = assignment(raw.cand_i, raw.cand_j, r, raw.m_a, raw.m_b)
    lookup = dict(
        zip(zip(raw.cand_i.tolist(), raw.cand_j.tolist(), strict=True), r.tolist(), strict=True)
    )
    pr = np.array([lookup[(i, j)] for i, j in pairs.tolist()]) if len(pairs) else np.zeros(0)
    p = raw.partners["raw"]
    mutual = (p.a_idx[pairs[:, 0], 0] == pairs[:, 1]) & (p.b_idx[pairs[:, 1], 0] == pairs[:, 0])
    columns = {
        "model_a": [inp.a.model] * len(pairs),
        "latent_a": pairs[:, 0].astype(np.int32),
        "model_b": [inp.b.model] * len(pairs),
        "latent_b": pairs[:, 1].astype(np.int32),
        "r": pr,
        "mutual": mutual,
        "fires_a": raw.fires_a[pairs[:, 0]],
        "fires_b": raw.fires_b[pairs[:, 1]],
    }
    surface = surface_scores(runs)
    if surface is not None:
        columns["surface_r_a"] = surface["a"]["r"][pairs[:, 0]]
        columns["surface_r_b"] = surface["b"]["r"][pairs[:, 1]]
        # a pair beyond the surface: neither latent is matched by an untrained copy's
        columns["beyond_surface"] = (columns["surface_r_a"] < SURFACE_R) & (
            columns["surface_r_b"] < SURFACE_R
        )
    return pa.table(columns), pr


def families_table(runs: dict[str, Measurement], inp: PairInputs) -> pa.Table:
    """One latent (the head) whose activity is split over several of the other model: two
    or more of them pick it as their best partner with r >= FAMILY_R."""
    p = runs["raw"].partners["raw"]
    rows: dict[str, list] = {
        k: [] for k in ("head_side", "head_model", "head", "members", "member_r")
    }
    for head_side, best_of_other, r_of_other, model in (
        ("a", p.b_idx[:, 0], p.b_val[:, 0], inp.a.model),
        ("b", p.a_idx[:, 0], p.a_val[:, 0], inp.b.model),
    ):
        for head, members in families(best_of_other, r_of_other).items():
            rows["head_side"].append(head_side)
            rows["head_model"].append(model)
            rows["head"].append(head)
            rows["members"].append(members.astype(np.int32))
            rows["member_r"].append(r_of_other[members])
    return pa.table(
        {
            "head_side": pa.array(rows["head_side"], pa.string()),
            "head_model": pa.array(rows["head_model"], pa.string()),
            "head": pa.array(rows["head"], pa.int32()),
            "members": pa.array(rows["members"], pa.list_(pa.int32())),
            "member_r": pa.array(rows["member_r"], pa.list_(pa.float64())),
        }
    )


def by_topic(inp: PairInputs, runs: dict[str, Measurement], s: Settings) -> dict[str, Any]:
    """Per corpus topic (each latent's topic in the feature table): judged latents and the
    share with a partner of r >= HEADLINE_R, both directions."""
    out: dict[str, Any] = {}
    for side, direction in ((inp.a, "a_to_b"), (inp.b, "b_to_a")):
        if side.features is None or "topic" not in side.features.column_names:
            continue
        topic = np.array(side.features.column("topic").to_pylist(), dtype=object)
        best, fires = best_of(runs["raw"], "raw", direction)
        judged = fires >= s.min_fires
        rows = {}
        for t in sorted({x for x in topic if x}):
            mine = judged & (topic == t)
            if mine.any():
                rows[t] = {
                    "judged": int(mine.sum()),
                    f"share_r{HEADLINE_R:g}": float((best[mine] >= HEADLINE_R).mean()),
                }
        out[direction] = rows
    return out


def geometry(inp: PairInputs, pairs: pa.Table, pr: np.ndarray, cfg: CompareConfig) -> dict:
    """SVCCA (kept dimensions swept) and RSA of the matched pairs' decoder rows, against
    random pairings, for the pairs with r >= HEADLINE_R."""
    if inp.a.decoder is None or inp.b.decoder is None:
        return {}
    good = pr >= HEADLINE_R
    ia = pairs.column("latent_a").to_numpy()[good]
    ib = pairs.column("latent_b").to_numpy()[good]
    if len(ia) < 20:
        return {"pairs": len(ia), "note": "fewer than 20 matched pairs with r >= 0.5"}
    x, y = inp.a.decoder[ia], inp.b.decoder[ib]
    out: dict[str, Any] = {"pairs": len(ia)}
    for keep in (0.5, 0.9, 0.99):
        out[f"svcca_{keep:g}"] = svcca_test(x, y, keep, cfg.geometry_pairings, cfg.seed)
    out["rsa"] = rsa_test(x, y, cfg.geometry_pairings, cfg.seed)
    return out


def meaning_agreement(inp: PairInputs, runs: dict[str, Measurement], s: Settings) -> dict:
    """How often the partner by meaning (nearest centroid) is the partner by activation."""
    meaning = meaning_partners(inp)
    if meaning is None:
        return {}
    p = runs["raw"].partners["raw"]
    out = {}
    for side, direction, idx, fires in (
        ("a", "a_to_b", p.a_idx, runs["raw"].fires_a),
        ("b", "b_to_a", p.b_idx, runs["raw"].fires_b),
    ):
        nearest, _ = meaning[side]
        judged = (fires >= s.min_fires) & (nearest >= 0)
        out[direction] = {
            "judged": int(judged.sum()),
            "same_partner": float((nearest[judged] == idx[judged, 0]).mean())
            if judged.any()
            else math.nan,
            "in_top_partners": float((idx[judged] == nearest[judged, None]).any(1).mean())
            if judged.any()
            else math.nan,
        }
    return out


def too_rare(runs: dict[str, Measurement], s: Settings) -> dict[str, Any]:
    raw = runs["raw"]
    out = {}
    for side, fires in (("a", raw.fires_a), ("b", raw.fires_b)):
        rare = np.flatnonzero((fires > 0) & (fires < s.min_fires))
        out[side] = {
            "count": len(rare),
            "dead": int((fires == 0).sum()),
            "latents": rare.tolist(),
        }
    return out


MODES = {"crossfit": "cross-fitted", "in_sample": "in-sample"}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"


def _range(ci: list[float] | None, percent: bool = True) -> str:
    if not ci or not all(math.isfinite(v) for v in ci):
        return "no interval"
    lo, hi = ci
    return f"95% CI {_pct(lo)}-{_pct(hi)}" if percent else f"95% CI {lo:.2f} to {hi:.2f}"


def normalised_phrase(numbers: dict[str, Any], key: str) -> str:
    """'0.43 (95% CI 0.38 to 0.48)', or which number makes the score undefined."""
    if not set(SCALE) <= numbers.keys():
        return "undefined: the run has no floor or no ceiling"
    value = numbers["normalised"].get(key, math.nan)
    if math.isfinite(value):
        ci = numbers.get("intervals", {}).get(key, {}).get("normalised")
        return f"{value:.2f} ({_range(ci, percent=False)})"
    return (
        f"undefined: its floor ({_pct(numbers['floor'][key])}) is not below its ceiling "
        f"({_pct(numbers['ceiling'][key])})"
    )


def answer(a: str, b: str, numbers: dict[str, Any]) -> str:
    """The printed answer: first the normalised score of each direction with its interval,
    then per direction the trained share between its fixed-source floor and ceiling, the
    surface/rest split, the view beyond the unit's text, and the diagnostics."""
    key = f"share_r{HEADLINE_R:g}"
    names = {"a_to_b": (a, b), "b_to_a": (b, a)}
    first = numbers["raw"]["a_to_b"]["answer"]
    lines = [
        f"Normalised agreement at r >= {HEADLINE_R:g} ({MODES[first['mode']]}; 0 = the "
        "fixed-source floor, 1 = the seed ceiling): "
        + "; ".join(
            f"{x} -> {y} {normalised_phrase(numbers['raw'][d]['answer'], key)}"
            for d, (x, y) in names.items()
        )
    ]
    for direction, (x, y) in names.items():
        e = numbers["raw"][direction]
        ans = e["answer"]
        ci = ans.get("intervals", {}).get(key, {})
        line = (
            f"{x} -> {y}: {_pct(ans['raw'][key])} of {x}'s {ans['raw']['judged']:,} judged "
            f"latents have a {y} partner with r >= {HEADLINE_R:g} ({_range(ci.get('raw'))})"
        )
        if "floor" in ans:
            line += f"; floor {_pct(ans['floor'][key])} ({x} against {y}'s untrained copy)"
        if "ceiling" in ans:
            line += f"; ceiling {_pct(ans['ceiling'][key])} ({x}'s second seed)"
        if ans["mode"] == "crossfit":
            line += "; in-sample " + " / ".join(_pct(e[r][key]) for r in SCALE if r in e)
        lines.append(line)
        if ans.get("normalised"):
            lines.append(
                "  normalised at every threshold: "
                + "; ".join(
                    f"r >= {k.removeprefix('share_r')} {normalised_phrase(ans, k)}"
                    for k in ans["normalised"]
                    if k.startswith("share_r") and not k.endswith("_weighted")
                )
            )
        split = e.get("split")
        if split:
            parts = []
            for part, label in (("surface", "surface latents"), ("rest", "the rest")):
                p = split[part]
                if "raw" not in p or not p["raw"]["judged"]:
                    parts.append(f"{label}: none")
                    continue
                parts.append(
                    f"{label} ({p['raw']['judged']:,}): "
                    + ", ".join(f"{r} {_pct(p[r][key])}" for r in SCALE if r in p)
                    + f", normalised {normalised_phrase(p, key)}"
                )
            lines.append(
                f"  best r against an untrained copy >= {split['threshold']:g}: " + "; ".join(parts)
            )
        res = numbers.get("residual", {}).get(direction)
        if res:
            lines.append(
                "  beyond the unit's text (residuals, in-sample): "
                + ", ".join(f"{r} {_pct(res[r][key])}" for r in SCALE if r in res)
                + (f", normalised {normalised_phrase(res, key)}" if "floor" in res else "")
            )
        diag = []
        for role, label in (("null", "within-document null"), ("across", "across documents")):
            if role in e:
                diag.append(f"{label} {_pct(e[role][key])}")
        if "untrained_pair" in e:
            diag.append(
                f"two untrained networks' dictionaries {_pct(e['untrained_pair'][key])} "
                "(surface text alone makes dictionaries this alike; a diagnostic, not the floor)"
            )
        if diag:
            lines.append("  " + "; ".join(diag))
    return "\n".join(lines)


def verdict(a: str, b: str, numbers: dict[str, Any]) -> list[str]:
    """Whether each direction's headline lies above its fixed-source floor and below its
    ceiling, said plainly either way."""
    key = f"share_r{HEADLINE_R:g}"
    out = []
    for direction, (x, y) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
        e = numbers["raw"][direction]["answer"]
        if not set(SCALE) <= e.keys():
            continue
        raw, floor, ceiling = e["raw"][key], e["floor"][key], e["ceiling"][key]
        where = f"{x} -> {y}: {_pct(raw)}"
        if floor >= ceiling:
            out.append(
                f"{where}; its floor ({_pct(floor)}, {x}'s latents against {y}'s untrained "
                f"copy) is not below its seed ceiling ({_pct(ceiling)}): an untrained {y} "
                f"supplies as many of {x}'s latents as a second seed of {x} does, so the "
                "share cannot be read on that scale"
                + ("; the trained pair lies at or below its floor." if raw <= floor else ".")
            )
        elif floor < raw < ceiling:
            out.append(f"{where} lies above its floor and below its seed ceiling.")
        elif raw <= floor:
            out.append(f"{where} does NOT lie above its floor ({_pct(floor)}).")
        else:
            out.append(f"{where} does NOT lie below its seed ceiling ({_pct(ceiling)}).")
    return out
