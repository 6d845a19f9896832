"""samesheep: do different language models learn to represent the same concepts?"""

from __future__ import annotations

from typing import Any

from .config import Config, CorpusConfig, ExtractConfig
from .config import load as load_config
from .errors import SamesheepError
from .models import LoadedModel, capture, load_model, resolve_layer
from .store import Shard, Store, open_store

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
    from .pipeline import extract_stage

    return extract_stage(_config(config, overrides))


def run(config: Config | str | None = None, **overrides: Any) -> dict[str, Any]:
    """Run every stage, as `samesheep run` does."""
    from .pipeline import run as run_all

    return run_all(_config(config, overrides))


def compare_models(config: Config | str | None = None, **overrides: Any) -> dict[tuple, Any]:
    """Compare every pair of models, as `samesheep compare` does; returns a Comparison
    (summary, partners, pairs, families) per (A, B, index of the layer setting). (Not named
    `compare`: that is the module samesheep.compare.)"""
    from .comparison import Comparison
    from .pipeline import compare_folder, compare_stage

    cfg = _config(config, overrides)
    return {
        (a, b, i): Comparison.load(compare_folder(cfg, a, b, s["layer_a"], s["layer_b"]))
        for (a, b, i), s in compare_stage(cfg).items()
    }


def _config(config: Config | str | None, overrides: dict[str, Any]) -> Config:
    import dataclasses

    from .config import from_dict, set_dotted

    base = config if isinstance(config, Config) else load_config(config)
    data = dataclasses.asdict(base)
    for key, value in overrides.items():
        set_dotted(data, key.replace("__", "."), value)
    return from_dict(data)
