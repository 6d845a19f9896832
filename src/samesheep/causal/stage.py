"""The causal stage (`samesheep causal`, not part of `samesheep run`): for a sample of each
comparison's mutual pairs, the effect of removing (or amplifying) each latent on the text
that follows, in both models, and whether the two effects agree beyond a floor."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from ..core.cache import load_done, mark_done, unmark
from ..core.config import Config, settings_hash
from ..core.constants import SPLITS, SUMMARY
from ..core.device import choose_device, choose_dtype, dtype_name, set_threads
from ..core.errors import SamesheepError
from ..core.files import atomic_path, read_json
from ..core.plan import ceiling_name, compare_pairs
from ..core.progress import say
from ..core.rundir import (
    MAIN_SAE,
    causal_folder,
    compare_folder,
    corpus_dir,
    corpus_manifest,
    layer_dir,
    prepare_run_dir,
    record_config,
    run_path,
    sae_dir,
)
from ..data.alignment import align
from ..data.corpus import CorpusReader
from ..lm.extraction import pad_id
from ..lm.models import load_model, model_depth, resolve_layer
from ..lm.stage import check_layers
from ..sae.saelens import load_sae
from ..sae.stage import layer_store
from ..sae.training import token_filter
from .check import (
    AGREES,
    KINDS,
    CausalCheck,
    CheckSettings,
    median_interval,
    pairs_table,
    profiles_table,
    run_check,
    threshold_of,
)
from .effects import HeldoutTokens, ModelRun, next_units, stored_states
from .sampling import sample_pairs

CAUSAL_VERSION = 2
"""Bump when the causal stage changes what it writes for the same inputs."""
NOT_IN_KEY = ("threads", "device", "batch_tokens")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class _Pair:
    """One comparison the stage checks: its models, layers, and folders."""

    a: str
    b: str
    layer_a: int
    layer_b: int
    compare: Path
    out: Path


def _pairs(cfg: Config) -> list[_Pair]:
    out = []
    for spec in cfg.layers:
        for a, b in compare_pairs(cfg):
            la = resolve_layer(spec, model_depth(a, cfg.trust_remote_code))
            lb = resolve_layer(spec, model_depth(b, cfg.trust_remote_code))
            out.append(
                _Pair(
                    a,
                    b,
                    la,
                    lb,
                    compare_folder(cfg, a, b, la, lb),
                    causal_folder(cfg, a, b, la, lb),
                )
            )
    return out


def causal_stage(cfg: Config) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    """The causal check of every comparison of the run (skipped where unchanged). Returns
    {(A, B, layer of A, layer of B): summary}."""
    run = prepare_run_dir(cfg)
    check_layers(cfg)
    if not read_json(corpus_manifest(run)):
        raise SamesheepError(f"no corpus in {corpus_dir(run)}: run `samesheep run` first")
    pairs = _pairs(cfg)
    if not pairs:
        say("causal: the run has one model, nothing to compare")
        return {}
    for p in pairs:  # every comparison checked before any work
        if not isinstance(read_json(p.compare / SUMMARY, corrupt_is_missing=True), dict):
            raise SamesheepError(
                f"no comparison of {p.a} and {p.b} in {p.compare}: run `samesheep compare` first"
            )
    device = choose_device(cfg.causal.device)
    dtype = choose_dtype(cfg.causal.dtype, device)
    set_threads(cfg.causal.threads)
    settings = {k: v for k, v in dataclasses.asdict(cfg.causal).items() if k not in NOT_IN_KEY}
    results = {}
    for p in pairs:
        compared = read_json(p.compare / SUMMARY)
        key = settings_hash(CAUSAL_VERSION, compared.get("key"), settings, dtype_name(dtype))
        old = load_done(p.out / SUMMARY, key)
        if old:
            say(f"causal {p.a} / {p.b}: unchanged, skipped")
            say(old.get("answer", ""))
        else:
            old = _causal_pair(cfg, p, key, (device, dtype))
        results[(p.a, p.b, p.layer_a, p.layer_b)] = old
    record_config(cfg)
    return results


def _model_run(cfg: Config, source: str, layer: int, where: tuple[Any, Any]) -> ModelRun:
    """One model's side: its held-out tokens, its main SAE (and second seed where the
    comparison has one), the model, and its layer's clean states on the held-out windows."""
    device, dtype = where
    store = layer_store(cfg, source, layer)
    if store.num_tokens(SPLITS[1]) == 0:
        raise SamesheepError(
            f"no held-out text in {store.folder}: set corpus.heldout_tokens above 0 and rerun"
        )
    tokens = HeldoutTokens.of(store, token_filter(store, cfg.train))
    folder = layer_dir(run_path(cfg), source, layer)
    saes = {MAIN_SAE: load_sae(sae_dir(folder, MAIN_SAE), device=device, d_in=store.d_model)}
    seed = sae_dir(folder, ceiling_name(cfg))
    if cfg.compare.ceiling and seed.is_dir():
        saes[ceiling_name(cfg)] = load_sae(seed, device=device, d_in=store.d_model)
    lm = load_model(source, dtype, device, cfg.trust_remote_code)
    scale = cfg.causal.steer if cfg.causal.steer else -1.0
    run = ModelRun(lm, layer, saes, tokens, cfg.causal.batch_tokens, scale)
    acts = torch.cat([shard.acts for shard in store.shards(SPLITS[1])])
    stored_states(run, acts, pad_id(lm.tokenizer))
    return run


def _distribution(values: np.ndarray, seed: int) -> dict[str, Any]:
    """n, median with its 95% bootstrap interval over the pairs, mean and quantiles."""
    v = values[~np.isnan(values)]
    if not len(v):
        return {"n": 0, "median": None, "interval": None, "quantiles": {}}
    qs = np.quantile(v, QUANTILES)
    lo, hi = median_interval(v, seed)
    return {
        "n": len(v),
        "median": float(np.median(v)),
        "interval": None if np.isnan(lo) else [lo, hi],
        "mean": float(v.mean()),
        "quantiles": {f"{q:g}": float(x) for q, x in zip(QUANTILES, qs, strict=True)},
    }


def _per_pair(agreement: np.ndarray, kinds: np.ndarray, comps: list[Any], kind: str) -> Any:
    """[pairs] each pair's agreement of one kind (nan where it has none), by pair."""
    n = max((c.pair for c in comps), default=-1) + 1
    out = np.full(n, np.nan)
    for c, a in zip(comps, agreement.tolist(), strict=True):
        if c.kind == kind:
            out[c.pair] = a
    return out


def _answer(a: str, b: str, summary: dict[str, Any]) -> str:
    d = summary["distributions"]

    def med(kind: str) -> str:
        m, ci = d[kind]["median"], d[kind].get("interval")
        if m is None:
            return "none"
        return f"{m:.2f}" + (f" (95% CI {ci[0]:.2f} to {ci[1]:.2f})" if ci else "")

    mode = "ablation" if summary["settings"]["steer"] == 0 else "steering"
    share = summary["labels"].get(AGREES, 0.0)
    threshold = summary["threshold"]
    where = "none" if threshold is None else f"{threshold:.2f}"
    return (
        f"Causal agreement of {summary['pairs']} mutual pairs of {a} and {b} ({mode}, "
        f"held-out text): median {med('agreement')} against a floor of {med('floor')} "
        f"and a ceiling of {med('ceiling')} (intervals: bootstrap over the pairs); "
        f"{share:.0%} agree in activation and in effect "
        f"(above the floor's {summary['settings']['agree_quantile']:.0%} quantile, {where})."
    )


def _causal_pair(cfg: Config, p: _Pair, key: str, where: tuple[Any, Any]) -> dict[str, Any]:
    """Run one comparison's causal check and write its folder; summary.json, last, marks it
    done."""
    start = time.perf_counter()
    unmark(p.out / SUMMARY)
    try:
        pairs = pq.read_table(p.compare / "pairs.parquet")
        partners = pq.read_table(p.compare / "partners.parquet")
    except OSError as e:
        raise SamesheepError(f"cannot read the comparison in {p.compare}: {e}") from None
    c = cfg.causal
    rng = np.random.default_rng(c.seed)
    sample = sample_pairs(pairs, partners, c.pairs, rng)
    if not len(sample):
        raise SamesheepError(f"the comparison in {p.compare} has no mutual pairs to check")
    reader = CorpusReader(corpus_dir(run_path(cfg)))
    lengths = np.array([len(d.text) for d in reader.documents(SPLITS[1])], dtype=np.int64)
    runs = (_model_run(cfg, p.a, p.layer_a, where), _model_run(cfg, p.b, p.layer_b, where))
    units = align(runs[0].tokens.rows, runs[1].tokens.rows, lengths, cfg.compare.after_break)
    ceiling = ceiling_name(cfg) if ceiling_name(cfg) in runs[0].saes else ""
    s = CheckSettings(c.max_docs, c.min_units, c.agree_quantile, MAIN_SAE, ceiling, c.seed)
    check = CausalCheck(runs, units, next_units(units, (runs[0].tokens, runs[1].tokens)), s)
    comps, agreement = run_check(check, sample)
    kinds = np.array([x.kind for x in comps])
    threshold = threshold_of(agreement[kinds == "floor"], c.agree_quantile)
    ranks = np.array([check.rank_agreement(x) for x in comps], dtype=np.float64)
    table = pairs_table(sample, comps, (agreement, ranks), threshold)
    profiles = profiles_table(check, sample, comps, reader.count(SPLITS[0]))
    label = np.array(table.column("label").to_pylist())
    summary = {
        "key": key,
        "model_a": p.a,
        "model_b": p.b,
        "layer_a": p.layer_a,
        "layer_b": p.layer_b,
        "pairs": len(sample),
        "mutual_pairs": int(np.sum(pairs.column("mutual").to_numpy(zero_copy_only=False))),
        "units": len(units),
        "scored_units": int(check.next.valid.sum()),
        "distributions": {k: _distribution(agreement[kinds == k], c.seed) for k in KINDS},
        # the rank agreement: no few units with huge effects carry it
        "agreement_spearman": _distribution(ranks[kinds == "agreement"], c.seed),
        # per pair, its agreement above its own floor: the paired difference
        "above_floor": _distribution(
            _per_pair(agreement, kinds, comps, "agreement")
            - _per_pair(agreement, kinds, comps, "floor"),
            c.seed,
        ),
        "threshold": None if np.isnan(threshold) else threshold,
        "threshold_rule": f"agreement above the floor distribution's {c.agree_quantile:g} quantile",
        "labels": {v: float(np.mean(label == v)) for v in np.unique(label).tolist()},
        "ceiling_sae": ceiling or None,
        "settings": dataclasses.asdict(c),
        "dtype": dtype_name(where[1]),
        "seconds": 0.0,
    }
    summary["answer"] = _answer(p.a, p.b, summary)
    tables = {"pairs.parquet": table, "profiles.parquet": profiles}
    for name, t in tables.items():
        with atomic_path(p.out / name) as tmp:
            pq.write_table(t, tmp, compression="zstd")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary = mark_done(p.out / SUMMARY, summary, [p.out / name for name in tables])
    say(summary["answer"])
    return summary
