"""The stages in order, each reading the previous stage's files from the run directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from safetensors.torch import save_file

from . import config as config_mod
from .config import Config, settings_hash
from .corpus import build_corpus, read_documents
from .device import DTYPES, choose_device, choose_dtype, dtype_name, set_threads
from .errors import SamesheepError
from .evaluate import reconstruction_stats, spliced_metrics
from .extraction import extract_model
from .files import atomic_path, read_json, write_json, write_text
from .models import (
    RANDOM_PREFIX,
    load_model,
    load_tokenizer,
    model_depth,
    resolve_layer,
    safe_name,
)
from .progress import say, step
from .sae import ARCHITECTURES
from .sae_files import load_sae, save_sae
from .store import SPLITS, Store, TokenFilter, open_store
from .train import filter_counts, token_filter, train_sae


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
    from .text_units import check_unit

    check_unit(cfg.unit)
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


@dataclass(frozen=True)
class SaeRun:
    """One SAE the run trains: the model it reads, its folder name, its seed, whether its
    evaluation splices it into the model (the floors' and ceilings' SAEs are not)."""

    source: str
    sae_name: str
    seed: int
    spliced: bool
    architecture: str = ""
    """Its architecture where it is not train.architecture (a ceiling's, by setting)."""

    @property
    def main(self) -> bool:
        return self.sae_name == "sae" and not self.source.startswith(RANDOM_PREFIX)


def comparing(cfg: Config) -> bool:
    """Whether the run compares models (two or more, and SAEs trained here)."""
    return len(cfg.models) >= 2 and not cfg.train.pretrained


def random_copy(source: str) -> str:
    return source if source.startswith(RANDOM_PREFIX) else RANDOM_PREFIX + source


def ceiling_architecture(cfg: Config) -> str:
    """The ceiling SAEs' architecture (compare.ceiling_architecture, or train's), checked."""
    arch = cfg.compare.ceiling_architecture or cfg.train.architecture
    if arch not in ARCHITECTURES:
        raise SamesheepError(
            f"unknown SAE architecture {arch!r} in compare.ceiling_architecture "
            f"(use {', '.join(ARCHITECTURES)})"
        )
    return arch


def ceiling_name(cfg: Config) -> str:
    """The ceiling SAEs' folder: sae-seed<N>, with the architecture where it is another."""
    arch = ceiling_architecture(cfg)
    name = f"sae-seed{cfg.train.seed + 1}"
    return name if arch == cfg.train.architecture else f"{name}-{arch}"


def sae_runs(cfg: Config) -> list[SaeRun]:
    """Every SAE of the run: one per model, and where models are compared, one per model's
    random-weights copy (the floor) and a second seed per model (the ceiling)."""
    seed = cfg.train.seed
    runs = [SaeRun(m, "sae", seed, True) for m in cfg.models]
    if comparing(cfg) and cfg.compare.floor:
        runs += [
            SaeRun(random_copy(m), "sae", seed, False)
            for m in cfg.models
            if random_copy(m) not in cfg.models
        ]
    if comparing(cfg) and cfg.compare.ceiling:
        arch = ceiling_architecture(cfg)
        runs += [SaeRun(m, ceiling_name(cfg), seed + 1, False, arch) for m in cfg.models]
    return runs


def run_sources(cfg: Config) -> list[str]:
    """Every model source the run extracts (the models, and their random copies)."""
    return list(dict.fromkeys(r.source for r in sae_runs(cfg)))


def extract_stage(cfg: Config) -> dict[str, dict[str, Any]]:
    """Extract activations of every model at every layer (resumes; skipped when unchanged)."""
    run = prepare_run_dir(cfg)
    check_layers(cfg)
    corpus = _sample_corpus(cfg, run)
    results = {}
    for source in run_sources(cfg):
        lm = _layer_sample(cfg, source, run, corpus["hash"])
        result = extract_model(
            source,
            cfg.layers,
            run / "corpus",
            run / safe_name(source),
            cfg.extract,
            corpus["hash"],
            cfg.trust_remote_code,
            lm=lm,
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


def sampling_layers(cfg: Config) -> bool:
    """Whether the run compares every layer pair on a held-out sample (two or more models)."""
    return cfg.representations.enabled and len(cfg.models) >= 2


def _layer_sample(cfg: Config, source: str, run: Path, corpus_hash: str) -> Any:
    """Make the model's layer sample where the run needs one; returns the model if it had
    to be loaded for it (the extraction then reuses it), else None."""
    from .layer_sample import extract_layer_sample

    if not sampling_layers(cfg):
        return None
    m, lm = extract_layer_sample(
        source, run / "corpus", run / safe_name(source), cfg.extract,
        cfg.representations.units, corpus_hash, cfg.trust_remote_code,
    )  # fmt: skip
    if m["skipped"]:
        say(f"{source}: layer sample unchanged, skipped")
    else:
        say(f"{source}: layer sample of {m['n_layers']} layers on {m['tokens']:,} held-out tokens")
    return lm


SAE_VERSION = 5
"""Bump when training changes what it produces for the same settings."""
EVAL_VERSION = 2
"""Bump when evaluation changes what it reports for the same SAE and store."""
NOT_IN_TRAIN_KEY = (
    "dtype", "device", "threads", "checkpoint_seconds", "splice_tokens", "pretrained",
)  # fmt: skip
"""Settings that do not change the SAE training produces as written: dtype enters the key
as what it resolves to on this machine ("auto" is bfloat16 on one, float32 on another), and
the checkpoint adds the kind of device it was computed on."""
TOKEN_SETTINGS = ("skip_special", "skip_first", "max_norm_ratio")
"""Settings that choose which tokens every SAE stage uses."""


def train_stage(cfg: Config) -> dict[str, dict[int, dict[str, Any]]]:
    """Train and evaluate every SAE of the run, per model and layer, on the stored
    activations (resumes from checkpoints; skipped when unchanged)."""
    run = prepare_run_dir(cfg)
    check_layers(cfg)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    stores = {}
    for source in run_sources(cfg):  # every store checked before any training starts
        model_dir = run / safe_name(source)
        depth = model_depth(source, cfg.trust_remote_code)
        layers = sorted({resolve_layer(spec, depth) for spec in cfg.layers})
        stores[source] = {L: layer_store(cfg, model_dir, source, L) for L in layers}
        if cfg.unit != "token":
            from .text_units import check_documents

            for L, store in stores[source].items():
                width = cfg.train.width or cfg.train.expansion_factor * store.d_model
                check_documents(store, width, source, L)
    for sr in sae_runs(cfg):
        by_layer = stores[sr.source]
        model_dir = run / safe_name(sr.source)
        trained = {
            L: _train_layer(cfg, sr, L, store, model_dir / f"layer_{L}")
            for L, store in by_layer.items()
        }
        label = sr.source if sr.sae_name == "sae" else f"{sr.source} ({sr.sae_name})"
        results[label] = _evaluate_model(cfg, sr, by_layer, trained, model_dir)
    record_config(cfg)
    return results


def train_dir(layer_dir: Path, sae_name: str) -> Path:
    """Where an SAE's checkpoint and state live ("train" for the main SAE)."""
    return layer_dir / ("train" if sae_name == "sae" else f"train-{sae_name}")


def layer_store(cfg: Config, model_dir: Path, source: str, layer: int) -> Store:
    """The complete activation store of a model's layer, with held-out tokens to evaluate
    on, or a clear error naming what to do."""
    folder = model_dir / f"layer_{layer}" / "acts"
    try:
        store = open_store(folder)
    except SamesheepError:
        raise SamesheepError(
            f"no activations for {source} layer {layer} at {folder}: run `samesheep extract` "
            "(or `samesheep run`) first"
        ) from None
    if not store.complete:
        raise SamesheepError(
            f"the activations of {source} layer {layer} are incomplete: rerun `samesheep extract`"
        )
    corpus = read_json(Path(cfg.run_dir).expanduser() / "corpus" / "manifest.json", True)
    made_from = store.manifest.get("corpus")  # (stores made before it was recorded lack it)
    if made_from and corpus and made_from != corpus.get("hash"):
        raise SamesheepError(
            f"the activations of {source} layer {layer} come from another corpus than the "
            "run's (it was sampled again since): run `samesheep extract` again"
        )
    if cfg.unit != "token":
        from .text_units import text_store

        store = text_store(store, cfg.unit, document_lengths(cfg))
    if filter_counts(store, token_filter(store, cfg.train), "heldout")[0] == 0:
        raise SamesheepError(
            f"{source} layer {layer} has no held-out tokens to evaluate an SAE on "
            f"(corpus.heldout_tokens = {cfg.corpus.heldout_tokens}): set corpus.heldout_tokens "
            "above 0 and run `samesheep extract` again"
        )
    return store


def document_lengths(cfg: Config) -> dict[str, list[int]]:
    """Characters of every document of each split of the run's corpus."""
    from .corpus import CorpusReader

    reader = CorpusReader(Path(cfg.run_dir).expanduser() / "corpus")
    return {split: [len(d.text) for d in reader.documents(split)] for split in SPLITS}


def _train_layer(
    cfg: Config, sr: SaeRun, layer: int, store: Store, layer_dir: Path
) -> tuple[str, Any, dict[str, Any]]:
    """(key, SAE, training summary) of the layer: trained (or resumed), or loaded when
    already trained with the same settings on the same activations."""
    source = sr.source
    if cfg.train.pretrained:
        return _pretrained_layer(cfg, source, layer, store, layer_dir)
    train_cfg = dataclasses.replace(
        cfg.train, seed=sr.seed, architecture=sr.architecture or cfg.train.architecture
    )
    settings = {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in NOT_IN_TRAIN_KEY}
    settings["dtype"] = dtype_name(choose_dtype(train_cfg.dtype, choose_device(train_cfg.device)))
    key = settings_hash(SAE_VERSION, store.manifest["key"], settings)
    work = train_dir(layer_dir, sr.sae_name)
    state_path = work / "state.json"
    state = read_json(state_path, corrupt_is_missing=True)
    sae_dir = layer_dir / sr.sae_name
    if state and state.get("key") == key and state.get("complete"):
        try:
            return key, load_sae(sae_dir, d_in=store.d_model), state["summary"]
        except SamesheepError:
            pass  # the saved SAE is gone or damaged: train again (from the checkpoint)
    label = f"{source} layer {layer}" + ("" if sr.sae_name == "sae" else f" ({sr.sae_name})")
    set_threads(cfg.train.threads)
    sae, summary = train_sae(store, train_cfg, work, key, label)
    save_sae(sae, sae_dir, _metadata(cfg, source, layer, store))
    write_json(state_path, {"key": key, "complete": True, "summary": summary})
    rate = summary["tokens_per_second"]
    say(
        f"{label}: trained {sae.cfg.architecture} SAE, {sae.cfg.d_sae:,} latents, "
        f"{summary['tokens']:,} tokens ({summary['epochs']} passes)"
        + (f" at {rate:,.0f} tok/s" if rate else "")
    )
    return key, sae, summary


def _metadata(cfg: Config, source: str, layer: int, store: Store) -> dict[str, Any]:
    """What SAELens' cfg.json metadata says about where the SAE reads."""
    return {
        "model_name": source,
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "hook_layer": layer,
        "context_size": store.manifest["context_length"],
        "prepend_bos": bool(store.manifest.get("prefix_ids")),
        "dataset_path": cfg.corpus.source,
    }


def _pretrained_layer(
    cfg: Config, source: str, layer: int, store: Store, layer_dir: Path
) -> tuple[str, Any, dict[str, Any]]:
    """A pretrained SAE for the layer, checked against the layer's width and copied into the
    run directory (so every later stage finds it where a trained one would be)."""
    path = cfg.train.pretrained.replace("{model}", safe_name(source))
    folder = Path(path.replace("{layer}", str(layer))).expanduser()
    sae = load_sae(folder, d_in=store.d_model)
    stat = (folder / "sae_weights.safetensors").stat()
    # Keyed on the store too, as a trained SAE is: after re-extraction (another corpus,
    # seed or context length) the metrics are computed again.
    key = settings_hash(
        "pretrained",
        str(folder.resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        store.manifest["key"],
        _token_settings(cfg),
    )
    state_path = layer_dir / "train" / "state.json"
    summary = {"pretrained": str(folder)}
    state = read_json(state_path, corrupt_is_missing=True)
    if not (state and state.get("key") == key and (layer_dir / "sae" / "cfg.json").is_file()):
        save_sae(sae, layer_dir / "sae", _metadata(cfg, source, layer, store))
        write_json(state_path, {"key": key, "complete": True, "summary": summary})
    say(f"{source} layer {layer}: using the pretrained {sae.cfg.architecture} SAE at {folder}")
    return key, sae, summary


def _evaluate_model(
    cfg: Config,
    sr: SaeRun,
    stores: dict[int, Store],
    trained: dict[int, Any],
    model_dir: Path,
) -> dict[int, dict[str, Any]]:
    """Held-out metrics of each layer's SAE, saved in <sae>/metrics.json and printed; the
    model (with its head, for the spliced metrics) is loaded once, only if needed. The
    floors' and ceilings' SAEs get the reconstruction metrics only."""
    source = sr.source
    device = choose_device(cfg.train.device)
    # a per-text SAE reads one vector per document: splicing it in at every token means nothing
    splice_tokens = cfg.train.splice_tokens if sr.spliced and cfg.unit == "token" else 0
    # What the metrics depend on besides the SAE: the store, the tokens evaluated, the
    # spliced documents and the dtype the spliced model runs in.
    spliced = (splice_tokens, dtype_name(choose_dtype(cfg.extract.dtype, device)))
    eval_key = {
        L: settings_hash(
            EVAL_VERSION, trained[L][0], stores[L].manifest["key"], _token_settings(cfg), spliced
        )
        for L in stores
    }
    out, todo = {}, []
    for L in stores:
        path = model_dir / f"layer_{L}" / sr.sae_name / "metrics.json"
        old = read_json(path, corrupt_is_missing=True)
        sparsity = path.parent / "sparsity.safetensors"
        if old and old.get("key") == eval_key[L] and sparsity.is_file():
            out[L] = old
        else:
            todo.append(L)
    lm = None
    for L in todo:
        _, sae, summary = trained[L]
        sae = sae.to(device)
        tokens = token_filter(stores[L], cfg.train)
        label = f"{source} layer {L}" + ("" if sr.sae_name == "sae" else f" ({sr.sae_name})")
        with step(f"{label}: held-out reconstruction"):
            stats = reconstruction_stats(sae, stores[L], cfg.train.batch_tokens, device, tokens)
        metrics = {**stats.result(), "median_norm": stores[L].median_norm()}
        metrics["max_norm"] = tokens.to_dict()["max_norm"]
        _save_sparsity(model_dir / f"layer_{L}" / sr.sae_name, stats.fires, stats.tokens)
        if splice_tokens > 0:
            if lm is None:
                dtype = choose_dtype(cfg.extract.dtype, device)
                lm = load_model(source, dtype, device, cfg.trust_remote_code)
            with step(f"{label}: spliced CE and KL"):
                metrics.update(_spliced(cfg, lm, L, sae, stores[L], device, tokens))
        out[L] = {"key": eval_key[L], "model": source, "layer": L, **metrics, "training": summary}
        write_json(model_dir / f"layer_{L}" / sr.sae_name / "metrics.json", out[L])
    for L in stores:
        name = "" if sr.sae_name == "sae" else f" ({sr.sae_name})"
        say(f"{source} layer {L}{name}: " + format_metrics(out[L]))
    return out


def _save_sparsity(sae_dir: Path, fires: Any, tokens: int) -> None:
    """Each latent's firing frequency on the held-out tokens, as SAELens keeps it beside an
    SAE: sparsity.safetensors {"sparsity": log10(frequency + 1e-10)}."""
    frequency = fires.double() / max(tokens, 1)
    with atomic_path(sae_dir / "sparsity.safetensors") as tmp:
        save_file({"sparsity": (frequency + 1e-10).log10().float()}, str(tmp))


def _token_settings(cfg: Config) -> dict[str, Any]:
    return {k: getattr(cfg.train, k) for k in TOKEN_SETTINGS}


def _spliced(
    cfg: Config, lm: Any, layer: int, sae: Any, store: Store, device: Any, tokens: TokenFilter
) -> dict[str, Any]:
    """Spliced metrics on the first held-out documents, up to splice_tokens tokens."""
    run = Path(cfg.run_dir).expanduser()
    counts: dict[int, int] = {}
    for name in store.shard_names("heldout"):
        table = pq.read_table(store.folder / f"{name}.tokens.parquet", columns=["doc_index"])
        for d in table.column("doc_index").to_numpy():
            counts[int(d)] = counts.get(int(d), 0) + 1
    docs, total = [], 0
    for doc_index, doc in enumerate(read_documents(run / "corpus" / "heldout.jsonl")):
        if total >= cfg.train.splice_tokens:
            break
        docs.append(doc)
        total += counts.get(doc_index, 0)
    out = spliced_metrics(
        lm,
        layer,
        sae,
        docs,
        list(store.manifest.get("prefix_ids", [])),
        int(store.manifest["context_length"]),
        device=device,
        token_filter=tokens,
        norm_dtype=DTYPES[store.manifest["dtype"]],
    )
    out["scored_tokens"] = out.pop("tokens")
    return out


def format_metrics(m: dict[str, Any]) -> str:
    """One line of the headline metrics."""
    parts = [
        f"FVU {m['fvu']:.3f}",
        f"L0 {m['l0']:.1f}",
        f"dead {100 * m['dead_fraction']:.1f}%",
        f"dense {100 * m['dense_fraction']:.1f}%",
        f"cos {m['cosine']:.3f}",
        f"shrinkage {m['shrinkage']:.3f}",
    ]
    parts.append(f"median relative error {m['median_relative_error']:.3f}")
    if "ce_loss_score" in m:
        parts.append(f"CE loss recovered {100 * m['ce_loss_score']:.1f}%")
        parts.append(f"KL {m['kl_spliced']:.3f} (zero-ablation {m['kl_zero']:.3f})")
    outliers = f" ({m['outlier_tokens']:,} left out for their norm)" if m["outlier_tokens"] else ""
    return ", ".join(parts) + f" on {m['tokens']:,} held-out tokens{outliers}"


FEATURES_VERSION = 2
"""Bump when the features stage changes what it writes for the same inputs."""
NOT_IN_FEATURES_KEY = ("device", "batch_tokens", "threads")
FEATURE_FILES = ("feature_table.parquet", "exemplars.parquet", "summary.json")


def features_stage(cfg: Config) -> dict[str, dict[int, dict[str, Any]]]:
    """Statistics, exemplars, logit lens and labels of every latent of every SAE in the run
    (skipped when unchanged; a killed run reuses the codes already written)."""
    run = prepare_run_dir(cfg)
    check_layers(cfg)
    corpus = read_json(run / "corpus" / "manifest.json")
    if not corpus:
        raise SamesheepError(f"no corpus in {run / 'corpus'}: run `samesheep run` first")
    saes = {}
    for source in cfg.models:  # every SAE checked before any work starts
        model_dir = run / safe_name(source)
        depth = model_depth(source, cfg.trust_remote_code)
        for layer in sorted({resolve_layer(spec, depth) for spec in cfg.layers}):
            saes[(source, layer)] = _sae_for(cfg, model_dir, source, layer)
    from .corpus import CorpusReader
    from .features import CorpusInfo

    info = CorpusInfo.load(CorpusReader(run / "corpus"))
    for _, store in saes.values():
        info.check(store)
    device = choose_device(cfg.features.device)
    dtype = choose_dtype(cfg.features.dtype, device)
    settings = {
        k: v for k, v in dataclasses.asdict(cfg.features).items() if k not in NOT_IN_FEATURES_KEY
    }
    doc_states = None
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for (source, layer), (sae_key, store) in saes.items():
        out = run / safe_name(source) / f"layer_{layer}" / "features"
        key = settings_hash(
            FEATURES_VERSION, sae_key, store.manifest["key"], _token_settings(cfg),
            settings, corpus["hash"], dtype_name(dtype),
        )  # fmt: skip
        old = read_json(out / "summary.json", corrupt_is_missing=True)
        if old and old.get("key") == key and all((out / f).is_file() for f in FEATURE_FILES):
            say(f"{source} layer {layer}: features unchanged, skipped")
            results.setdefault(source, {})[layer] = old
            continue
        if cfg.features.embed and doc_states is None:
            from .embedding import TextEmbedder
            from .features import corpus_states

            doc_states = corpus_states(
                run / "corpus", corpus["hash"], lambda: TextEmbedder(device, dtype)
            )
        results.setdefault(source, {})[layer] = _features_of(
            cfg, source, layer, store, out, key, sae_key, device, dtype, doc_states, info
        )
    record_config(cfg)
    return results


def _sae_for(cfg: Config, model_dir: Path, source: str, layer: int) -> tuple[str, Store]:
    """(the key the SAE was made under, its store): the SAE the train stage left for the
    layer, checked to fit its store (from its cfg.json alone, no weights read), or a clear
    error naming the stage to run."""
    from .sae_files import CFG_FILE, read_sae_config

    layer_dir = model_dir / f"layer_{layer}"
    state = read_json(layer_dir / "train" / "state.json", corrupt_is_missing=True)
    sae_dir = layer_dir / "sae"
    if not (state and state.get("complete") and (sae_dir / CFG_FILE).is_file()):
        raise SamesheepError(
            f"no SAE for {source} layer {layer} in {sae_dir}: run `samesheep train` "
            "(or `samesheep run`) first"
        )
    store = layer_store(cfg, model_dir, source, layer)
    d_in = read_sae_config(sae_dir).d_in
    if d_in != store.d_model:
        raise SamesheepError(
            f"SAE at {sae_dir} expects d_in={d_in} but the activations of {source} layer "
            f"{layer} have {store.d_model}: run `samesheep train` again"
        )
    return state["key"], store


def codes_dir(layer_dir: Path, sae_name: str) -> Path:
    """Where an SAE's sparse codes of its layer's store are kept (features, compare)."""
    return layer_dir / "codes" / sae_name


def codes_key(cfg: Config, sae_key: str, store: Store, dtype: Any) -> str:
    """What an SAE's codes depend on: the SAE, the store, the tokens used, the encoder dtype."""
    return settings_hash(
        "codes", sae_key, store.manifest["key"], _token_settings(cfg), dtype_name(dtype)
    )


def _features_of(
    cfg: Config,
    source: str,
    layer: int,
    store: Store,
    out: Path,
    key: str,
    sae_key: str,
    device: Any,
    dtype: Any,
    doc_states: Any,
    info: Any,
) -> dict[str, Any]:
    """Compute and write one SAE's features folder; summary.json, written last, marks it
    complete."""
    from .features import FeatureSource, compute_features, write_features

    set_threads(cfg.features.threads)
    sae = load_sae(out.parent / "sae", device=device, d_in=store.d_model)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    lens_model = None
    if cfg.features.logit_lens:
        lens_model = load_model(source, dtype, device, cfg.trust_remote_code).model
    src = FeatureSource(source, layer, "sae", sae, store, token_filter(store, cfg.train), tokenizer)
    (out / "summary.json").unlink(missing_ok=True)  # incomplete until rewritten
    table, exemplars, centroids, summary = compute_features(
        src, info, codes_dir(out.parent, "sae"), cfg.features,
        codes_key(cfg, sae_key, store, dtype), device, dtype, lens_model, doc_states,
    )  # fmt: skip
    summary = {
        "key": key,
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


COMPARE_VERSION = 3
"""Bump when the compare stage changes what it writes for the same inputs."""
NOT_IN_COMPARE_KEY = ("pairs",)


def compare_pairs(cfg: Config) -> list[tuple[str, str]]:
    """The pairs of models to compare: compare.pairs ("A:B"), else every pair of models."""
    if not cfg.compare.pairs:
        return [(a, b) for i, a in enumerate(cfg.models) for b in cfg.models[i + 1 :]]
    out = []
    for item in cfg.compare.pairs:
        a, sep, b = item.rpartition(":") if item.count(":") > 1 else item.partition(":")
        if not sep or a not in cfg.models or b not in cfg.models or a == b:
            raise SamesheepError(
                f"compare pair {item!r} must name two different models of the run as A:B "
                f"(models: {', '.join(cfg.models)})"
            )
        out.append((a, b))
    return out


def _sae_key(layer_dir: Path, sae_name: str, source: str, layer: int) -> str:
    state = read_json(train_dir(layer_dir, sae_name) / "state.json", corrupt_is_missing=True)
    if not (state and state.get("complete") and (layer_dir / sae_name / "cfg.json").is_file()):
        raise SamesheepError(
            f"no SAE {sae_name} for {source} layer {layer}: run `samesheep train` "
            "(or `samesheep run`) first"
        )
    return state["key"]


def _check_side(cfg: Config, source: str, layer: int, sae_name: str) -> tuple[str, Store]:
    """(the SAE's key, its store) of one side of a comparison, with its features where the
    comparison reads them, or a clear error naming the stage to run."""
    model_dir = Path(cfg.run_dir).expanduser() / safe_name(source)
    layer_dir = model_dir / f"layer_{layer}"
    sae_key = _sae_key(layer_dir, sae_name, source, layer)
    store = layer_store(cfg, model_dir, source, layer)
    main = sae_name == "sae" and not source.startswith(RANDOM_PREFIX)
    if main and not (layer_dir / "features" / "summary.json").is_file():
        raise SamesheepError(
            f"no features for {source} layer {layer}: run `samesheep features` "
            "(or `samesheep run`) first"
        )
    return sae_key, store


def _load_side(
    cfg: Config,
    source: str,
    layer: int,
    sae_name: str,
    device: Any,
    dtype: Any,
    n_train: int,
    info: Any = None,
) -> tuple[Any, str]:
    """(the comparison's Side of one SAE, the key of its codes): its codes on every kept token
    (encoded here where the features stage has not), its decoder, features and centroids."""
    from safetensors.torch import load_file

    from .alignment import TokenRows
    from .codes import stream_codes
    from .comparison import Side
    from .sae import concat_codes

    model_dir = Path(cfg.run_dir).expanduser() / safe_name(source)
    layer_dir = model_dir / f"layer_{layer}"
    sae_key, store = _check_side(cfg, source, layer, sae_name)
    if info is not None:
        info.check(store)  # the same corpus, document for document, in every store
    tokens = token_filter(store, cfg.train)
    sae = load_sae(layer_dir / sae_name, device=device, d_in=store.d_model)
    key = codes_key(cfg, sae_key, store, dtype)
    folder = codes_dir(layer_dir, sae_name)
    label = f"{source} layer {layer} codes" + ("" if sae_name == "sae" else f" ({sae_name})")
    codes = concat_codes(
        [
            c.codes
            for c in stream_codes(
                sae, store, tokens, folder, key, device, dtype, cfg.features.batch_tokens, label
            )
        ]
    )
    features = centroids = None
    fdir = layer_dir / "features"
    if sae_name == "sae" and not source.startswith(RANDOM_PREFIX):
        features = pq.read_table(fdir / "feature_table.parquet", columns=["latent", "topic"])
        if (fdir / "centroids.safetensors").is_file():
            centroids = load_file(fdir / "centroids.safetensors")["centroids"].numpy()
    side = Side(
        model=source,
        layer=layer,
        sae_name=sae_name,
        rows=TokenRows.of(store, tokens, n_train),
        codes=codes,
        d_sae=sae.cfg.d_sae,
        decoder=sae.W_dec.detach().float().cpu().numpy(),
        features=features,
        centroids=centroids,
    )
    return side, key


def pair_folder(cfg: Config, a: str, b: str) -> Path:
    """The folder of a pair of models (its layer-by-layer comparison sits here)."""
    return Path(cfg.run_dir).expanduser() / "compare" / f"{safe_name(a)}__{safe_name(b)}"


def compare_folder(cfg: Config, a: str, b: str, layer_a: int, layer_b: int) -> Path:
    """Where the comparison of two models' layers is written."""
    out = pair_folder(cfg, a, b)
    return out / f"layer_{layer_a}__layer_{layer_b}" if len(cfg.layers) > 1 else out


def compare_corpus(run: Path) -> tuple[Any, list[str], int]:
    """(the run's corpus info, every document's text, train then held-out, and how many of
    them are training documents): what a comparison reads of the corpus."""
    from .corpus import CorpusReader
    from .features import CorpusInfo

    reader = CorpusReader(run / "corpus")
    texts = [d.text for split in ("train", "heldout") for d in reader.documents(split)]
    return CorpusInfo.load(reader), texts, reader.count("train")


def compare_stage(cfg: Config) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Compare every pair of models: their SAEs' features on aligned units, with the
    random-weights floor, the nulls and the seed ceilings (skipped when unchanged). Returns
    {(A, B, index of the layer setting): summary}."""
    from .comparison import PairInputs
    from .correlation import UNIT_VALUES

    run = prepare_run_dir(cfg)
    check_layers(cfg)
    if cfg.compare.unit_value not in UNIT_VALUES:
        raise SamesheepError(
            f"compare.unit_value must be one of {', '.join(UNIT_VALUES)}, "
            f"got {cfg.compare.unit_value!r}"
        )
    pairs = compare_pairs(cfg)
    if not pairs:
        say("compare: the run has one model, nothing to compare")
        return {}
    corpus = read_json(run / "corpus" / "manifest.json")
    if not corpus:
        raise SamesheepError(f"no corpus in {run / 'corpus'}: run `samesheep run` first")
    info, texts, n_train = compare_corpus(run)
    device = choose_device(cfg.features.device)
    dtype = choose_dtype(cfg.features.dtype, device)
    settings = {
        k: v for k, v in dataclasses.asdict(cfg.compare).items() if k not in NOT_IN_COMPARE_KEY
    }
    sides = []  # every side of every comparison checked before any work starts
    for spec in cfg.layers:
        for a, b in pairs:
            for m in (a, b):
                layer = resolve_layer(spec, model_depth(m, cfg.trust_remote_code))
                sides.append((m, layer, "sae"))
                if cfg.compare.floor and comparing(cfg):
                    sides.append((random_copy(m), layer, "sae"))
                if cfg.compare.ceiling and comparing(cfg):
                    sides.append((m, layer, ceiling_name(cfg)))
    for side in dict.fromkeys(sides):
        _check_side(cfg, *side)
    results = {}
    for spec_index, spec in enumerate(cfg.layers):
        for a, b in pairs:
            la = resolve_layer(spec, model_depth(a, cfg.trust_remote_code))
            lb = resolve_layer(spec, model_depth(b, cfg.trust_remote_code))
            out = compare_folder(cfg, a, b, la, lb)
            side_a, key_a = _load_side(cfg, a, la, "sae", device, dtype, n_train, info)
            side_b, key_b = _load_side(cfg, b, lb, "sae", device, dtype, n_train, info)
            keys = [key_a, key_b]
            floor = ceiling = None
            if cfg.compare.floor and comparing(cfg):
                fa, ka = _load_side(cfg, random_copy(a), la, "sae", device, dtype, n_train, info)
                fb, kb = _load_side(cfg, random_copy(b), lb, "sae", device, dtype, n_train, info)
                floor, keys = (fa, fb), [*keys, ka, kb]
            if cfg.compare.ceiling and comparing(cfg):
                ca, ka = _load_side(cfg, a, la, ceiling_name(cfg), device, dtype, n_train, info)
                cb, kb = _load_side(cfg, b, lb, ceiling_name(cfg), device, dtype, n_train, info)
                ceiling, keys = (ca, cb), [*keys, ka, kb]
            key = settings_hash(COMPARE_VERSION, keys, settings, corpus["hash"])
            old = read_json(out / "summary.json", corrupt_is_missing=True)
            if old and old.get("key") == key:
                say(f"compare {a} / {b}: unchanged, skipped")
                say(old.get("answer", ""))
                results[(a, b, spec_index)] = old
                continue
            inp = PairInputs(side_a, side_b, floor, ceiling, texts, n_train)
            results[(a, b, spec_index)] = _compare_pair(cfg, inp, out, key)
    record_config(cfg)
    return results


def _compare_pair(cfg: Config, inp: Any, out: Path, key: str) -> dict[str, Any]:
    """Run one comparison and write its folder; summary.json, written last, marks it done."""
    import time

    from .comparison import (
        SURFACE_R,
        answer,
        by_topic,
        families_table,
        geometry,
        headline_table,
        meaning_agreement,
        pairs_table,
        partners_table,
        run_pair,
        too_rare,
        verdict,
    )

    start = time.perf_counter()
    (out / "summary.json").unlink(missing_ok=True)
    result = run_pair(inp, cfg.compare)
    runs, s = result["runs"], result["settings"]
    n_docs = len(np.unique(result["units"].doc))
    numbers = headline_table(runs, s, n_docs)
    pairs, pair_r = pairs_table(runs, inp)
    tables = {
        "partners.parquet": partners_table(inp, runs, s),
        "pairs.parquet": pairs,
        "families.parquet": families_table(runs, inp),
    }
    summary = {
        "key": key,
        "model_a": inp.a.model,
        "model_b": inp.b.model,
        "layer_a": inp.a.layer,
        "layer_b": inp.b.layer,
        "latents": {"a": inp.a.d_sae, "b": inp.b.d_sae},
        "coverage": result["units"].coverage,
        "units": len(result["units"]),
        "documents": n_docs,
        "surface_r": SURFACE_R,
        "headline": numbers,
        "too_rare": too_rare(runs, s),
        "matched_pairs": {
            "pairs": pairs.num_rows,
            f"r{0.5:g}": int((pair_r >= 0.5).sum()),
        },
        "meaning": meaning_agreement(inp, runs, s),
        "topics": by_topic(inp, runs, s),
        "geometry": geometry(inp, pairs, pair_r, cfg.compare),
        "settings": dataclasses.asdict(cfg.compare),
        "floor": inp.floor is not None,
        "ceiling": inp.ceiling is not None,
        "architecture": cfg.train.architecture,
        "ceiling_architecture": ceiling_architecture(cfg) if inp.ceiling is not None else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    summary["verdict"] = verdict(inp.a.model, inp.b.model, numbers)
    summary["answer"] = (
        answer(inp.a.model, inp.b.model, numbers) + "\n" + " ".join(summary["verdict"])
    )
    # written only once everything is computed; summary.json, last, marks the folder done
    for name, table in tables.items():
        with atomic_path(out / name) as tmp:
            pq.write_table(table, tmp, compression="zstd")
    write_json(out / "summary.json", summary)
    say(summary["answer"])
    return summary


def run(cfg: Config) -> dict[str, Any]:
    """Run every stage in order; print (and keep in timings.json, written after each stage,
    so the report shows the stages before it) each stage's time."""
    import time

    stages = {
        "extract": extract_stage,
        "train": train_stage,
        "features": features_stage,
        "compare": compare_stage,
        "layers": layers_stage,
        "interpret": interpret_if_enabled,
        "report": report_stage,
    }
    results, seconds = {}, {}
    timings = Path(cfg.run_dir).expanduser() / "timings.json"
    beside: BesideProcess | None = None
    try:
        for name, stage in stages.items():
            start = time.perf_counter()
            if name == "features" and sampling_layers(cfg) and cfg.representations.beside:
                # The layers stage needs only the layer samples, and features and compare
                # leave a core mostly idle (measured: compare 116% of one core, the
                # layers stage 192%): it runs in a second process beside them.
                beside = BesideProcess("layers", cfg)
            if name == "layers" and beside is not None:
                beside.wait()  # then the stage below finds its work done, and reads it
            results[name] = stage(cfg)
            seconds[name] = round(time.perf_counter() - start, 1)
            write_json(timings, {"seconds": seconds, "total": round(sum(seconds.values()), 1)})
    finally:
        if beside is not None:
            beside.stop()
    total = sum(seconds.values())
    say(
        "stage times: "
        + ", ".join(f"{k} {_minutes(v)}" for k, v in seconds.items())
        + f"; total {_minutes(total)}"
    )
    return results


class BesideProcess:
    """A stage run by `samesheep <stage>` in a second process (its numpy on one thread)
    while this one goes on: its lines are relayed to stderr as they come, and its one-line
    error, if it fails, is raised here by wait()."""

    def __init__(self, stage: str, cfg: Config) -> None:
        import os
        import subprocess
        import sys
        import tempfile
        import threading

        self.stage = stage
        self.error = ""
        run = Path(cfg.run_dir).expanduser()
        run.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{stage}.", suffix=".toml", dir=run)
        self.config = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(config_mod.to_toml(cfg, comments=False))
        one = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "samesheep", stage, "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **one},
        )
        self.relay = threading.Thread(target=self._relay, daemon=True)
        self.relay.start()

    def _relay(self) -> None:
        for line in self.process.stderr:
            line = line.rstrip("\n")
            if line.startswith("samesheep: error: "):
                self.error = line.removeprefix("samesheep: error: ")
            elif line.strip():
                say(line)

    def wait(self) -> None:
        """Wait for it to finish (raising its error where it failed)."""
        code = self.process.wait()
        self.relay.join()
        self.config.unlink(missing_ok=True)
        if code != 0:
            raise SamesheepError(self.error or f"the {self.stage} stage stopped (exit code {code})")

    def stop(self) -> None:
        """End it (where this process stops first) and remove its config file."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.config.unlink(missing_ok=True)


def layers_stage(cfg: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """Compare every layer of every pair of models on the held-out layer samples."""
    from .representations import layers_stage as compare_layers

    return compare_layers(cfg)


def interpret_stage(cfg: Config) -> dict[Any, dict[str, Any]]:
    """Explain a sample of every SAE's latents with a language model and score every label
    (samesheep interpret runs it whatever interpret.enabled says)."""
    from .interpret import interpret_stage as explain

    return explain(cfg)


def interpret_if_enabled(cfg: Config) -> dict[Any, dict[str, Any]]:
    """The interpret stage where interpret.enabled is set (off by default: it loads or
    calls a language model)."""
    if not cfg.interpret.enabled:
        say("interpret: off (set interpret.enabled = true, or run `samesheep interpret`)")
        return {}
    return interpret_stage(cfg)


def report_stage(cfg: Config) -> Path:
    """Write the static site of the run (report/index.html); returns the index's path."""
    from .report import report_stage as build

    index = build(cfg)
    record_config(cfg)
    return index


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
