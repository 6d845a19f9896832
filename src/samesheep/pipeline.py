"""The stages in order, each reading the previous stage's files from the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import config as config_mod
from .config import Config
from .corpus import build_corpus
from .errors import SamesheepError
from .extraction import extract_model
from .files import write_text
from .models import RANDOM_PREFIX, load_tokenizer, model_depth, resolve_layer, safe_name
from .progress import say


def prepare_run_dir(cfg: Config) -> Path:
    """Check the settings every stage needs and create the run directory (failing clearly
    where it cannot be written)."""
    run = Path(cfg.run_dir).expanduser()
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SamesheepError(f"cannot write to run directory {run}: {e.strerror}") from None
    if not all(isinstance(m, str) and m for m in cfg.models):
        raise SamesheepError(f"models must be source strings, got {cfg.models!r}")
    names = [safe_name(m) for m in cfg.models]
    if not cfg.models:
        raise SamesheepError("no models configured (set models = [...])")
    if len(set(names)) != len(names):
        raise SamesheepError(f"two models share a folder name: {names}")
    if not cfg.layers:
        raise SamesheepError("no layers configured (set layers = [...])")
    return run


def record_config(cfg: Config) -> None:
    """Write the resolved config into the run directory once a stage has succeeded (a
    failed command must not leave a config that disagrees with the files)."""
    run = Path(cfg.run_dir).expanduser()
    text = config_mod.to_toml(cfg)
    recorded = run / "config.toml"
    if not recorded.is_file() or recorded.read_text(encoding="utf-8") != text:
        write_text(recorded, text)


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

    return build_corpus(cfg.corpus, run / "corpus", count_tokens, counter)


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
    for source in cfg.models:
        result = extract_model(
            source,
            cfg.layers,
            run / "corpus",
            run / safe_name(source),
            cfg.extract,
            corpus["hash"],
            cfg.trust_remote_code,
        )
        verb = "unchanged, skipped" if result["skipped"] else "extracted"
        toks = result["tokens"]
        say(
            f"{source}: layers {result['layers']} {verb} "
            f"({toks.get('train', 0):,} train + {toks.get('heldout', 0):,} held-out tokens)"
        )
        results[source] = result
    record_config(cfg)
    return results


def run(cfg: Config) -> dict[str, Any]:
    """Run every stage in order."""
    return {"extract": extract_stage(cfg)}
