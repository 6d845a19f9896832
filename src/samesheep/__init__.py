"""samesheep: do different language models learn to represent the same concepts?"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import pipeline
from .compare.pair import Comparison
from .core.config import Config, CorpusConfig, ExtractConfig, from_dict, set_dotted
from .core.config import load as load_config
from .core.errors import SamesheepError
from .core.rundir import compare_folder
from .data.store import Shard, Store, open_store
from .lm.models import LoadedModel, capture, load_model, resolve_layer

__all__ = [
    "Config",
    "CorpusConfig",
    "ExtractConfig",
    "LoadedModel",
    "SamesheepError",
    "Shard",
    "Store",
    "capture",
    "compare_models",
    "extract",
    "load_config",
    "load_model",
    "open_store",
    "resolve_layer",
    "run",
]


def extract(config: Config | str | None = None, **overrides: Any) -> dict[str, Any]:
    """Sample the corpus and extract activations, as `samesheep extract` does.

    `config` is a Config, a TOML path or None (defaults); keyword overrides use the
    CLI's dotted names with "__" for the dot, e.g. corpus__max_tokens=10_000."""
    return pipeline.extract_stage(_config(config, overrides))


def run(config: Config | str | None = None, **overrides: Any) -> dict[str, Any]:
    """Run every stage, as `samesheep run` does."""
    return pipeline.run(_config(config, overrides))


def compare_models(config: Config | str | None = None, **overrides: Any) -> dict[tuple, Any]:
    """Compare every pair of models, as `samesheep compare` does; returns a Comparison
    (summary, partners, pairs, families) per (A, B, index of the layer setting). (Not named
    `compare`: that is the package samesheep.compare.)"""
    cfg = _config(config, overrides)
    return {
        (a, b, i): Comparison.load(compare_folder(cfg, a, b, s["layer_a"], s["layer_b"]))
        for (a, b, i), s in pipeline.compare_stage(cfg).items()
    }


def _config(config: Config | str | None, overrides: dict[str, Any]) -> Config:
    base = config if isinstance(config, Config) else load_config(config)
    data = dataclasses.asdict(base)
    for key, value in overrides.items():
        set_dotted(data, key.replace("__", "."), value)
    return from_dict(data)
