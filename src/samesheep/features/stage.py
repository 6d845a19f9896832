"""The features stage: statistics, exemplars, logit lens and labels of every latent of
every main SAE in the run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.cache import load_done, unmark
from ..core.config import Config, settings_hash
from ..core.constants import SUMMARY
from ..core.device import choose_device, choose_dtype, dtype_name, set_threads
from ..core.errors import SamesheepError
from ..core.files import read_json
from ..core.progress import say
from ..core.rundir import (
    MAIN_SAE,
    codes_dir,
    corpus_dir,
    corpus_manifest,
    features_dir,
    layer_dir,
    prepare_run_dir,
    record_config,
    run_path,
    sae_dir,
)
from ..data.corpus import CorpusReader
from ..data.store import Store
from ..lm.models import load_model, load_tokenizer, model_depth, resolve_layer
from ..lm.stage import check_layers
from ..sae.codes import Encoding
from ..sae.saelens import load_sae, read_sae_config
from ..sae.stage import layer_store, token_settings, trained_key
from ..sae.training import token_filter
from .compute import (
    CodesPlace,
    CorpusInfo,
    FeatureSource,
    compute_features,
    corpus_states,
    write_features,
)
from .embedding import TextEmbedder

FEATURES_VERSION = 2
"""Bump when the features stage changes what it writes for the same inputs."""
NOT_IN_FEATURES_KEY = ("device", "batch_tokens", "threads")


def features_stage(cfg: Config) -> dict[str, dict[int, dict[str, Any]]]:
    """Statistics, exemplars, logit lens and labels of every latent of every SAE in the run
    (skipped when unchanged; a killed run reuses the codes already written)."""
    run = prepare_run_dir(cfg)
    check_layers(cfg)
    corpus = read_json(corpus_manifest(run))
    if not corpus:
        raise SamesheepError(f"no corpus in {corpus_dir(run)}: run `samesheep run` first")
    saes = {}
    for source in cfg.models:  # every SAE checked before any work starts
        depth = model_depth(source, cfg.trust_remote_code)
        for layer in sorted({resolve_layer(spec, depth) for spec in cfg.layers}):
            saes[(source, layer)] = _sae_for(cfg, source, layer)
    info = CorpusInfo.load(CorpusReader(corpus_dir(run)))
    for _, store in saes.values():
        info.check(store)
    device = choose_device(cfg.features.device)
    dtype = choose_dtype(cfg.features.dtype, device)
    settings = {
        k: v for k, v in dataclasses.asdict(cfg.features).items() if k not in NOT_IN_FEATURES_KEY
    }
    ctx = Describing(device, dtype, info)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for (source, layer), (sae_key, store) in saes.items():
        out = features_dir(layer_dir(run, source, layer))
        inputs = (sae_key, store.manifest["key"], token_settings(cfg))
        key = settings_hash(FEATURES_VERSION, *inputs, settings, corpus["hash"], dtype_name(dtype))
        old = load_done(out / SUMMARY, key)
        if old:
            say(f"{source} layer {layer}: features unchanged, skipped")
            results.setdefault(source, {})[layer] = old
            continue
        if cfg.features.embed and ctx.doc_states is None:
            ctx.doc_states = corpus_states(
                corpus_dir(run), corpus["hash"], lambda: TextEmbedder(device, dtype)
            )
        job = FeatureJob(source, layer, store, sae_key, key, out)
        results.setdefault(source, {})[layer] = _features_of(cfg, job, ctx)
    record_config(cfg)
    return results


def _sae_for(cfg: Config, source: str, layer: int) -> tuple[str, Store]:
    """(the key the SAE was made under, its store): the SAE the train stage left for the
    layer, checked to fit its store (from its cfg.json alone, no weights read), or a clear
    error naming the stage to run."""
    sae_key = trained_key(cfg, source, layer)
    sae = sae_dir(layer_dir(run_path(cfg), source, layer), MAIN_SAE)
    store = layer_store(cfg, source, layer)
    d_in = read_sae_config(sae).d_in
    if d_in != store.d_model:
        raise SamesheepError(
            f"SAE at {sae} expects d_in={d_in} but the activations of {source} layer "
            f"{layer} have {store.d_model}: run `samesheep train` again"
        )
    return sae_key, store


def codes_key(cfg: Config, sae_key: str, store: Store, dtype: Any) -> str:
    """What an SAE's codes depend on: the SAE, the store, the tokens used, the encoder dtype."""
    return settings_hash(
        "codes", sae_key, store.manifest["key"], token_settings(cfg), dtype_name(dtype)
    )


@dataclass(frozen=True)
class FeatureJob:
    """One main SAE to describe: its model and layer, its store, the key it was trained
    under, the key of its features and the folder they go to."""

    source: str
    layer: int
    store: Store
    sae_key: str
    key: str
    out: Path


@dataclass
class Describing:
    """What every SAE's description shares: the device and dtype of the encoder and the
    logit lens, the run's corpus, and its documents embedded (None without the embedding
    view)."""

    device: Any
    dtype: Any
    info: CorpusInfo
    doc_states: Any = None


def _features_of(cfg: Config, job: FeatureJob, ctx: Describing) -> dict[str, Any]:
    """Compute and write one SAE's features folder; summary.json, written last, marks it
    complete."""
    set_threads(cfg.features.threads)
    source, layer, store, out = job.source, job.layer, job.store, job.out
    sae = load_sae(sae_dir(out.parent, MAIN_SAE), device=ctx.device, d_in=store.d_model)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    lens_model = None
    if cfg.features.logit_lens:
        lens_model = load_model(source, ctx.dtype, ctx.device, cfg.trust_remote_code).model
    tokens = token_filter(store, cfg.train)
    src = FeatureSource(source, layer, MAIN_SAE, sae, store, tokens, tokenizer, lens_model)
    unmark(out / SUMMARY)  # incomplete until rewritten
    codes_key_ = codes_key(cfg, job.sae_key, store, ctx.dtype)
    codes = CodesPlace(codes_dir(out.parent, MAIN_SAE), codes_key_)
    encoding = Encoding(ctx.device, ctx.dtype)
    table, exemplars, centroids, summary = compute_features(
        src, ctx.info, cfg.features, codes, encoding, ctx.doc_states
    )
    summary = {
        "key": job.key,
        "model": source,
        "layer": layer,
        "settings": dataclasses.asdict(cfg.features),
        "token_filter": src.token_filter.to_dict(),
        **summary,
    }
    write_features(out, table, exemplars, centroids, summary)
    t = summary["timings_s"]
    say(
        f"{source} layer {layer}: features of {summary['latents']:,} latents "
        f"({summary['dead']:,} dead, {summary['dense']:,} dense), "
        f"{sum(summary['exemplars'].values()):,} exemplars, in {sum(t.values()):,.0f} s"
    )
    return summary
