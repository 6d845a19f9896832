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

from .alignment import TokenRows, Units, align, same_tokens, unit_texts
from .compare import (
    DIRECTIONS,
    Measurement,
    Settings,
    across_documents,
    by_decile,
    candidate_r,
    curve,
    document_groups,
    headline,
    histogram,
    jackknife,
    leave_one_out,
    measure,
    mutual_count,
    share_curve,
    shifted_within_documents,
)
from .config import CompareConfig
from .correlation import unit_codes
from .errors import SamesheepError
from .geometry import rsa_test, svcca_test
from .matching import assignment, families
from .progress import step
from .sae import SparseCodes

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
        import pyarrow.parquet as pq

        from .files import read_json

        folder = Path(folder)
        summary = read_json(folder / "summary.json", corrupt_is_missing=True)
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
    """Every measurement of one pair; returns the summary, the tables and the measurements."""
    s = settings_of(cfg)
    units = common_units(inp, cfg)
    if len(units) < 2 * cfg.min_fires:
        raise SamesheepError(f"only {len(units)} aligned units: too few to compare the models")
    text, _ = unit_texts(units, inp.texts)
    groups = document_groups(units, cfg.groups, cfg.seed)
    how = cfg.unit_value
    a = _side_matrix(inp.a, units, "a", how)
    b = _side_matrix(inp.b, units, "b", how)
    label = f"compare {inp.a.model} / {inp.b.model}"
    runs: dict[str, Measurement] = {}

    def run(name: str, what: str, *args: Any) -> None:
        with step(f"{label}: {what}"):
            runs[name] = measure(*args, s)

    # One unit per document (per-text runs): no unit has another in its document to be
    # shifted onto, and no two units share a text, so the within-document null and the
    # view beyond the unit's text do not exist; the across-document null remains.
    single = len(np.unique(units.doc)) == len(units)
    if len(np.unique(text)) == len(text):
        text = None
    run("raw", f"the trained pair on {len(units):,} units", a, b, text, groups)
    if inp.floor is not None:
        fa, fb = inp.floor
        fa, fb = _side_matrix(fa, units, "a", how), _side_matrix(fb, units, "b", how)
        run("floor", "the random-weights floor", fa, fb, text, groups)
    if inp.ceiling is not None:
        ca, cb = inp.ceiling
        ca, cb = _side_matrix(ca, units, "a", how), _side_matrix(cb, units, "b", how)
        run("ceiling_a", "the seed ceiling of A", a, ca, text, groups)
        run("ceiling_b", "the seed ceiling of B", b, cb, text, groups)
    if cfg.null and not single:
        perm = shifted_within_documents(units, cfg.seed)
        run("null", "the within-document null", a, b[perm], None, groups)
    if cfg.null:
        if single:
            ra, rb = other_document(units, cfg.seed)
        else:
            ra, rb = across_documents(units, seed=cfg.seed)
        if len(ra) >= 2 * cfg.min_fires:
            run("across", "the across-document null", a[ra], b[rb], None, groups[ra])
    heldout = np.flatnonzero(units.doc >= inp.n_train_docs)
    if len(heldout) >= 2 * cfg.min_fires:
        run("heldout", "the held-out check", a[heldout], b[heldout], None, groups[heldout])
    return {"units": units, "runs": runs, "settings": s, "a": a, "b": b}


def other_document(units: Units, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of a, rows of b) pairing each unit with a unit of another document, at random
    (one cycle through a shuffled order, so no unit keeps its own): the across-document
    null where every document is one unit."""
    order = np.random.default_rng(seed).permutation(len(units))
    rb = np.empty(len(units), dtype=np.int64)
    rb[order] = np.roll(order, -1)
    return np.arange(len(units)), rb


# ---------------------------------------------------------------- the numbers


def direction_of(run: str, direction: str) -> tuple[str, str]:
    """(measurement, its direction) that gives a direction's number for a role: the ceiling
    of a -> b is a's seed pair, read a -> its seed; that of b -> a is b's, read b -> its seed."""
    if run == "ceiling":
        return ("ceiling_a", "a_to_b") if direction == "a_to_b" else ("ceiling_b", "a_to_b")
    return run, direction


def best_of(m: Measurement, view: str, direction: str) -> tuple[np.ndarray, np.ndarray]:
    p = m.partners[view]
    return (p.a_val[:, 0], m.fires_a) if direction == "a_to_b" else (p.b_val[:, 0], m.fires_b)


def headline_table(runs: dict[str, Measurement], s: Settings) -> dict[str, Any]:
    """For each view and direction: raw, floor, null, across, ceiling, held-out check and
    normalised numbers, the interval of the raw and normalised ones (delete-one-group
    jackknife over documents), the curve, deciles and mutual pairs."""
    out: dict[str, Any] = {}
    for view in runs["raw"].partners:
        out[view] = {}
        for direction in DIRECTIONS:
            entry: dict[str, Any] = {}
            curves, histograms, deciles = {}, {}, {}
            for role in ("raw", "floor", "null", "across", "ceiling", "heldout"):
                name, d = direction_of(role, direction)
                m = runs.get(name)
                if m is None or view not in m.partners:
                    continue
                best, fires = best_of(m, view, d)
                entry[role] = headline(best, fires, s)
                curves[role] = curve(best, fires, s)
                histograms[role] = histogram(best, fires, s)
                if role in ("raw", "floor", "ceiling"):
                    deciles[role] = by_decile(best, fires, s, HEADLINE_R)
            entry["curve"] = curves["raw"]
            entry["curves"] = curves
            entry["histograms"] = histograms
            entry["deciles"] = deciles["raw"]
            entry["deciles_by_role"] = deciles
            entry["normalised"] = normalised(entry)
            if view == "raw":
                entry["intervals"] = intervals(runs, s, direction)
                entry["by_share_of_documents"] = share_curve(runs["raw"], s, direction, HEADLINE_R)
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


def normalised(entry: dict[str, Any]) -> dict[str, float]:
    """(raw - floor) / (ceiling - floor) of every number that has all three; nan where the
    floor is not below the ceiling (then no scale runs from one to the other)."""
    if not {"raw", "floor", "ceiling"} <= entry.keys():
        return {}
    return {
        key: _norm(entry["raw"], entry["floor"], entry["ceiling"], key)
        for key in entry["raw"]
        if key != "judged"
    }


def intervals(runs: dict[str, Measurement], s: Settings, direction: str) -> dict[str, Any]:
    """95% delete-one-group jackknife intervals of the raw, floor, ceiling and normalised
    numbers of the raw view (documents dealt into groups: no document is ever repeated)."""
    loo = {}
    for role in ("raw", "floor", "ceiling"):
        name, d = direction_of(role, direction)
        if name in runs:
            loo[role] = leave_one_out(runs[name], s, d)
    est = {}
    for role in loo:
        name, d = direction_of(role, direction)
        best, fires = best_of(runs[name], "raw", d)
        est[role] = headline(best, fires, s)
    out: dict[str, Any] = {}
    for key in est["raw"]:
        if key == "judged":
            continue
        row = {}
        for role in loo:
            lo, hi, _ = jackknife(est[role][key], [x[key] for x in loo[role]])
            row[role] = [lo, hi]
        if {"floor", "ceiling"} <= loo.keys():
            value = _norm(est["raw"], est["floor"], est["ceiling"], key)
            groups = zip(loo["raw"], loo["floor"], loo["ceiling"], strict=True)
            lo, hi, _ = jackknife(value, [_norm(*g, key) for g in groups])
            row["normalised"] = [lo, hi]
        out[key] = row
    return out


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
    table = pa.table({
        "model_a": [inp.a.model] * len(pairs),
        "latent_a": pairs[:, 0].astype(np.int32),
        "model_b": [inp.b.model] * len(pairs),
        "latent_b": pairs[:, 1].astype(np.int32),
        "r": pr,
        "mutual": mutual,
        "fires_a": raw.fires_a[pairs[:, 0]],
        "fires_b": raw.fires_b[pairs[:, 1]],
    })  # fmt: skip
    return table, pr


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
    return pa.table({
        "head_side": pa.array(rows["head_side"], pa.string()),
        "head_model": pa.array(rows["head_model"], pa.string()),
        "head": pa.array(rows["head"], pa.int32()),
        "members": pa.array(rows["members"], pa.list_(pa.int32())),
        "member_r": pa.array(rows["member_r"], pa.list_(pa.float64())),
    })  # fmt: skip


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


def answer(a: str, b: str, numbers: dict[str, Any]) -> str:
    """The printed answer for both directions, from the raw and residual views."""
    lines = []
    key = f"share_r{HEADLINE_R:g}"
    for direction, (x, y) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
        e = numbers["raw"][direction]
        parts = []
        for role, label in (
            ("floor", "random-weights floor"),
            ("null", "within-document null"),
            ("ceiling", "seed ceiling"),
        ):
            if role in e:
                parts.append(f"{label} {100 * e[role][key]:.0f}%")
        norm = e.get("normalised", {}).get(key)
        ci = e.get("intervals", {}).get(key, {})
        if norm is not None and math.isfinite(norm):
            lo, hi = ci.get("normalised", [math.nan, math.nan])
            parts.append(f"normalised {norm:.2f}, 95% CI {lo:.2f}-{hi:.2f}")
        else:
            if norm is not None:
                parts.append("normalised undefined: the floor is not below the ceiling")
            if "raw" in ci:
                lo, hi = ci["raw"]
                parts.append(f"95% CI {100 * lo:.0f}-{100 * hi:.0f}%")
        judged = e["raw"]["judged"]
        line = (
            f"{100 * e['raw'][key]:.0f}% of {x}'s {judged:,} judged latents have a {y} partner "
            f"with r >= {HEADLINE_R:g} (" + "; ".join(parts) + ")"
        )
        res = numbers.get("residual", {}).get(direction)
        if res:
            line += f"; beyond the unit's text (residuals) {100 * res['raw'][key]:.0f}%" + (
                f" (floor {100 * res['floor'][key]:.0f}%, ceiling {100 * res['ceiling'][key]:.0f}%)"
                if "floor" in res and "ceiling" in res
                else ""
            )
        lines.append(line)
    return "\n".join(lines)


def verdict(a: str, b: str, numbers: dict[str, Any]) -> list[str]:
    """Whether each direction's headline lies above its floor and below its ceiling, said
    plainly either way."""
    key = f"share_r{HEADLINE_R:g}"
    out = []
    for direction, (x, y) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
        e = numbers["raw"][direction]
        if not {"floor", "ceiling"} <= e.keys():
            continue
        raw, floor, ceiling = e["raw"][key], e["floor"][key], e["ceiling"][key]
        where = f"{x} -> {y}: {100 * raw:.0f}%"
        if floor >= ceiling:
            out.append(
                f"{where}; its random-weights floor ({100 * floor:.0f}%) is not below its seed "
                f"ceiling ({100 * ceiling:.0f}%): by this measure two untrained models share "
                "more than two seeds of one trained model, so the share cannot be read on that "
                "scale" + ("; the trained pair lies below its floor." if raw <= floor else ".")
            )
        elif floor < raw < ceiling:
            out.append(f"{where} lies above its random-weights floor and below its seed ceiling.")
        elif raw <= floor:
            out.append(f"{where} does NOT lie above its random-weights floor ({100 * floor:.0f}%).")
        else:
            out.append(f"{where} does NOT lie below its seed ceiling ({100 * ceiling:.0f}%).")
    return out
