"""Layer by layer, on the raw hidden states (no SAE): every layer of model A against every
layer of model B on the layer samples' aligned held-out units. Each value stands beside its
permutation null (one side's units shuffled inside each document), a threshold above that
null corrected for the number of layer pairs, and its fixed-source floors: A's layer against
the same layer of B's untrained copy (A held fixed, for A -> B), B's layer against A's
untrained copy's (for B -> A), and, as a diagnostic only, the two untrained copies against
each other. CKA also comes input-debiased (Cui et al. 2022): each side's Gram matrix with its
untrained copy's at the same layer regressed out. Which layers correspond is read from the
corrected values (input-debiased, or less the floor), only where they survive the null; the
best-matching layer of B for each layer of A (and the reverse) comes with an interval over
random halves of the documents.

    compare/<A>__<B>/layers.parquet   one row per (layer_a, layer_b, metric)
    compare/<A>__<B>/layers.json      units, best-matching layers, settings, timings
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.cache import load_done, mark_done, unmark
from ..core.config import Config, RepresentationsConfig, settings_hash
from ..core.errors import SamesheepError
from ..core.files import atomic_path
from ..core.plan import compare_pairs, comparing, random_copy
from ..core.progress import say
from ..core.rundir import (
    model_dir,
    pair_folder,
    prepare_run_dir,
    record_config,
    run_path,
    safe_name,
)
from ..data.alignment import TokenRows, Units, align
from ..lm.layer_sample import LayerSample
from ..sae.stage import document_lengths
from .similarity import (
    GRAM_BYTES,
    Groups,
    PackedGrams,
    Prepared,
    cka_from_crosses,
    copy_crosses,
    gram_bytes,
    group_blocks,
    group_m,
    group_products,
    half_subsets,
    input_debiased_blocks,
    input_debiased_matrices,
    pair_metrics,
    pairing_crosses,
    prepare,
    self_crosses,
    subset_crosses,
    subset_self,
    within_group_permutation,
)

LAYERS_VERSION = 2
"""Bump when the layers stage changes what it writes for the same inputs."""
INTERVAL_METRICS = ("cka", "cka_trimmed", "cka_input_debiased", "cka_trimmed_input_debiased")
"""Metrics whose best-matching layer gets an interval (linear CKA on any half of the
documents costs a few small products, so hundreds of halves are cheap)."""
HEADLINE = ("cka_trimmed_input_debiased", "cka_trimmed")
"""The metric that answers which layers correspond, the first there is: CKA without outlier
dimensions, input-debiased (where the untrained copies were extracted), else plain."""
FLOOR_OF = {
    "cka_input_debiased": "cka",
    "cka_standardized_input_debiased": "cka_standardized",
    "cka_trimmed_input_debiased": "cka_trimmed",
}
"""The plain metric whose fixed-source floors stand beside each input-debiased one (which
has none of its own: with B's untrained copy in B's place, nothing is left of B's side)."""


@dataclass
class SampleSides:
    """Two models' layer samples and the aligned units they are compared on."""

    a: LayerSample
    b: LayerSample
    units: Units  # row_a, row_b: rows of each sample's token table


def heldout_lengths(cfg: Config, n: int) -> np.ndarray:
    """Characters of the first n held-out documents (the layer samples' documents)."""
    lengths = document_lengths(cfg)["heldout"]
    if len(lengths) < n:
        raise SamesheepError(
            f"the corpus of {cfg.run_dir} has changed since the layer samples were made: "
            "run `samesheep extract` again"
        )
    return np.asarray(lengths[:n], dtype=np.int64)


def sample_keep(sample: LayerSample, cfg: Config) -> np.ndarray:
    t = cfg.train
    return sample.keep(t.skip_special, t.skip_first, t.max_norm_ratio)


def same_windows(a: LayerSample, b: LayerSample) -> bool:
    """Whether two samples hold the same tokens row for row (a model and its random copy)."""
    cols = ("doc_index", "token_id", "char_start", "char_end")
    return a.tokens.num_rows == b.tokens.num_rows and all(
        a.tokens.column(c).equals(b.tokens.column(c)) for c in cols
    )


def sample_units(
    a: LayerSample,
    b: LayerSample,
    keep_a: np.ndarray,
    keep_b: np.ndarray,
    lengths: np.ndarray,
    cfg: Config,
) -> Units:
    """The first cfg.representations.units aligned units of the two samples (all of them
    where there are fewer), in document order, aligned as the compare stage aligns them
    (cfg.compare.after_break)."""
    rows_a = TokenRows.of_tables([(a.tokens, keep_a, 0)])
    rows_b = TokenRows.of_tables([(b.tokens, keep_b, 0)])
    aligned = align(rows_a, rows_b, lengths, cfg.compare.after_break)
    return aligned.take(np.arange(min(cfg.representations.units, len(aligned))))


def _states(sample: LayerSample, rows: np.ndarray) -> list[np.ndarray]:
    return [sample.states(layer, rows) for layer in range(sample.n_layers)]


def metric_matrices(
    pa_: list[Prepared],
    pb: list[Prepared],
    perms: list[np.ndarray],
    grams: PackedGrams | None = None,
    floor: tuple[list[Prepared], list[Prepared]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """({metric: [La, Lb] values}, {metric: [P, La, Lb] values under each permutation},
    {metric: {"a_to_b", "b_to_a", "random_pair": [La, Lb]}} the CKA metrics' floors). The CKA
    metrics of all layer pairs come at once from each pairing's cross terms (pairing_crosses;
    in Gram form given `grams`, the Grams of A's layers followed by its untrained copy's
    against B's followed by its copy's), and so, where `floor` (the copies' layers, the same
    units) is given, do the input-debiased metrics and the floors; the others pair by pair.
    Under a permutation B's copy moves with B: its units are B's."""
    fa, fb = floor or ([], [])
    left, right = [*pa_, *fa], [*pb, *fb]
    la, lb = len(pa_), len(pb)
    pairings: list[np.ndarray | None] = [None, *perms]
    shape = (len(pairings), la, lb)
    out: dict[str, np.ndarray] = {}
    floors: dict[str, dict[str, np.ndarray]] = {}
    selves = (self_crosses(left), self_crosses(right))
    copies = (copy_crosses(pa_, fa), copy_crosses(pb, fb)) if floor else None
    crosses = pairing_crosses(left, right, pairings, grams)
    for p, (cross, perm) in enumerate(zip(crosses, pairings, strict=True)):
        for name, v in cka_from_crosses(left, right, cross, perm).items():
            out.setdefault(name, np.full(shape, np.nan))[p] = v[:la, :lb]
            if p == 0 and floor:
                floors[name] = {
                    "a_to_b": v[:la, lb:],
                    "b_to_a": v[la:, :lb],
                    "random_pair": v[la:, lb:],
                }
        if copies is not None:
            for name, v in input_debiased_matrices(cross, (la, lb), selves, copies).items():
                out.setdefault(name, np.full(shape, np.nan))[p] = v
    for i, x in enumerate(pa_):
        for j, y in enumerate(pb):
            for p, perm in enumerate(pairings):
                for name, v in pair_metrics(x, y, perm, cka=False).items():
                    out.setdefault(name, np.full(shape, np.nan))[p, i, j] = v
    return {k: v[0] for k, v in out.items()}, {k: v[1:] for k, v in out.items()}, floors


def floor_matrices(
    pa_: list[Prepared], pb: list[Prepared], fa: list[Prepared], fb: list[Prepared]
) -> dict[str, dict[str, np.ndarray]]:
    """{metric: {"a_to_b", "b_to_a": [La, Lb]}} the fixed-source floors of the metrics scored
    pair by pair (neighbours, SVCCA): A's layer i against layer j of B's untrained copy (A
    held fixed), and layer i of A's copy against B's layer j (B held fixed). The two copies
    against each other, a diagnostic, is left to the CKA metrics, which read it from the
    Grams at no cost (here it would cost a third more)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for kind, xs, ys in (("a_to_b", pa_, fb), ("b_to_a", fa, pb)):
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                for name, v in pair_metrics(x, y, cka=False).items():
                    m = out.setdefault(name, {}).setdefault(
                        kind, np.full((len(xs), len(ys)), np.nan)
                    )
                    m[i, j] = v
    return out


def gram_form(
    pa_: list[Prepared], pb: list[Prepared], permutations: int, floor: bool = False
) -> PackedGrams | None:
    """The layers' Gram matrices (pa_, pb: each model's layers, followed by its untrained
    copy's where there is a floor) where they pay (more than one pairing to score: making
    them costs about one pairing in feature space) and fit in GRAM_BYTES, else None."""
    fits = gram_bytes(len(pa_[0].x), len(pa_), len(pb)) <= GRAM_BYTES
    return PackedGrams.of(pa_, pb) if fits and (permutations >= 1 or floor) else None


def bonferroni_z(alpha: float, tests: int) -> float:
    """The one-sided normal quantile a value must pass, in null standard deviations above
    the null mean, for significance alpha over `tests` layer pairs."""
    if not 0 < alpha < 1:
        raise SamesheepError(f"representations.alpha must lie in (0, 1), not {alpha}")
    return NormalDist().inv_cdf(1 - alpha / max(tests, 1))


def document_groups(docs: np.ndarray, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """[units] group number 0..G-1 of each unit: its documents dealt at random into
    G = min(n_groups, documents) groups of nearly equal document counts."""
    unique, inverse = np.unique(docs, return_inverse=True)
    g = min(n_groups, len(unique))
    deal = rng.permutation(len(unique)) % g
    return deal[inverse]


def best_layers(
    matrix: np.ndarray,
    subsets_cka: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    reverse: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Best-matching layer of B for each layer of A ("a_to_b", along the rows of the scores
    matrix [La, Lb]) and of A for each layer of B ("b_to_a", along the columns of reverse's
    scores where given: each direction less its own floor; else of matrix's). With the same
    scores on S random halves of the documents ([S, La, Lb]) each carries the 95% range of
    the best layer over the halves and the share of halves that agree with the whole sample.
    Only cells in mask [La, Lb] (those that survive) may be chosen: a layer with none has
    best None."""
    back, back_sub = reverse if reverse is not None else (matrix, subsets_cka)
    ok = np.ones(matrix.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    out: dict[str, list[dict[str, Any]]] = {}
    for direction, m, sub, allowed in (
        ("a_to_b", matrix, subsets_cka, ok),
        ("b_to_a", back.T, None if back_sub is None else back_sub.transpose(0, 2, 1), ok.T),
    ):
        rows = []
        filled = np.where(np.isnan(m) | ~allowed, -np.inf, m)
        for layer, row in enumerate(filled):
            if not np.isfinite(row).any():
                rows.append({"layer": layer, "best": None, "value": None})
                continue
            best = int(row.argmax())
            entry: dict[str, Any] = {"layer": layer, "best": best, "value": float(m[layer, best])}
            if sub is not None:
                cells = np.where(np.isnan(sub[:, layer]) | ~allowed[layer], -np.inf, sub[:, layer])
                picks = cells.argmax(1)
                entry["interval"] = [
                    int(np.quantile(picks, 0.025, method="lower")),
                    int(np.quantile(picks, 0.975, method="higher")),
                ]
                entry["agree"] = float((picks == best).mean())
            rows.append(entry)
        out[direction] = rows
    return out


def subset_matrices(
    pa_: list[Prepared],
    pb: list[Prepared],
    groups: np.ndarray,
    subsets: np.ndarray,
    grams: PackedGrams | None = None,
    floor: tuple[list[Prepared], list[Prepared]] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (A -> B scores, B -> A scores), each [S, La, Lb]} on each union of document
    groups (subsets [S, G] 0/1 rows), each recentred on its own units: linear CKA ("cka")
    and CKA without outlier dimensions ("cka_trimmed"), each less its fixed-source floor in
    that direction where the untrained copies are given (floor: their layers), and then also
    both input-debiased. Given the Gram matrices of A's (then its copy's) layers against B's
    (then its copy's), each pairing's group terms come from their blocks (group_blocks);
    otherwise from group products, the trimmed view's being the raw ones with the outlier
    dimensions' rows and columns zeroed."""
    fa, fb = floor or ([], [])
    left, right = [*pa_, *fa], [*pb, *fb]
    la, lb = len(pa_), len(pb)
    n_groups = int(np.max(groups)) + 1
    raw = ([Groups.of(p.x, groups) for p in left], [Groups.of(p.x, groups) for p in right])
    trim = tuple(
        [g.select(p.kept) for g, p in zip(gs, ps, strict=True)]
        for gs, ps in zip(raw, (left, right), strict=True)
    )
    views = {"raw": raw, "trimmed": trim}
    if grams is not None:
        ms = {view: group_blocks(grams, view, groups) for view in views}
    else:
        ms = {view: np.empty((len(left), len(right), n_groups, n_groups)) for view in views}
        for i, x in enumerate(raw[0]):
            for j, y in enumerate(raw[1]):
                parts = group_products(x, y)
                ms["raw"][i, j] = group_m(parts)
                parts[:, ~left[i].kept] = 0.0  # the outlier dimensions' rows and columns
                parts[:, :, ~right[j].kept] = 0.0
                ms["trimmed"][i, j] = group_m(parts)
    copies = {}
    if floor is not None:
        copies = {
            "a": _copy_subset_crosses({v: g[0] for v, g in views.items()}, left, la, subsets),
            "b": _copy_subset_crosses({v: g[1] for v, g in views.items()}, right, lb, subsets),
        }
    out = {}
    for (view, (gl, gr)), metric in zip(views.items(), ("cka", "cka_trimmed"), strict=True):
        cross = subset_crosses(gl, gr, subsets, ms[view])  # [S, La (+ La0), Lb (+ Lb0)]
        sl = np.stack([subset_self(g, subsets) for g in gl], axis=1)  # [S, La (+ La0)]
        sr = np.stack([subset_self(g, subsets) for g in gr], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ok = (sl[:, :, None] > 0) & (sr[:, None, :] > 0)
            cka = np.where(ok, cross / np.sqrt(np.abs(sl[:, :, None] * sr[:, None, :])), np.nan)
        value = cka[:, :la, :lb]
        if floor is None:
            out[metric] = (value, value)
            continue
        out[metric] = (value - cka[:, :la, lb:], value - cka[:, la:, :lb])
        debiased = input_debiased_blocks(
            cross, (la, lb), (sl, sr), (copies["a"][view], copies["b"][view])
        )
        debiased_metric = "cka_input_debiased" if view == "raw" else "cka_trimmed_input_debiased"
        out[debiased_metric] = (debiased, debiased)
    return out


def _copy_subset_crosses(
    views: dict[str, list[Groups]], preps: list[Prepared], n: int, subsets: np.ndarray
) -> dict[str, np.ndarray]:
    """{view: [S, L]} ||X_S'X0_S||_F^2 of each of a model's L = n layers with the same layer
    of its untrained copy on each union of groups, in the raw and trimmed views (views: each
    view's groups, preps: the prepared layers, the model's followed by its copy's)."""
    out: dict[str, list[np.ndarray]] = {view: [] for view in views}
    for k in range(n):
        parts = group_products(views["raw"][k], views["raw"][n + k])
        for view, grouped in views.items():
            if view == "trimmed":  # the outlier dimensions' rows and columns
                parts[:, ~preps[k].kept] = 0.0
                parts[:, :, ~preps[n + k].kept] = 0.0
            m = group_m(parts)[None, None]
            out[view].append(subset_crosses([grouped[k]], [grouped[n + k]], subsets, m)[:, 0, 0])
    return {view: np.stack(v, axis=1) for view, v in out.items()}


def compare_layers(
    xa: list[np.ndarray],
    xb: list[np.ndarray],
    docs: np.ndarray,
    rep: RepresentationsConfig,
    floor: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Every metric for every layer pair of two models' states on the same units (xa[L]:
    [units, d_a] of A's layer L, row i of every layer the same unit; docs: each unit's
    document), with the permutation null, its corrected threshold, and where the untrained
    copies' states are given (floor: the same layers on the same units) the fixed-source
    floors, the copies' own pair (a diagnostic) and the input-debiased CKA metrics; each
    cell's corrected value and whether it survives, and the best-matching layers read from
    the corrected values, with intervals."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    rng = np.random.default_rng(rep.seed)
    pa_ = [prepare(x, rep.k) for x in xa]
    pb = [prepare(y, rep.k) for y in xb]
    copies = None
    if floor is not None:
        copies = ([prepare(x, rep.k) for x in floor[0]], [prepare(y, rep.k) for y in floor[1]])
    lap("prepare")
    perms = [within_group_permutation(docs, rng) for _ in range(rep.permutations)]
    fa, fb = copies or ([], [])
    grams = gram_form([*pa_, *fa], [*pb, *fb], len(perms), copies is not None)
    values, nulls, floors = metric_matrices(pa_, pb, perms, grams, copies)
    lap("metrics and null")
    groups = document_groups(docs, rep.groups, rng)
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if groups.max(initial=0) >= 1 and rep.subsets > 0:
        subsets = half_subsets(int(groups.max()) + 1, rep.subsets, rng)
        intervals = subset_matrices(pa_, pb, groups, subsets, grams, copies)
    del grams
    lap("intervals")
    if copies is not None:
        floors |= floor_matrices(pa_, pb, *copies)
        lap("floor")
    z = bonferroni_z(rep.alpha, len(xa) * len(xb))
    out: dict[str, Any] = {"metrics": {}, "z": z, "seconds": seconds, "best": {}}
    for name, v in values.items():
        mean = nulls[name].mean(0) if perms else np.full_like(v, np.nan)
        sd = nulls[name].std(0, ddof=1) if len(perms) > 1 else np.full_like(v, np.nan)
        none = np.full_like(v, np.nan)
        own = floors.get(name, {})
        m = {
            "value": v,
            "null_mean": mean,
            "null_sd": sd,
            "null_max": nulls[name].max(0) if perms else none,
            "threshold": mean + z * sd,
            **{f"floor_{k}": own.get(k, none) for k in ("a_to_b", "b_to_a")},
            "random_pair": own.get("random_pair", none),
        }
        m |= corrected(m)
        out["metrics"][name] = m
        scores = [
            np.where(np.isfinite(f), v - f, v) for f in (m["floor_a_to_b"], m["floor_b_to_a"])
        ]
        halves = intervals.get(name, (None, None))
        out["best"][name] = best_layers(scores[0], halves[0], m["survives"], (scores[1], halves[1]))
    out["headline"] = next((h for h in HEADLINE if h in values), None)
    return out


def corrected(m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A metric's corrected value per cell (less the higher of its two fixed-source floors,
    where it has floors; input-debiased metrics have none and stand as they are) and whether
    it survives: finite, above the corrected null threshold (where there is a null) and
    above both floors (where there are floors)."""
    v = m["value"]
    top = np.fmax(m["floor_a_to_b"], m["floor_b_to_a"])
    with np.errstate(invalid="ignore"):
        beyond_null = np.where(np.isfinite(m["threshold"]), v > m["threshold"], True)
        beyond_floor = np.where(np.isfinite(top), v > top, True)
    return {
        "corrected": np.where(np.isfinite(top), v - top, v),
        "survives": np.isfinite(v) & beyond_null & beyond_floor,
    }


TABLE_COLUMNS = (
    *("value", "null_mean", "null_sd", "null_max", "threshold"),
    *("floor_a_to_b", "floor_b_to_a", "random_pair", "corrected"),
)
"""The per-cell numbers of layers.parquet, besides the layers, depths, metric and verdicts."""


def layers_table(result: dict[str, Any], n_a: int, n_b: int) -> pa.Table:
    """The long table of layers.parquet: one row per layer pair and metric."""
    ia, ib = np.meshgrid(np.arange(n_a), np.arange(n_b), indexing="ij")
    cols: dict[str, list[np.ndarray]] = {}
    for name, m in result["metrics"].items():
        parts = {
            "layer_a": ia.ravel(),
            "layer_b": ib.ravel(),
            "depth_a": (ia.ravel() + 1) / n_a,
            "depth_b": (ib.ravel() + 1) / n_b,
            "metric": np.full(ia.size, name, dtype=object),
            **{k: m[k].ravel() for k in TABLE_COLUMNS},
            "above_null": m["value"].ravel() > m["threshold"].ravel(),
            "survives": m["survives"].ravel(),
        }
        for k, v in parts.items():
            cols.setdefault(k, []).append(v)
    return pa.table({k: np.concatenate(v) for k, v in cols.items()})


def _open_sample(cfg: Config, source: str) -> LayerSample:
    return LayerSample.open(model_dir(run_path(cfg), source), source)


def _sides(
    cfg: Config, a: LayerSample, b: LayerSample, floor: tuple[LayerSample, LayerSample] | None
) -> SampleSides:
    """The units both models (and, where they hold the same tokens, their random copies)
    keep: the floor is measured on the very same units."""
    if a.manifest["documents"] != b.manifest["documents"]:
        raise SamesheepError(
            f"the layer samples of {a.manifest['model']} and {b.manifest['model']} hold "
            "different documents: run `samesheep extract` again"
        )
    keep_a, keep_b = sample_keep(a, cfg), sample_keep(b, cfg)
    if floor is not None:
        for keep, real, rand in ((keep_a, a, floor[0]), (keep_b, b, floor[1])):
            if not same_windows(real, rand):
                raise SamesheepError(
                    f"the layer sample of {rand.manifest['model']} does not hold the same "
                    f"tokens as {real.manifest['model']}'s: run `samesheep extract` again"
                )
            keep &= sample_keep(rand, cfg)
    lengths = heldout_lengths(cfg, int(a.manifest["documents"]))
    units = sample_units(a, b, keep_a, keep_b, lengths, cfg)
    return SampleSides(a, b, units)


def layers_stage(cfg: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """Compare every layer of every pair of models on the layer samples (skipped when
    unchanged). Returns {(A, B): the contents of layers.json}."""
    rep = cfg.representations
    if not rep.enabled:
        say("layers: representations.enabled is false, skipped")
        return {}
    prepare_run_dir(cfg)
    pairs = compare_pairs(cfg)
    if not pairs:
        say("layers: the run has one model, nothing to compare")
        return {}
    with_floor = cfg.compare.floor and comparing(cfg)
    results = {}
    for a, b in pairs:
        sa, sb = _open_sample(cfg, a), _open_sample(cfg, b)
        floor = None
        if with_floor:
            floor = (_open_sample(cfg, random_copy(a)), _open_sample(cfg, random_copy(b)))
        samples = [sa, sb, *(floor or ())]
        token_settings = [cfg.train.skip_special, cfg.train.skip_first, cfg.train.max_norm_ratio]
        key = settings_hash(
            LAYERS_VERSION,
            [s.manifest["key"] for s in samples],
            {k: v for k, v in dataclasses.asdict(rep).items() if k != "beside"},
            token_settings,
            cfg.compare.after_break,
        )
        out = pair_folder(cfg, a, b)
        old = load_done(out / LAYERS_DONE, key)
        if old:
            say(f"layers {a} / {b}: unchanged, skipped")
            results[(a, b)] = old
            continue
        results[(a, b)] = _layers_pair(cfg, _sides(cfg, sa, sb, floor), floor, out, key)
    record_config(cfg)
    return results


LAYERS_DONE = "layers.json"
"""A pair's layer-by-layer summary, written last: the done marker of layers.parquet."""
MIN_UNITS = 20
"""Fewer aligned units than this leave every layer metric meaningless (CKNNA needs more
units than neighbours, the unbiased HSIC at least four)."""


def _layers_pair(
    cfg: Config,
    sides: SampleSides,
    floor: tuple[LayerSample, LayerSample] | None,
    out: Path,
    key: str,
) -> dict[str, Any]:
    rep = cfg.representations
    a, b, units = sides.a.manifest["model"], sides.b.manifest["model"], sides.units
    need = max(MIN_UNITS, rep.k + 2)
    if len(units) < need:
        raise SamesheepError(
            f"the layer samples of {a} and {b} share only {len(units)} aligned held-out "
            f"units, fewer than the {need} the layer metrics need: raise corpus.heldout_tokens"
        )
    if len(units) < rep.units:
        say(
            f"layers {a} / {b}: the held-out documents give {len(units):,} aligned units, "
            f"fewer than representations.units = {rep.units:,}; using them all"
        )
    start = time.perf_counter()
    xa, xb = _states(sides.a, units.row_a), _states(sides.b, units.row_b)
    floor_states = None
    if floor is not None:
        floor_states = (_states(floor[0], units.row_a), _states(floor[1], units.row_b))
    read_s = time.perf_counter() - start
    result = compare_layers(xa, xb, units.doc, rep, floor_states)
    table = layers_table(result, len(xa), len(xb))
    summary = {
        "key": key,
        "model_a": a,
        "model_b": b,
        "layers_a": len(xa),
        "layers_b": len(xb),
        "units": len(units),
        "documents": len(np.unique(units.doc)),
        "z": result["z"],
        "best": result["best"],
        "headline": headline_summary(result),
        "floor": floor is not None,
        "settings": dataclasses.asdict(rep),
        "seconds": {"read": round(read_s, 2), **result["seconds"]},
    }
    out.mkdir(parents=True, exist_ok=True)
    unmark(out / LAYERS_DONE)
    with atomic_path(out / "layers.parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    summary = mark_done(out / LAYERS_DONE, summary, [out / "layers.parquet"])
    say(layers_answer(summary, table))
    return summary


HEADLINE_CELLS = ("value", "null_mean", "threshold", "survives", "corrected")
"""The headline metric's per-cell numbers layers.json repeats (beside its floor metric's
value and fixed-source floors); layers.parquet holds every metric's."""


def _nested(m: np.ndarray) -> list[list[Any]]:
    """[rows][cols] of a matrix for JSON: 4 decimals, None for nan, bools as they are."""
    if m.dtype == bool:
        return m.tolist()
    return [[round(float(v), 4) if np.isfinite(v) else None for v in row] for row in m]


def headline_summary(result: dict[str, Any]) -> dict[str, Any] | None:
    """layers.json's headline: the metric that answers which layers correspond, the plain
    metric whose fixed-source floors stand beside it, how many cells survive, and per cell
    the headline's value, null, threshold, verdict and corrected value, with the floor
    metric's value and both fixed-source floors."""
    name = result.get("headline")
    if name is None:
        return None
    m, plain = result["metrics"][name], result["metrics"][FLOOR_OF.get(name, name)]
    cells = {k: _nested(m[k]) for k in HEADLINE_CELLS}
    cells |= {f"plain_{k}": _nested(plain[k]) for k in ("value", "floor_a_to_b", "floor_b_to_a")}
    return {
        "metric": name,
        "floor_metric": FLOOR_OF.get(name, name),
        "survive": int(m["survives"].sum()),
        "pairs": int(m["survives"].size),
        "cells": cells,
    }


WORDS = {
    "cka_trimmed_input_debiased": "input-debiased trimmed CKA (the untrained copies' "
    "similarity regressed out, Cui et al. 2022)",
    "cka_trimmed": "trimmed CKA",
}
"""How the answer names each headline metric."""


def layers_answer(summary: dict[str, Any], table: pa.Table) -> str:
    """A few lines saying which layers correspond, from the headline metric (input-debiased
    trimmed CKA where the untrained copies were extracted), beside trimmed CKA's
    fixed-source floors."""
    a, b = safe_name(summary["model_a"]), safe_name(summary["model_b"])
    name = (summary.get("headline") or {}).get("metric", "cka_trimmed")
    plain_name = FLOOR_OF.get(name, name)
    rows = table.filter(pc.equal(table.column("metric"), name)).to_pylist()
    plain_rows = table.filter(pc.equal(table.column("metric"), plain_name)).to_pylist()
    verdict = "above the corrected null threshold"
    if summary.get("floor") and name == plain_name:
        verdict += " and both fixed-source floors"
    head = (
        f"layers {a} / {b}: {sum(r['survives'] for r in rows)} of {len(rows)} layer pairs have "
        f"{WORDS.get(name, name)} {verdict} on {summary['units']:,} held-out units."
    )
    last = summary["best"][name]["a_to_b"][-1]
    if last["best"] is None:
        return f"{head} {a}'s last layer {last['layer']}: no layer of {b} survives"

    def at(table_rows: list[dict[str, Any]]) -> dict[str, Any]:
        return next(
            r for r in table_rows if r["layer_a"] == last["layer"] and r["layer_b"] == last["best"]
        )

    cell, plain = at(rows), at(plain_rows)
    interval = last.get("interval")
    where = f" (95% range over document halves {interval[0]}-{interval[1]})" if interval else ""
    text = (
        f"{head} {a}'s last layer {last['layer']} matches {b} layer {last['best']}{where}: "
        f"{'trimmed CKA' if name == plain_name else 'input-debiased trimmed CKA'} "
        f"{cell['value']:.2f} (null {cell['null_mean']:.2f})"
    )
    if np.isfinite(plain["floor_a_to_b"]):
        text += (
            f"; trimmed CKA {plain['value']:.2f} against its fixed-source floors "
            f"{plain['floor_a_to_b']:.2f} ({a}'s layer against untrained {b}'s) and "
            f"{plain['floor_b_to_a']:.2f} ({b}'s against untrained {a}'s)"
        )
    return text
