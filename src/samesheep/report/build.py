"""The report stage: one static site per run, from the files the other stages wrote.

report/index.html        the question, the answer for every pair, SAE quality, plots
report/feature.html      one latent (?sae=<model>.L<layer>&latent=<i>)
report/pair.html         one matched pair side by side (?cmp=<A>__<B>&rank=<k>)
report/latents.html      every latent of a pair, searchable and sortable (?cmp=...)
report/assets/           the style sheet and the one script every page loads
report/data/             data files loaded as scripts, one per page or block of latents
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors.numpy import load_file

from ..compare.crosscode import CROSSCODE_VERSION
from ..core.cache import load_done, mark_done
from ..core.config import Config, settings_hash
from ..core.constants import CROSSCODER, DICTIONARIES, SUMMARY
from ..core.errors import SamesheepError
from ..core.files import pid_temporary, read_json
from ..core.plan import compare_pairs, sae_runs
from ..core.progress import say, step
from ..core.rundir import (
    MAIN_SAE,
    causal_folder,
    codes_dir,
    compare_folder,
    corpus_dir,
    features_dir,
    layer_dir,
    layer_name,
    pair_folder,
    prepare_run_dir,
    record_config,
    report_dir,
    run_path,
    sae_dir,
    safe_name,
    timings_file,
)
from ..data.alignment import TokenRows
from ..data.corpus import CorpusReader
from ..lm.models import model_depth, resolve_layer
from ..sae.codes import read_codes
from ..sae.model import concat_codes
from ..sae.saelens import read_sae_config
from ..sae.stage import METRICS, layer_store
from ..sae.training import token_filter
from . import overview
from .beside import ModelPair, beside_keys, beside_runs, beside_view
from .causal import causal_order, causal_pairs, causal_summary
from .data import (
    FeatureData,
    PairLatents,
    TokenIndex,
    latent_map,
    pair_window,
    read_features,
    sig,
)
from .layers import layers_view
from .site import copy_assets, site_size, write_data, write_page

REPORT_VERSION = 1
"""Bump when the report changes what it writes for the same run."""


@dataclass
class SaePage:
    """One SAE whose latents get feature pages: the main SAE of a model's layer."""

    key: str  # "<model folder>.L<layer>": the URL and data name
    model: str
    name: str  # the model's short name, for headings
    layer: int
    folder: Path  # the layer folder


@dataclass
class ComparisonPage:
    key: str  # "<A folder>__<B folder>" (+ ".L<a>-<b>" where the run compares several layers)
    a: SaePage
    b: SaePage
    folder: Path
    summary: dict[str, Any]
    causal_folder: Path | None = None  # where `samesheep causal` has run for the pair
    causal: dict[str, Any] | None = None  # its summary
    dictionaries: dict[str, Any] | None = None  # `samesheep dictionaries`, where it has run
    crosscoder: dict[str, Any] | None = None  # `samesheep crosscode`, where it has run


def short_name(source: str) -> str:
    """A model's name for headings: its folder name."""
    return safe_name(source)


def report_stage(cfg: Config) -> Path:
    """Write run_dir/report (skipped when the run's files have not changed); returns the
    index page."""
    run = prepare_run_dir(cfg)
    rc = cfg.report
    saes: dict[tuple[str, int], SaePage] = {}
    for source in cfg.models:
        depth = model_depth(source, cfg.trust_remote_code)
        for spec in cfg.layers:
            layer = resolve_layer(spec, depth)
            folder = layer_dir(run, source, layer)
            if not (features_dir(folder) / SUMMARY).is_file():
                raise SamesheepError(
                    f"no features for {source} layer {layer}: run `samesheep features` "
                    "(or `samesheep run`) first"
                )
            key = f"{safe_name(source)}.L{layer}"
            saes[(source, layer)] = SaePage(key, source, short_name(source), layer, folder)
    comparisons = []
    multi = len(cfg.layers) > 1
    for spec in cfg.layers:
        for a, b in compare_pairs(cfg):
            la = resolve_layer(spec, model_depth(a, cfg.trust_remote_code))
            lb = resolve_layer(spec, model_depth(b, cfg.trust_remote_code))
            folder = compare_folder(cfg, a, b, la, lb)
            summary = read_json(folder / SUMMARY, corrupt_is_missing=True)
            if not summary:
                raise SamesheepError(
                    f"no comparison of {a} and {b} in {folder}: run `samesheep compare` "
                    "(or `samesheep run`) first"
                )
            if not overview.has_answer(summary):
                raise SamesheepError(
                    f"the comparison in {folder} predates the fixed-source floor and ceiling: "
                    "run `samesheep compare` again"
                )
            key = f"{safe_name(a)}__{safe_name(b)}" + (f".L{la}-{lb}" if multi else "")
            page = ComparisonPage(key, saes[(a, la)], saes[(b, lb)], folder, summary)
            causal_at = causal_folder(cfg, a, b, la, lb)
            page.causal = causal_summary(causal_at)
            page.causal_folder = causal_at if page.causal else None
            done = read_json(folder / DICTIONARIES, corrupt_is_missing=True)
            if isinstance(done, dict) and done.get("compare_key") == summary.get("key"):
                page.dictionaries = done  # not one made beside an older comparison
            done = read_json(folder / CROSSCODER, corrupt_is_missing=True)
            if (
                isinstance(done, dict)
                and done.get("compare_key") == summary.get("key")
                and done.get("version") == CROSSCODE_VERSION
            ):
                page.crosscoder = done  # its tie back read this comparison, in this layout
            comparisons.append(page)

    for sae in saes.values():  # every input checked before any work starts
        _check_tables(sae.folder / "features", ("feature_table", "exemplars"), "features")
    for c in comparisons:
        _check_tables(c.folder, ("partners", "pairs", "families"), "compare")
    inputs = [read_json(features_dir(s.folder) / SUMMARY).get("key") for s in saes.values()]
    inputs += [  # the interpret stage's explanations, where it has run
        (read_json(s.folder / "features" / "explanations.json", True) or {}).get("key")
        for s in saes.values()
    ]
    inputs += [c.summary.get("key") for c in comparisons]
    inputs += [c.causal.get("key") for c in comparisons if c.causal]  # where it has run
    inputs += [c.dictionaries.get("key") for c in comparisons if c.dictionaries]
    inputs += [c.crosscoder.get("key") for c in comparisons if c.crosscoder]
    layer_folders = {}  # per pair of models whose layers stage has run
    for a, b in compare_pairs(cfg):
        done = read_json(pair_folder(cfg, a, b) / "layers.json", corrupt_is_missing=True)
        if done:
            layer_folders[(a, b)] = pair_folder(cfg, a, b)
            inputs.append(done.get("key"))
    others = beside_runs(cfg, compare_pairs(cfg))
    # (not the stage times: a rerun that does nothing must not rebuild the site)
    key = settings_hash(
        REPORT_VERSION,
        _code_hash(),
        asdict(rc),
        inputs,
        {k: m.get("key") for k, m in saes_metrics(cfg).items()},
        beside_keys(others),
    )
    root = report_dir(run)
    if load_done(root / "manifest.json", key):
        say(f"report unchanged, skipped: {root / 'index.html'}")
        record_config(cfg)
        return root / "index.html"

    start = time.perf_counter()
    layer_views = {}
    for (a, b), folder in layer_folders.items():
        view = layers_view(folder, short_name(a), short_name(b))
        if view is not None:
            layer_views[(a, b)] = view
    stage = pid_temporary(run, "report")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        sizes = build_site(cfg, stage, list(saes.values()), comparisons, layer_views, others)
        site = [p for p in sorted(stage.rglob("*")) if p.is_file()]
        mark_done(stage / "manifest.json", {"key": key, **sizes}, site)
        _swap_in(stage, root)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    files, total, largest = site_size(root)
    seconds = time.perf_counter() - start
    say(
        f"report: {files:,} files, {total / 1e6:,.1f} MB (largest {largest / 1e6:,.2f} MB) "
        f"in {seconds:,.0f} s: {root / 'index.html'}"
    )
    record_config(cfg)
    return root / "index.html"


def _check_tables(folder: Path, names: tuple[str, ...], stage: str) -> None:
    """Fail in one line where a table the site reads is missing or damaged."""
    for name in names:
        path = folder / f"{name}.parquet"
        try:
            pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise SamesheepError(
                f"cannot read {path} ({str(e).splitlines()[0]}): run `samesheep {stage}` again"
            ) from None


def _code_hash() -> str:
    """A hash of the report's own code, templates and assets: a site built by other code is
    built again."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*")):
        if path.suffix in (".py", ".html", ".css", ".js"):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def _swap_in(stage: Path, root: Path) -> None:
    """Put the finished site in place of the old one (never a half-written site)."""
    old = pid_temporary(root.parent, "report-old")
    if root.exists():
        root.rename(old)
    stage.rename(root)
    shutil.rmtree(old, ignore_errors=True)


def saes_metrics(cfg: Config) -> dict[str, dict[str, Any]]:
    """metrics.json of every SAE the run trained (the models', the floors', the ceilings'),
    keyed "<model folder>/layer_<L>/<sae>"."""
    run = run_path(cfg)
    out = {}
    for sr in sae_runs(cfg):
        depth = model_depth(sr.source, cfg.trust_remote_code)
        for spec in cfg.layers:
            layer = resolve_layer(spec, depth)
            rel = f"{safe_name(sr.source)}/{layer_name(layer)}/{sr.sae_name}"
            metrics = read_json(run / rel / METRICS, corrupt_is_missing=True)
            if metrics:
                out[rel] = {"source": sr.source, "sae": sr.sae_name, "layer": layer, **metrics}
    return out


def build_site(
    cfg: Config,
    root: Path,
    saes: list[SaePage],
    comparisons: list[ComparisonPage],
    layer_views: dict[tuple[str, str], dict[str, Any]] | None = None,
    others: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every page and data file of the site, into root; `others`: beside_runs, the runs
    whose answers the overview shows beside this run's."""
    rc = cfg.report
    n_train = CorpusReader(corpus_dir(run_path(cfg))).count("train")
    copy_assets(root)
    features: dict[str, FeatureData] = {}
    bytes_by_kind: dict[str, int] = {}

    def add(kind: str, n: int) -> None:
        bytes_by_kind[kind] = bytes_by_kind.get(kind, 0) + n

    for sae in saes:
        with step(f"report: {sae.name} layer {sae.layer} feature pages"):
            fd = read_features(
                sae.folder / "features",
                rc.top_exemplars,
                rc.per_bin,
                rc.context_tokens,
                rc.pair_exemplars,
                n_train,
            )
            features[sae.key] = fd
            add(
                "features",
                write_data(
                    root,
                    f"i/{sae.key}",
                    {"d_sae": fd.d_sae, "edges": fd.histogram_edges, **fd.index},
                ),
            )
            for lo in range(0, fd.d_sae, rc.block):
                block = {
                    i: fd.records[i]
                    for i in range(lo, min(lo + rc.block, fd.d_sae))
                    if i in fd.records
                }
                add("features", write_data(root, f"f/{sae.key}/{lo // rc.block}", block))
    pages = []
    for c in comparisons:
        with step(f"report: {c.key} pairs and latent table"):
            page = comparison_data(cfg, root, c, features, n_train, add)
        models = ModelPair(c.a.model, c.b.model, c.a.name, c.b.name)
        page["beside"] = beside_view(cfg, c.summary, others or [], models)
        pages.append(page)
    run_info = overview.run_info(
        cfg, saes_metrics(cfg), read_json(timings_file(run_path(cfg)), corrupt_is_missing=True)
    )
    site = {
        "saes": {
            s.key: {"name": s.name, "model": s.model, "layer": s.layer, "block": rc.block}
            for s in saes
        },
        "comparisons": {
            p["key"]: {k: p[k] for k in ("a", "b", "lists", "pair_block", "surface", "surface_r")}
            for p in pages
        },
        "layers": bool(layer_views),
    }
    layer_pairs, shown = [], set()
    for p, c in zip(pages, comparisons, strict=True):  # each pair's view once, on its first
        pair = (c.a.model, c.b.model)
        p["layers"] = None
        if layer_views and pair in layer_views and pair not in shown:
            shown.add(pair)
            view = layer_views[pair]
            p["layers"] = {**view, "headline": view["metrics"][0]}
            layer_pairs.append(
                {"key": p["key"], "name_a": c.a.name, "name_b": c.b.name, "layers": view}
            )
    if layer_pairs:
        add(
            "pages",
            write_page(
                root,
                "layers.html",
                "layers.html",
                site=site,
                run=run_info,
                pairs=layer_pairs,
                page="layers.html",
            ),
        )
    for name, template in (
        ("feature.html", "feature.html"),
        ("pair.html", "pair.html"),
        ("latents.html", "latents.html"),
    ):
        add("pages", write_page(root, name, template, site=site, run=run_info, page=name))
    add(
        "pages",
        write_page(
            root,
            "index.html",
            "index.html",
            site=site,
            run=run_info,
            comparisons=pages,
            page="index.html",
        ),
    )
    return {"bytes": bytes_by_kind}


def comparison_data(
    cfg: Config,
    root: Path,
    c: ComparisonPage,
    features: dict[str, FeatureData],
    n_train: int,
    add: Any,
) -> dict[str, Any]:
    """The data files of one comparison (partners, pairs, pair windows, map) and what its
    section of the overview shows."""
    rc = cfg.report
    partners = pq.read_table(c.folder / "partners.parquet")
    pairs = pq.read_table(c.folder / "pairs.parquet")
    cols = {}
    for side in ("a", "b"):
        t = partners.filter(pc.equal(partners["side"], side))
        cols[side] = {
            name: [sig(v) if isinstance(v, float) else v for v in t.column(name).to_pylist()]
            for name in t.column_names
            if name not in ("side", "model")
        }
    add("compare", write_data(root, f"p/{c.key}", cols))
    order = np.argsort(-pairs.column("r").to_numpy(), kind="stable")
    pr = pairs.take(order).to_pydict()
    beyond = pr.get("beyond_surface")  # absent where the run has no floor
    matched = [
        [a, b, sig(r), bool(m), None if beyond is None else bool(beyond[i])]
        for i, (a, b, r, m) in enumerate(
            zip(pr["latent_a"], pr["latent_b"], pr["r"], pr["mutual"], strict=True)
        )
    ]
    lists = pair_lists(matched, rc.pair_min_r, rc.max_pairs)
    causal = {}
    if c.causal_folder is not None:  # the causal check's sampled pairs get pages too
        texts = CorpusReader(corpus_dir(run_path(cfg))).texts()
        causal = causal_pairs(c.causal_folder, texts)
        index = {(m[0], m[1]): i for i, m in enumerate(matched)}
        lists["causal"] = [index[k] for k in causal_order(causal) if k in index]
    surface = {
        side: [sig(v) for v in pr[f"surface_r_{side}"]] if f"surface_r_{side}" in pr else None
        for side in ("a", "b")
    }
    add("compare", write_data(root, f"q/{c.key}", {"pairs": matched, "lists": lists}))
    fa, fb = features[c.a.key], features[c.b.key]
    ta, tb = token_index(cfg, c.a), token_index(cfg, c.b)
    for name, members in lists.items():
        for lo in range(0, len(members), rc.pair_block):
            block = {}
            for rank in range(lo, min(lo + rc.pair_block, len(members))):
                i = members[rank]
                la, lb, r, mutual, _ = matched[i]
                latents = PairLatents(la, lb, ta, tb)
                windows = [
                    pair_window(row, w, "a", latents) for row, w in fa.top_windows.get(la, [])
                ]
                windows += [
                    pair_window(row, w, "b", latents) for row, w in fb.top_windows.get(lb, [])
                ]
                block[rank] = {
                    "a": la,
                    "b": lb,
                    "r": r,
                    "mutual": mutual,
                    "index": i,
                    "surface_a": surface["a"] and surface["a"][i],
                    "surface_b": surface["b"] and surface["b"][i],
                    "windows": windows,
                    "causal": causal.get((la, lb)),
                }
            add("pairs", write_data(root, f"pp/{c.key}/{name}/{lo // rc.pair_block}", block))
    shown = [matched[i] for members in lists.values() for i in members]
    centroids = [_centroids(s.folder) for s in (c.a, c.b)]
    coords = latent_map(*centroids)
    if coords is not None:
        links = [[a, b, r] for a, b, r, _, _ in shown if r >= 0.5]
        add("compare", write_data(root, f"m/{c.key}", {**coords, "links": links}))
    return {
        "key": c.key,
        "a": c.a.key,
        "b": c.b.key,
        "name_a": c.a.name,
        "name_b": c.b.name,
        "lists": {name: len(members) for name, members in lists.items()},
        "list_names": PAIR_LISTS,
        "surface": beyond is not None,
        "pair_block": rc.pair_block,
        "map": coords is not None,
        "causal": c.causal.get("answer", "") if c.causal else "",
        "dictionaries": (
            overview.dictionary_rows(c.dictionaries, c.a.name, c.b.name) if c.dictionaries else []
        ),
        "crosscoder": (
            overview.crosscoder_view(c.crosscoder, c.a.name, c.b.name) if c.crosscoder else None
        ),
        **overview.comparison_view(c.summary, c.a.name, c.b.name),
    }


PAIR_LISTS = {
    "beyond": "the best pairs beyond the surface",
    "surface": "the surface pairs",
    "all": "the best matched pairs",
    "causal": "the pairs of the causal check",
}
"""The lists of pair pages: where the run has a floor, the pairs whose latents both lie
beyond the surface (surface r < 0.5) come first, the surface pairs one click away; where
`samesheep causal` has run, the pairs it sampled, highest causal agreement first."""


def pair_lists(matched: list[list[Any]], min_r: float, most: int) -> dict[str, list[int]]:
    """The pairs that get a page, by list (indices into `matched`, best r first): "beyond"
    and "surface" where each pair says whether it lies beyond the surface, else "all";
    pairs with r >= min_r, at most `most` per list."""
    good = [i for i, p in enumerate(matched) if p[2] is not None and p[2] >= min_r]
    if not matched or matched[0][4] is None:
        return {"all": good[:most]}
    return {
        "beyond": [i for i in good if matched[i][4]][:most],
        "surface": [i for i in good if not matched[i][4]][:most],
    }


def _centroids(layer_dir: Path) -> np.ndarray | None:
    path = layer_dir / "features" / "centroids.safetensors"
    return load_file(str(path))["centroids"] if path.is_file() else None


def token_index(cfg: Config, sae: SaePage) -> TokenIndex:
    """The model's tokens and its SAE's codes, for windows of any text (the pair pages)."""
    store = layer_store(cfg, sae.model, sae.layer)  # per token or per text
    tokens = token_filter(store, cfg.train)
    n_train = CorpusReader(corpus_dir(run_path(cfg))).count("train")
    rows = TokenRows.of(store, tokens, n_train)
    codes = concat_codes(
        [c.codes for c in read_codes(codes_dir(sae.folder, MAIN_SAE), store, tokens)]
    )
    d_sae = read_sae_config(sae_dir(sae.folder, MAIN_SAE)).d_sae
    return TokenIndex(rows.doc, rows.start, rows.end, rows.gid, codes, d_sae)
