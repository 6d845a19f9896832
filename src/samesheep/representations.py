"""Layer by layer, on the raw hidden states (no SAE): every layer of model A against every
layer of model B on the layer samples' aligned held-out units. Each value stands beside its
permutation null (one side's units shuffled inside each document), a threshold above that
null corrected for the number of layer pairs, and the same layer pair of the two models'
random-weights copies (the floor). The best-matching layer of B for each layer of A (and
the reverse) comes with an interval over random halves of the documents.

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

from .alignment import TokenRows, Units, align
from .config import Config, RepresentationsConfig, settings_hash
from .errors import SamesheepError
from .files import atomic_path, read_json, write_json
from .layer_sample import LayerSample
from .models import safe_name
from .progress import say
from .similarity import (
    GRAM_BYTES,
    Groups,
    PackedGrams,
    Prepared,
    cka_matrices,
    gram_bytes,
    group_blocks,
    group_products,
    half_subsets,
    pair_metrics,
    prepare,
    subset_cka,
    subset_self,
    within_group_permutation,
)

LAYERS_VERSION = 1
"""Bump when the layers stage changes what it writes for the same inputs."""
INTERVAL_METRICS = ("cka", "cka_trimmed")
"""Metrics whose best-matching layer gets an interval (linear CKA on any half of the
documents costs a few small products, so hundreds of halves are cheap)."""


@dataclass
class SampleSides:
    """Two models' layer samples and the aligned units they are compared on."""

    a: LayerSample
    b: LayerSample
    units: Units  # row_a, row_b: rows of each sample's token table


def heldout_lengths(cfg: Config, n: int) -> np.ndarray:
    """Characters of the first n held-out documents (the layer samples' documents)."""
    from .pipeline import document_lengths

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
    after_break: int,
    units: int,
) -> Units:
    """The first `units` aligned units of the two samples (all of them where there are
    fewer), in document order."""
    rows_a = TokenRows.of_tables([(a.tokens, keep_a, 0)])
    rows_b = TokenRows.of_tables([(b.tokens, keep_b, 0)])
    aligned = align(rows_a, rows_b, lengths, after_break)
    return aligned.take(np.arange(min(units, len(aligned))))


def _states(sample: LayerSample, rows: np.ndarray) -> list[np.ndarray]:
    return [sample.states(layer, rows) for layer in range(sample.n_layers)]


def metric_matrices(
    pa_: list[Prepared],
    pb: list[Prepared],
    perms: list[np.ndarray],
    grams: PackedGrams | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({metric: [La, Lb] values}, {metric: [P, La, Lb] values under each permutation}).
    Given the layers' Gram matrices, the CKA metrics of all layer pairs come at once from
    them (cka_matrices); otherwise, and for the others, pair by pair."""
    pairings: list[np.ndarray | None] = [None, *perms]
    shape = (len(pairings), len(pa_), len(pb))
    out: dict[str, np.ndarray] = {}
    if grams is not None:
        for p, cka in enumerate(cka_matrices(pa_, pb, pairings, grams)):
            for name, v in cka.items():
                out.setdefault(name, np.full(shape, np.nan))[p] = v
    for i, x in enumerate(pa_):
        for j, y in enumerate(pb):
            for p, perm in enumerate(pairings):
                for name, v in pair_metrics(x, y, perm, cka=grams is None).items():
                    out.setdefault(name, np.full(shape, np.nan))[p, i, j] = v
    return {k: v[0] for k, v in out.items()}, {k: v[1:] for k, v in out.items()}


def gram_form(pa_: list[Prepared], pb: list[Prepared], permutations: int) -> PackedGrams | None:
    """The layers' Gram matrices where they pay (with permutations to score: making them
    costs about one pairing in feature space) and fit in GRAM_BYTES, else None."""
    if permutations < 1 or gram_bytes(len(pa_[0].x), len(pa_), len(pb)) > GRAM_BYTES:
        return None
    return PackedGrams.of(pa_, pb)


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
    matrix: np.ndarray, subsets_cka: np.ndarray | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Best-matching layer of B for each layer of A ("a_to_b") and of A for each layer of B
    ("b_to_a") in a [La, Lb] matrix; with subsets_cka [S, La, Lb] (the same metric on S
    random halves of the documents) each carries the 95% range of the best layer over the
    halves and the share of halves that agree with the whole sample."""
    out: dict[str, list[dict[str, Any]]] = {}
    for direction, m, sub in (
        ("a_to_b", matrix, subsets_cka),
        ("b_to_a", matrix.T, None if subsets_cka is None else subsets_cka.transpose(0, 2, 1)),
    ):
        rows = []
        filled = np.where(np.isnan(m), -np.inf, m)
        for layer, row in enumerate(filled):
            best = int(row.argmax())
            entry: dict[str, Any] = {"layer": layer, "best": best, "value": float(m[layer, best])}
            if sub is not None:
                picks = np.where(np.isnan(sub[:, layer]), -np.inf, sub[:, layer]).argmax(1)
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
) -> dict[str, np.ndarray]:
    """{metric: [S, La, Lb]} linear CKA ("cka") and CKA without outlier dimensions
    ("cka_trimmed") of every layer pair on each union of document groups. Given the layers'
    Gram matrices, each pairing's group terms come from their blocks (group_blocks);
    otherwise from group products, the trimmed view's being the raw ones with the outlier
    dimensions' rows and columns zeroed."""
    ga = [Groups.of(p.x, groups) for p in pa_]
    gb = [Groups.of(p.x, groups) for p in pb]
    ta = [g.select(p.kept) for g, p in zip(ga, pa_, strict=True)]
    tb = [g.select(p.kept) for g, p in zip(gb, pb, strict=True)]
    blocks = None
    if grams is not None:
        blocks = {"raw": group_blocks(grams, "raw", groups)}
        blocks["trimmed"] = group_blocks(grams, "trimmed", groups)
    selves = {  # each layer's normalisers, once
        id(g): subset_self(g, subsets) for g in [*ga, *gb, *ta, *tb]
    }
    out = {name: np.empty((len(subsets), len(ga), len(gb))) for name in INTERVAL_METRICS}
    for i, (x, xt) in enumerate(zip(ga, ta, strict=True)):
        for j, (y, yt) in enumerate(zip(gb, tb, strict=True)):
            if blocks is not None:
                out["cka"][:, i, j] = subset_cka(
                    x, y, subsets, m=blocks["raw"][i, j], selves=(selves[id(x)], selves[id(y)])
                )
                out["cka_trimmed"][:, i, j] = subset_cka(
                    xt, yt, subsets, m=blocks["trimmed"][i, j],
                    selves=(selves[id(xt)], selves[id(yt)]),
                )  # fmt: skip
                continue
            parts = group_products(x, y)
            out["cka"][:, i, j] = subset_cka(
                x, y, subsets, parts, selves=(selves[id(x)], selves[id(y)])
            )
            parts[:, ~pa_[i].kept] = 0.0  # the outlier dimensions' rows and columns
            parts[:, :, ~pb[j].kept] = 0.0
            out["cka_trimmed"][:, i, j] = subset_cka(
                xt, yt, subsets, parts, selves=(selves[id(xt)], selves[id(yt)])
            )
    return out


def compare_layers(
    xa: list[np.ndarray],
    xb: list[np.ndarray],
    docs: np.ndarray,
    rep: RepresentationsConfig,
    floor: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Every metric for every layer pair of two models' states on the same units (xa[L]:
    [units, d_a] of A's layer L, row i of every layer the same unit; docs: each unit's
    document), with the permutation null, its corrected threshold, the floor (the same on the
    random copies' states, same units), and the best-matching layers with intervals."""
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
    lap("prepare")
    perms = [within_group_permutation(docs, rng) for _ in range(rep.permutations)]
    grams = gram_form(pa_, pb, len(perms))
    values, nulls = metric_matrices(pa_, pb, perms, grams)
    lap("metrics and null")
    groups = document_groups(docs, rep.groups, rng)
    intervals = None
    if groups.max(initial=0) >= 1 and rep.subsets > 0:
        subsets = half_subsets(int(groups.max()) + 1, rep.subsets, rng)
        intervals = subset_matrices(pa_, pb, groups, subsets, grams)
    del grams
    lap("intervals")
    floor_values = None
    if floor is not None:
        fa = [prepare(x, rep.k) for x in floor[0]]
        fb = [prepare(y, rep.k) for y in floor[1]]
        floor_values, _ = metric_matrices(fa, fb, [])
        lap("floor")
    z = bonferroni_z(rep.alpha, len(xa) * len(xb))
    out: dict[str, Any] = {"metrics": {}, "z": z, "seconds": seconds}
    for name, v in values.items():
        mean = nulls[name].mean(0) if perms else np.full_like(v, np.nan)
        sd = nulls[name].std(0, ddof=1) if len(perms) > 1 else np.full_like(v, np.nan)
        out["metrics"][name] = {
            "value": v,
            "null_mean": mean,
            "null_sd": sd,
            "null_max": nulls[name].max(0) if perms else np.full_like(v, np.nan),
            "threshold": mean + z * sd,
            "floor": floor_values[name] if floor_values else np.full_like(v, np.nan),
        }
    out["best"] = {name: best_layers(v, (intervals or {}).get(name)) for name, v in values.items()}
    return out


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
            **{k: m[k].ravel() for k in ("value", "null_mean", "null_sd", "null_max")},
            "threshold": m["threshold"].ravel(),
            "above_null": m["value"].ravel() > m["threshold"].ravel(),
            "floor": m["floor"].ravel(),
        }
        for k, v in parts.items():
            cols.setdefault(k, []).append(v)
    return pa.table({k: np.concatenate(v) for k, v in cols.items()})


def _open_sample(cfg: Config, source: str) -> LayerSample:
    return LayerSample.open(Path(cfg.run_dir).expanduser() / safe_name(source), source)


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
    units = sample_units(
        a, b, keep_a, keep_b, lengths, cfg.compare.after_break, cfg.representations.units
    )
    return SampleSides(a, b, units)


def layers_stage(cfg: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """Compare every layer of every pair of models on the layer samples (skipped when
    unchanged). Returns {(A, B): the contents of layers.json}."""
    from .pipeline import (
        compare_pairs,
        comparing,
        pair_folder,
        prepare_run_dir,
        random_copy,
        record_config,
    )

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
        old = read_json(out / "layers.json", corrupt_is_missing=True)
        if old and old.get("key") == key and (out / "layers.parquet").is_file():
            say(f"layers {a} / {b}: unchanged, skipped")
            results[(a, b)] = old
            continue
        results[(a, b)] = _layers_pair(cfg, _sides(cfg, sa, sb, floor), floor, out, key)
    record_config(cfg)
    return results


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
        "floor": floor is not None,
        "settings": dataclasses.asdict(rep),
        "seconds": {"read": round(read_s, 2), **result["seconds"]},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "layers.json").unlink(missing_ok=True)
    with atomic_path(out / "layers.parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    write_json(out / "layers.json", summary)  # last: marks the pair done
    say(layers_answer(summary, table))
    return summary


def layers_answer(summary: dict[str, Any], table: pa.Table) -> str:
    """A few lines saying which layers correspond, from the trimmed CKA."""
    a, b = safe_name(summary["model_a"]), safe_name(summary["model_b"])
    rows = table.filter(pc.equal(table.column("metric"), "cka_trimmed")).to_pylist()
    above = sum(r["above_null"] for r in rows)
    best = summary["best"]["cka_trimmed"]["a_to_b"]
    last = best[-1]
    cell = next(r for r in rows if r["layer_a"] == last["layer"] and r["layer_b"] == last["best"])
    interval = last.get("interval")
    where = f" (95% range over document halves {interval[0]}-{interval[1]})" if interval else ""
    floor = f", random-weights floor {cell['floor']:.2f}" if np.isfinite(cell["floor"]) else ""
    return (
        f"layers {a} / {b}: {above} of {len(rows)} layer pairs have trimmed CKA above the "
        f"corrected null threshold on {summary['units']:,} held-out units. {a}'s last layer "
        f"{last['layer']} matches {b} layer {last['best']}{where}: CKA {cell['value']:.2f} "
        f"(null {cell['null_mean']:.2f}{floor})"
    )
