"""The extract stage: sample the corpus, then every model's activations at every layer
(and its layer sample, where the run compares layers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.constants import RANDOM_PREFIX
from ..core.errors import SamesheepError
from ..core.plan import run_sources, sampling_layers
from ..core.progress import say
from ..core.rundir import corpus_dir, model_dir, prepare_run_dir, record_config
from ..data.corpus import build_corpus
from .extraction import ModelJob, extract_model
from .layer_sample import extract_layer_sample
from .models import load_tokenizer, model_depth, resolve_layer


def _sample_corpus(cfg: Config, run: Path) -> dict[str, Any]:
    """Sample the corpus into run/corpus, counting tokens with the first model's tokenizer
    (loaded only if the corpus must be rebuilt)."""
    counter = cfg.models[0].removeprefix(RANDOM_PREFIX)
    tokenizer = None

    def count_tokens(texts: list[str]) -> list[int]:
        nonlocal tokenizer
        if tokenizer is None:
            tokenizer = load_tokenizer(counter, cfg.trust_remote_code)
        enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [len(ids) for ids in enc]

    return build_corpus(cfg.corpus, corpus_dir(run), count_tokens, counter)


def corpus_stage(cfg: Config) -> dict[str, Any]:
    """Sample the corpus into run_dir/corpus (skipped when unchanged)."""
    manifest = _sample_corpus(cfg, prepare_run_dir(cfg))
    record_config(cfg)
    return manifest


def check_layers(cfg: Config) -> None:
    """Fail before any work where a layer does not exist in a model."""
    for source in cfg.models:
        depth = model_depth(source, cfg.trust_remote_code)
        for spec in cfg.layers:
            try:
                resolve_layer(spec, depth)
            except SamesheepError as e:
                raise SamesheepError(f"{source}: {e}") from None


def extract_stage(cfg: Config) -> dict[str, dict[str, Any]]:
    """Extract activations of every model at every layer (resumes; skipped when unchanged)."""
    run = prepare_run_dir(cfg)
    check_layers(cfg)
    corpus = _sample_corpus(cfg, run)
    results = {}
    for source in run_sources(cfg):
        job = ModelJob(
            source, corpus_dir(run), model_dir(run, source), corpus["hash"], cfg.trust_remote_code
        )
        lm = _layer_sample(cfg, job)
        result = extract_model(job, cfg.layers, cfg.extract, lm=lm)
        verb = "unchanged, skipped" if result["skipped"] else "extracted"
        toks = result["tokens"]
        say(
            f"{source}: layers {result['layers']} {verb} "
            f"({toks.get('train', 0):,} train + {toks.get('heldout', 0):,} held-out tokens)"
        )
        results[source] = result
    record_config(cfg)
    return results


def _layer_sample(cfg: Config, job: ModelJob) -> Any:
    """Make the model's layer sample where the run needs one; returns the model if it had
    to be loaded for it (the extraction then reuses it), else None."""
    if not sampling_layers(cfg):
        return None
    m, lm = extract_layer_sample(job, cfg.extract, cfg.representations.units)
    if m["skipped"]:
        say(f"{job.source}: layer sample unchanged, skipped")
    else:
        size = f"{m['n_layers']} layers on {m['tokens']:,} held-out tokens"
        say(f"{job.source}: layer sample of {size}")
    return lm
