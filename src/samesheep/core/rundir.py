"""Every path of the run directory, one function each: the one place that knows its layout.

```
<run>/config.toml                          the resolved config (record_config)
<run>/timings.json                         each stage's seconds (`samesheep run`)
<run>/corpus/                              train.jsonl, heldout.jsonl, manifest.json
<run>/<model>/layer_sample/                every layer on the held-out sample (layers stage)
<run>/<model>/layer_<L>/acts/              activation shards + token tables + manifest.json
<run>/<model>/layer_<L>/acts-<unit>/       one vector per text (unit "text-last"/"text-mean")
<run>/<model>/layer_<L>/<sae>/             cfg.json, sae_weights.safetensors, metrics.json,
                                           sparsity.safetensors (SAELens layout)
<run>/<model>/layer_<L>/train[-<sae>]/     checkpoint and state.json of the SAE's training
<run>/<model>/layer_<L>/codes/<sae>/       the SAE's sparse codes of the layer's store
<run>/<model>/layer_<L>/features/          feature_table.parquet, exemplars.parquet,
                                           centroids.safetensors, summary.json
<run>/compare/<A>__<B>/[layer_<a>__layer_<b>/]  summary.json, partners, pairs, families
<run>/compare/<A>__<B>/layers/             the layer-by-layer comparison
<run>/causal/<A>__<B>/[layer_<a>__layer_<b>/]   summary.json, pairs, profiles (causal check)
<run>/interpret/                           explanations and scores
<run>/report/index.html                    the static site
```
<model> is safe_name(source); <sae> is "sae" for the main SAE, "sae-seed<N>[-<arch>]" for a
ceiling; an untrained copy is the model "random:<source>", folder "random-<model>".
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import Config, check_unit, to_toml
from .constants import RANDOM_PREFIX
from .errors import SamesheepError
from .files import remove_dead_temporaries, write_text

MAIN_SAE = "sae"
"""The folder of a model's main SAE (the one the features stage describes)."""


def run_path(cfg: Config) -> Path:
    """The run directory."""
    return Path(cfg.run_dir).expanduser()


def safe_name(source: str) -> str:
    """A folder name for a model source: "google/gemma-3-270m-it" -> "google--gemma-3-270m-it"."""
    if source.startswith(RANDOM_PREFIX):
        return "random-" + safe_name(source[len(RANDOM_PREFIX) :])
    if source.endswith(".gguf") or Path(source).expanduser().is_dir():
        source = Path(source).stem if source.endswith(".gguf") else Path(source).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", source.replace("/", "--")).strip("-") or "model"


def corpus_dir(run: Path) -> Path:
    """The sampled documents and their manifest."""
    return run / "corpus"


def corpus_manifest(run: Path) -> Path:
    return corpus_dir(run) / "manifest.json"


def model_dir(run: Path, source: str) -> Path:
    """Everything of one model (its layer sample, then a folder per layer)."""
    return run / safe_name(source)


def layer_name(layer: int) -> str:
    return f"layer_{layer}"


def layer_dir(run: Path, source: str, layer: int) -> Path:
    """Everything of one model's layer: its activations, SAEs, codes and features."""
    return model_dir(run, source) / layer_name(layer)


def acts_dir(layer_folder: Path) -> Path:
    """A layer's activation store."""
    return layer_folder / "acts"


def sae_dir(layer_folder: Path, sae_name: str) -> Path:
    """An SAE of the layer, in SAELens' layout."""
    return layer_folder / sae_name


def train_dir(layer_folder: Path, sae_name: str) -> Path:
    """Where an SAE's checkpoint and state live ("train" for the main SAE)."""
    return layer_folder / ("train" if sae_name == MAIN_SAE else f"train-{sae_name}")


def codes_dir(layer_folder: Path, sae_name: str) -> Path:
    """Where an SAE's sparse codes of its layer's store are kept (features, compare)."""
    return layer_folder / "codes" / sae_name


def features_dir(layer_folder: Path) -> Path:
    """The main SAE's features: the feature table, exemplars, centroids, summary."""
    return layer_folder / "features"


def pair_folder(cfg: Config, a: str, b: str) -> Path:
    """The folder of a pair of models (its layer-by-layer comparison sits here)."""
    return run_path(cfg) / "compare" / f"{safe_name(a)}__{safe_name(b)}"


def compare_folder(cfg: Config, a: str, b: str, layer_a: int, layer_b: int) -> Path:
    """Where the comparison of two models' layers is written."""
    out = pair_folder(cfg, a, b)
    return out / f"{layer_name(layer_a)}__{layer_name(layer_b)}" if len(cfg.layers) > 1 else out


def causal_folder(cfg: Config, a: str, b: str, layer_a: int, layer_b: int) -> Path:
    """Where the causal check of two models' matched pairs is written."""
    out = run_path(cfg) / "causal" / f"{safe_name(a)}__{safe_name(b)}"
    return out / f"{layer_name(layer_a)}__{layer_name(layer_b)}" if len(cfg.layers) > 1 else out


def interpret_dir(run: Path) -> Path:
    return run / "interpret"


def report_dir(run: Path) -> Path:
    return run / "report"


def timings_file(run: Path) -> Path:
    return run / "timings.json"


def prepare_run_dir(cfg: Config) -> Path:
    """Check the settings every stage needs and create the run directory (failing clearly
    where it cannot be written)."""
    run = run_path(cfg)
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
    check_unit(cfg.unit)
    remove_dead_temporaries(run)  # what a killed run left part-written
    return run


def record_config(cfg: Config) -> None:
    """Write the resolved config into the run directory once a stage has succeeded (a
    failed command must not leave a config that disagrees with the files)."""
    text = to_toml(cfg)
    recorded = run_path(cfg) / "config.toml"
    if not recorded.is_file() or recorded.read_text(encoding="utf-8") != text:
        write_text(recorded, text)
