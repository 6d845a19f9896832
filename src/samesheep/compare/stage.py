"""The compare stage: every pair of models' SAEs matched on aligned units, beside the
fixed-source floors, the seed ceilings and the nulls, and the answer on one scale."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from safetensors.torch import load_file

from ..core.cache import load_done, mark_done, unmark
from ..core.config import Config, settings_hash
from ..core.constants import DICTIONARIES, SUMMARY
from ..core.device import choose_device, choose_dtype
from ..core.errors import SamesheepError
from ..core.files import atomic_path, read_json
from ..core.plan import (
    ceiling_architecture,
    ceiling_name,
    compare_pairs,
    comparing,
    is_main,
    random_copy,
)
from ..core.progress import say
from ..core.rundir import (
    MAIN_SAE,
    codes_dir,
    compare_folder,
    corpus_dir,
    corpus_manifest,
    features_dir,
    layer_dir,
    prepare_run_dir,
    record_config,
    run_path,
    sae_dir,
)
from ..data.alignment import TokenRows
from ..data.corpus import CorpusReader
from ..data.store import Store
from ..features.compute import CorpusInfo
from ..features.stage import codes_key
from ..lm.models import model_depth, resolve_layer
from ..lm.stage import check_layers
from ..sae.codes import Encoding, stream_codes
from ..sae.dictionaries import DictionarySettings
from ..sae.model import concat_codes
from ..sae.saelens import load_sae
from ..sae.stage import layer_store, trained_key
from ..sae.training import token_filter
from .correlation import UNIT_VALUES
from .dictionaries import FitPlan, compare_dictionary
from .pair import (
    SURFACE_R,
    PairInputs,
    Side,
    answer,
    by_topic,
    common_units,
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
from .presence import presence, presence_sentence, with_presence

COMPARE_VERSION = 4
"""Bump when the compare stage changes what it writes for the same inputs."""
NOT_IN_COMPARE_KEY = ("pairs",)


def _check_side(cfg: Config, source: str, layer: int, sae_name: str) -> tuple[str, Store]:
    """(the SAE's key, its store) of one side of a comparison, with its features where the
    comparison reads them, or a clear error naming the stage to run."""
    folder = layer_dir(run_path(cfg), source, layer)
    sae_key = trained_key(cfg, source, layer, sae_name)
    store = layer_store(cfg, source, layer)
    if is_main(source, sae_name) and not (features_dir(folder) / SUMMARY).is_file():
        raise SamesheepError(
            f"no features for {source} layer {layer}: run `samesheep features` "
            "(or `samesheep run`) first"
        )
    return sae_key, store


@dataclass
class SideReader:
    """Reads one SAE's side of a comparison: its codes on every kept token (encoded here
    where the features stage has not), its decoder, its features and centroids."""

    cfg: Config
    device: Any
    dtype: Any
    n_train: int
    """Training documents (held-out documents are numbered after them)."""
    info: CorpusInfo | None = None
    """The run's corpus, checked against every store where given."""

    def load(self, source: str, layer: int, sae_name: str) -> tuple[Side, str]:
        """(the Side, the key of its codes)."""
        cfg = self.cfg
        folder = layer_dir(run_path(cfg), source, layer)
        sae_key, store = _check_side(cfg, source, layer, sae_name)
        if self.info is not None:
            self.info.check(store)  # the same corpus, document for document, in every store
        tokens = token_filter(store, cfg.train)
        sae = load_sae(sae_dir(folder, sae_name), device=self.device, d_in=store.d_model)
        key = codes_key(cfg, sae_key, store, self.dtype)
        label = f"{source} layer {layer} codes" + ("" if sae_name == MAIN_SAE else f" ({sae_name})")
        encoding = Encoding(self.device, self.dtype, cfg.features.batch_tokens, label)
        chunks = stream_codes(sae, store, tokens, codes_dir(folder, sae_name), key, encoding)
        codes = concat_codes([c.codes for c in chunks])
        features = centroids = None
        fdir = features_dir(folder)
        if is_main(source, sae_name):
            features = pq.read_table(fdir / "feature_table.parquet", columns=["latent", "topic"])
            if (fdir / "centroids.safetensors").is_file():
                centroids = load_file(fdir / "centroids.safetensors")["centroids"].numpy()
        side = Side(
            model=source,
            layer=layer,
            sae_name=sae_name,
            rows=TokenRows.of(store, tokens, self.n_train),
            codes=codes,
            d_sae=sae.cfg.d_sae,
            decoder=sae.W_dec.detach().float().cpu().numpy(),
            features=features,
            centroids=centroids,
            store=store,
        )
        return side, key


def compare_corpus(run: Path) -> tuple[CorpusInfo, list[str], int]:
    """(the run's corpus info, every document's text, train then held-out, and how many of
    them are training documents): what a comparison reads of the corpus."""
    reader = CorpusReader(corpus_dir(run))
    texts = reader.texts()
    return CorpusInfo.load(reader), texts, reader.count("train")


def _sides(cfg: Config, pairs: list[tuple[str, str]]) -> list[tuple[str, int, str]]:
    """(model, layer, SAE folder) of every side of every comparison, once each."""
    sides = []
    for spec in cfg.layers:
        for a, b in pairs:
            for m in (a, b):
                layer = resolve_layer(spec, model_depth(m, cfg.trust_remote_code))
                sides.append((m, layer, MAIN_SAE))
                if cfg.compare.floor and comparing(cfg):
                    sides.append((random_copy(m), layer, MAIN_SAE))
                if cfg.compare.ceiling and comparing(cfg):
                    sides.append((m, layer, ceiling_name(cfg)))
    return list(dict.fromkeys(sides))


def _pair_inputs(
    reader: SideReader, pair: tuple[str, str], layers: tuple[int, int], texts: list[str]
) -> tuple[PairInputs, list[str]]:
    """(the inputs of one comparison, the keys of every side's codes)."""
    cfg = reader.cfg
    (a, b), (la, lb) = pair, layers
    side_a, key_a = reader.load(a, la, MAIN_SAE)
    side_b, key_b = reader.load(b, lb, MAIN_SAE)
    keys = [key_a, key_b]
    floor = ceiling = None
    if cfg.compare.floor and comparing(cfg):
        fa, ka = reader.load(random_copy(a), la, MAIN_SAE)
        fb, kb = reader.load(random_copy(b), lb, MAIN_SAE)
        floor, keys = (fa, fb), [*keys, ka, kb]
    if cfg.compare.ceiling and comparing(cfg):
        ca, ka = reader.load(a, la, ceiling_name(cfg))
        cb, kb = reader.load(b, lb, ceiling_name(cfg))
        ceiling, keys = (ca, cb), [*keys, ka, kb]
    return PairInputs(side_a, side_b, floor, ceiling, texts, reader.n_train), keys


def _reading(cfg: Config, run: Path) -> tuple[dict[str, Any], list[str], SideReader]:
    """(the run's corpus manifest, every document's text, the reader of comparison sides),
    or a one-line error where the run has no corpus."""
    corpus = read_json(corpus_manifest(run))
    if not corpus:
        raise SamesheepError(f"no corpus in {corpus_dir(run)}: run `samesheep run` first")
    info, texts, n_train = compare_corpus(run)
    device = choose_device(cfg.features.device)
    reader = SideReader(cfg, device, choose_dtype(cfg.features.dtype, device), n_train, info)
    return corpus, texts, reader


def compare_stage(cfg: Config) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Compare every pair of models: their SAEs' features on aligned units, with the
    random-weights floor, the nulls and the seed ceilings (skipped when unchanged). Returns
    {(A, B, index of the layer setting): summary}."""
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
    corpus, texts, reader = _reading(cfg, run)
    settings = {
        k: v for k, v in dataclasses.asdict(cfg.compare).items() if k not in NOT_IN_COMPARE_KEY
    }
    for side in _sides(cfg, pairs):  # every side of every comparison checked before any work
        _check_side(cfg, *side)
    results = {}
    for spec_index, spec in enumerate(cfg.layers):
        for a, b in pairs:
            la = resolve_layer(spec, model_depth(a, cfg.trust_remote_code))
            lb = resolve_layer(spec, model_depth(b, cfg.trust_remote_code))
            out = compare_folder(cfg, a, b, la, lb)
            inp, keys = _pair_inputs(reader, (a, b), (la, lb), texts)
            key = settings_hash(COMPARE_VERSION, keys, settings, corpus["hash"])
            old = load_done(out / SUMMARY, key)
            if old:
                say(f"compare {a} / {b}: unchanged, skipped")
                say(old.get("answer", ""))
                results[(a, b, spec_index)] = old
                continue
            results[(a, b, spec_index)] = _compare_pair(cfg, inp, out, key, reader.device)
    record_config(cfg)
    return results


def _compare_pair(cfg: Config, inp: Any, out: Path, key: str, device: Any) -> dict[str, Any]:
    """Run one comparison and write its folder; summary.json, written last, marks it done."""
    start = time.perf_counter()
    unmark(out / SUMMARY)
    result = run_pair(inp, cfg.compare)
    runs, s = result["runs"], result["settings"]
    n_docs = len(np.unique(result["units"].doc))
    numbers = headline_table(runs, s, n_docs)
    pairs, pair_r = pairs_table(runs, inp)
    partners = partners_table(inp, runs, s)
    probed = presence(inp, result, cfg.compare, device)
    if probed is not None:
        partners = with_presence(partners, probed[1])
    tables = {
        "partners.parquet": partners,
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
    if probed is not None:
        summary["presence"] = probed[0]
        summary["answer"] += "\n" + "\n".join(
            presence_sentence(probed[0], x, y, d)
            for d, (x, y) in (
                ("a_to_b", (inp.a.model, inp.b.model)),
                ("b_to_a", (inp.b.model, inp.a.model)),
            )
        )
    # written only once everything is computed; summary.json, last, marks the folder done
    for name, table in tables.items():
        with atomic_path(out / name) as tmp:
            pq.write_table(table, tmp, compression="zstd")
    summary = mark_done(out / SUMMARY, summary, [out / name for name in tables])
    say(summary["answer"])
    return summary


DICTIONARIES_VERSION = 2
"""Bump when the dictionaries stage changes what it writes for the same inputs."""


def dictionaries_stage(cfg: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """PCA, ICA and NMF dictionaries of every compared pair (at the first layer setting), run
    through the comparison the SAEs went through, with the same floors and ceilings; writes
    compare/<A>__<B>/dictionaries.json (skipped where unchanged). Returns {(A, B): record}."""
    run = prepare_run_dir(cfg)
    check_layers(cfg)
    pairs = compare_pairs(cfg)
    if not pairs:
        say("dictionaries: the run has one model, nothing to compare")
        return {}
    if not (cfg.compare.floor and cfg.compare.ceiling and comparing(cfg)):
        raise SamesheepError(
            "the dictionaries need the floor and the ceiling: set compare.floor and "
            "compare.ceiling to true and run `samesheep run` first"
        )
    corpus, texts, reader = _reading(cfg, run)
    dc = cfg.dictionaries
    spec = cfg.layers[0]
    results = {}
    for a, b in pairs:
        la = resolve_layer(spec, model_depth(a, cfg.trust_remote_code))
        lb = resolve_layer(spec, model_depth(b, cfg.trust_remote_code))
        out = compare_folder(cfg, a, b, la, lb)
        compared = read_json(out / SUMMARY, corrupt_is_missing=True)
        if not isinstance(compared, dict):
            raise SamesheepError(
                f"no comparison of {a} and {b} in {out}: run `samesheep compare` first"
            )
        key = settings_hash(
            DICTIONARIES_VERSION, compared.get("key"), dataclasses.asdict(dc), corpus["hash"]
        )
        old = load_done(out / DICTIONARIES, key)
        if old:
            say(f"dictionaries {a} / {b}: unchanged, skipped")
        else:
            old = _dictionaries_pair(cfg, reader, (a, b, la, lb), (texts, key, compared))
        for line in dictionary_lines(old):
            say(line)
        results[(a, b)] = old
    record_config(cfg)
    return results


def _dictionaries_pair(
    cfg: Config, reader: SideReader, pair: tuple[str, str, int, int], ctx: tuple
) -> dict[str, Any]:
    """Fit and compare every method's dictionaries of one pair; dictionaries.json, written
    last, marks it done. `ctx`: every document's text, the key, the SAE comparison's
    summary (its answer is the table's first row)."""
    a, b, la, lb = pair
    texts, key, compared = ctx
    dc = cfg.dictionaries
    out = compare_folder(cfg, a, b, la, lb)
    unmark(out / DICTIONARIES)
    inp, _ = _pair_inputs(reader, (a, b), (la, lb), texts)
    units = common_units(inp, cfg.compare)
    fa, fb = inp.floor  # type: ignore[misc]
    hidden = {
        role: side.store.rows(rows).numpy()  # type: ignore[union-attr]
        for role, side, rows in (
            ("a", inp.a, units.row_a),
            ("b", inp.b, units.row_b),
            ("fa", fa, units.row_a),
            ("fb", fb, units.row_b),
        )
    }
    plan = FitPlan(dc.fit_units, dc.seed)
    methods = {}
    for m in dc.method_list:
        s = DictionarySettings(m, dc.width, dc.nmf_passes if m == "nmf" else dc.ica_iter, dc.seed)
        done = compare_dictionary(hidden, units, (texts, reader.n_train), cfg.compare, s, plan)
        methods[m] = {
            **{k: v for k, v in done.items() if k != "headline"},
            "answer": {d: done["headline"]["raw"][d]["answer"] for d in ("a_to_b", "b_to_a")},
        }
    record = {
        "key": key,
        "model_a": a,
        "model_b": b,
        "layer_a": la,
        "layer_b": lb,
        "units": len(units),
        "compare_key": compared.get("key"),  # the SAE comparison its first row was read from
        "sae": {d: compared["headline"]["raw"][d]["answer"] for d in ("a_to_b", "b_to_a")},
        "methods": methods,
        "settings": dataclasses.asdict(dc),
    }
    return mark_done(out / DICTIONARIES, record)


def dictionary_lines(record: dict[str, Any], key: str = "share_r0.5") -> list[str]:
    """One line per dictionary and direction: its share with a partner at r >= 0.5 against
    its floor and ceiling, and the normalised score with its interval."""
    a, b = record["model_a"], record["model_b"]
    rows = [("SAE", record["sae"])] + [
        (m.upper(), v["answer"]) for m, v in record["methods"].items()
    ]
    lines = [f"Dictionaries of {a} and {b} (share of latents with a partner at r >= 0.5):"]
    for name, answers in rows:
        for d, (x, y) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
            e = answers[d]
            lo, hi = e.get("intervals", {}).get(key, {}).get("normalised", [math.nan] * 2)
            lines.append(
                f"  {name:4s} {x} -> {y}: {e['raw'][key]:.2f} (floor {e['floor'][key]:.2f}, "
                f"ceiling {e['ceiling'][key]:.2f}); normalised {e['normalised'][key]:.2f} "
                f"(95% CI {lo:.2f} to {hi:.2f})"
            )
    return lines
