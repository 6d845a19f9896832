"""The train stage: every SAE of the run (main, floor, ceiling) trained on its layer's
stored activations, or a pretrained one copied in, then evaluated on held-out tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from safetensors.torch import save_file

from ..core.cache import load_done, mark_done
from ..core.config import Config, settings_hash
from ..core.constants import SPLITS
from ..core.device import DTYPES, choose_device, choose_dtype, dtype_name, set_threads
from ..core.errors import SamesheepError
from ..core.files import atomic_path, read_json
from ..core.plan import SaeRun, run_sources, sae_runs
from ..core.progress import say, step
from ..core.rundir import (
    MAIN_SAE,
    acts_dir,
    corpus_dir,
    corpus_manifest,
    layer_dir,
    prepare_run_dir,
    record_config,
    run_path,
    sae_dir,
    safe_name,
    train_dir,
)
from ..data.corpus import CorpusReader, read_documents
from ..data.store import Store, TokenFilter, open_store
from ..data.text_units import check_documents, text_store
from ..lm.models import load_model, model_depth, resolve_layer
from ..lm.stage import check_layers
from .evaluation import SpliceSettings, reconstruction_stats, spliced_metrics
from .saelens import CFG_FILE, WEIGHTS_FILE, load_sae, save_sae
from .training import filter_counts, token_filter, train_sae

SAE_VERSION = 5
"""Bump when training changes what it produces for the same settings."""
EVAL_VERSION = 2
"""Bump when evaluation changes what it reports for the same SAE and store."""
NOT_IN_TRAIN_KEY = (
    *("dtype", "device", "threads"),
    *("checkpoint_seconds", "splice_tokens", "pretrained"),
)
"""Settings that do not change the SAE training produces as written: dtype enters the key
as what it resolves to on this machine ("auto" is bfloat16 on one, float32 on another), and
the checkpoint adds the kind of device it was computed on."""
STATE = "state.json"
"""An SAE's done marker, in its training folder: the key it was trained under, its
training summary, and the digests of its weights and cfg.json."""
SPARSITY = "sparsity.safetensors"
METRICS = "metrics.json"
"""An SAE's held-out metrics, beside it (its key says what they were computed from)."""
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
        depth = model_depth(source, cfg.trust_remote_code)
        layers = sorted({resolve_layer(spec, depth) for spec in cfg.layers})
        stores[source] = {L: layer_store(cfg, source, L) for L in layers}
        if cfg.unit != "token":
            for L, store in stores[source].items():
                width = cfg.train.width or cfg.train.expansion_factor * store.d_model
                check_documents(store, width, source, L)
    for sr in sae_runs(cfg):
        by_layer = stores[sr.source]
        trained = {
            L: _train_layer(cfg, sr, L, store, layer_dir(run, sr.source, L))
            for L, store in by_layer.items()
        }
        results[sr.label] = _evaluate_model(cfg, sr, by_layer, trained)
    record_config(cfg)
    return results


def layer_store(cfg: Config, source: str, layer: int) -> Store:
    """The complete activation store of a model's layer, with held-out tokens to evaluate
    on, or a clear error naming what to do."""
    run = run_path(cfg)
    folder = acts_dir(layer_dir(run, source, layer))
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
    corpus = read_json(corpus_manifest(run), True)
    made_from = store.manifest.get("corpus")  # (stores made before it was recorded lack it)
    if made_from and corpus and made_from != corpus.get("hash"):
        raise SamesheepError(
            f"the activations of {source} layer {layer} come from another corpus than the "
            "run's (it was sampled again since): run `samesheep extract` again"
        )
    if cfg.unit != "token":
        store = text_store(store, cfg.unit, document_lengths(cfg))
    if filter_counts(store, token_filter(store, cfg.train), "heldout")[0] == 0:
        raise SamesheepError(
            f"{source} layer {layer} has no held-out tokens to evaluate an SAE on "
            f"(corpus.heldout_tokens = {cfg.corpus.heldout_tokens}): set corpus.heldout_tokens "
            "above 0 and run `samesheep extract` again"
        )
    return store


def trained_key(cfg: Config, source: str, layer: int, sae_name: str = MAIN_SAE) -> str:
    """The key an SAE the train stage finished was trained under (from its training
    marker; no weights read), or a clear error naming the stage to run."""
    folder = layer_dir(run_path(cfg), source, layer)
    state = read_json(train_dir(folder, sae_name) / STATE, corrupt_is_missing=True)
    sae = sae_dir(folder, sae_name)
    if not (state and state.get("complete") and (sae / CFG_FILE).is_file()):
        name = "" if sae_name == MAIN_SAE else f" {sae_name}"
        raise SamesheepError(
            f"no SAE{name} for {source} layer {layer} in {sae}: run `samesheep train` "
            "(or `samesheep run`) first"
        )
    return state["key"]


def document_lengths(cfg: Config) -> dict[str, list[int]]:
    """Characters of every document of each split of the run's corpus."""
    reader = CorpusReader(corpus_dir(run_path(cfg)))
    return {split: [len(d.text) for d in reader.documents(split)] for split in SPLITS}


def _train_layer(
    cfg: Config, sr: SaeRun, layer: int, store: Store, layer_folder: Path
) -> tuple[str, Any, dict[str, Any]]:
    """(key, SAE, training summary) of the layer: trained (or resumed), or loaded when
    already trained with the same settings on the same activations."""
    source = sr.source
    if cfg.train.pretrained:
        return _pretrained_layer(cfg, source, layer, store, layer_folder)
    train_cfg = dataclasses.replace(
        cfg.train, seed=sr.seed, architecture=sr.architecture or cfg.train.architecture
    )
    settings = {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in NOT_IN_TRAIN_KEY}
    settings["dtype"] = dtype_name(choose_dtype(train_cfg.dtype, choose_device(train_cfg.device)))
    key = settings_hash(SAE_VERSION, store.manifest["key"], settings)
    work = train_dir(layer_folder, sr.sae_name)
    state_path = work / STATE
    folder = sae_dir(layer_folder, sr.sae_name)
    state = load_done(state_path, key)
    if state and state.get("complete"):
        try:
            return key, load_sae(folder, d_in=store.d_model), state["summary"]
        except SamesheepError:
            pass  # the saved SAE is unreadable: train again (from the checkpoint)
    label = _layer_label(sr, layer)
    set_threads(cfg.train.threads)
    sae, summary = train_sae(store, train_cfg, work, key, label)
    save_sae(sae, folder, _metadata(cfg, source, layer, store))
    record = {"key": key, "complete": True, "summary": summary}
    mark_done(state_path, record, [folder / WEIGHTS_FILE, folder / CFG_FILE])
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
    cfg: Config, source: str, layer: int, store: Store, layer_folder: Path
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
        token_settings(cfg),
    )
    state_path = train_dir(layer_folder, MAIN_SAE) / STATE
    summary = {"pretrained": str(folder)}
    if not load_done(state_path, key):
        main = sae_dir(layer_folder, MAIN_SAE)
        save_sae(sae, main, _metadata(cfg, source, layer, store))
        record = {"key": key, "complete": True, "summary": summary}
        mark_done(state_path, record, [main / WEIGHTS_FILE, main / CFG_FILE])
    say(f"{source} layer {layer}: using the pretrained {sae.cfg.architecture} SAE at {folder}")
    return key, sae, summary


def _evaluate_model(
    cfg: Config,
    sr: SaeRun,
    stores: dict[int, Store],
    trained: dict[int, Any],
) -> dict[int, dict[str, Any]]:
    """Held-out metrics of each layer's SAE, saved in <sae>/metrics.json and printed; the
    model (with its head, for the spliced metrics) is loaded once, only if needed. The
    floors' and ceilings' SAEs get the reconstruction metrics only."""
    source = sr.source
    run = run_path(cfg)
    folders = {L: sae_dir(layer_dir(run, source, L), sr.sae_name) for L in stores}
    device = choose_device(cfg.train.device)
    # a per-text SAE reads one vector per document: splicing it in at every token means nothing
    splice_tokens = cfg.train.splice_tokens if sr.spliced and cfg.unit == "token" else 0
    # What the metrics depend on besides the SAE: the store, the tokens evaluated, the
    # spliced documents and the dtype the spliced model runs in.
    spliced = (splice_tokens, dtype_name(choose_dtype(cfg.extract.dtype, device)))
    eval_key = {
        L: settings_hash(
            EVAL_VERSION, trained[L][0], stores[L].manifest["key"], token_settings(cfg), spliced
        )
        for L in stores
    }
    out, todo = {}, []
    for L in stores:
        old = load_done(folders[L] / METRICS, eval_key[L])
        if old:
            out[L] = old
        else:
            todo.append(L)
    lm = None
    for L in todo:
        _, sae, summary = trained[L]
        sae = sae.to(device)
        tokens = token_filter(stores[L], cfg.train)
        label = _layer_label(sr, L)
        with step(f"{label}: held-out reconstruction"):
            stats = reconstruction_stats(sae, stores[L], cfg.train.batch_tokens, device, tokens)
        metrics = {**stats.result(), "median_norm": stores[L].median_norm()}
        metrics["max_norm"] = tokens.to_dict()["max_norm"]
        _save_sparsity(folders[L], stats.fires, stats.tokens)
        if splice_tokens > 0:
            if lm is None:
                dtype = choose_dtype(cfg.extract.dtype, device)
                lm = load_model(source, dtype, device, cfg.trust_remote_code)
            with step(f"{label}: spliced CE and KL"):
                metrics.update(_spliced(cfg, lm, L, sae, stores[L], tokens))
        out[L] = {"key": eval_key[L], "model": source, "layer": L, **metrics, "training": summary}
        out[L] = mark_done(folders[L] / METRICS, out[L], [folders[L] / SPARSITY])
    for L in stores:
        say(f"{_layer_label(sr, L)}: " + format_metrics(out[L]))
    return out


def _save_sparsity(sae_dir: Path, fires: Any, tokens: int) -> None:
    """Each latent's firing frequency on the held-out tokens, as SAELens keeps it beside an
    SAE: sparsity.safetensors {"sparsity": log10(frequency + 1e-10)}."""
    frequency = fires.double() / max(tokens, 1)
    with atomic_path(sae_dir / SPARSITY) as tmp:
        save_file({"sparsity": (frequency + 1e-10).log10().float()}, str(tmp))


def _layer_label(sr: SaeRun, layer: int) -> str:
    """How log lines name an SAE: "<model> layer <L>", with its folder where not the main."""
    name = "" if sr.sae_name == MAIN_SAE else f" ({sr.sae_name})"
    return f"{sr.source} layer {layer}{name}"


def token_settings(cfg: Config) -> dict[str, Any]:
    """The settings that choose which tokens every SAE stage uses."""
    return {k: getattr(cfg.train, k) for k in TOKEN_SETTINGS}


def _spliced(
    cfg: Config, lm: Any, layer: int, sae: Any, store: Store, tokens: TokenFilter
) -> dict[str, Any]:
    """Spliced metrics on the first held-out documents, up to splice_tokens tokens, on the
    device the SAEs are evaluated on."""
    settings = splice_settings(store, tokens)
    docs = splice_documents(cfg, store)
    out = spliced_metrics(lm, layer, sae, docs, settings, choose_device(cfg.train.device))
    out["scored_tokens"] = out.pop("tokens")
    return out


def splice_documents(cfg: Config, store: Store) -> list[Any]:
    """The first held-out documents, up to train.splice_tokens of the store's tokens: where
    the spliced metrics read."""
    counts: dict[int, int] = {}
    for name in store.shard_names("heldout"):
        table = pq.read_table(store.folder / f"{name}.tokens.parquet", columns=["doc_index"])
        for d in table.column("doc_index").to_numpy():
            counts[int(d)] = counts.get(int(d), 0) + 1
    docs, total = [], 0
    for doc_index, doc in enumerate(read_documents(corpus_dir(run_path(cfg)) / "heldout.jsonl")):
        if total >= cfg.train.splice_tokens:
            break
        docs.append(doc)
        total += counts.get(doc_index, 0)
    return docs


def splice_settings(store: Store, tokens: TokenFilter) -> SpliceSettings:
    """The spliced metrics' windows cut as the store's extraction cut them."""
    return SpliceSettings(
        list(store.manifest.get("prefix_ids", [])),
        int(store.manifest["context_length"]),
        token_filter=tokens,
        norm_dtype=DTYPES[store.manifest["dtype"]],
    )


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
