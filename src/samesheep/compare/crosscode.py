"""The crosscode stage: a crosscoder of every compared pair (or of every model at once), on
the aligned units, beside its fixed-source floor and ceiling, tied back to the SAE
comparison. Writes compare/<A>__<B>/crosscoder.json (its done marker) and each crosscoder
under compare/<A>__<B>/crosscoder/<role>/."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from ..core.cache import load_done, mark_done, unmark
from ..core.config import Config, settings_hash
from ..core.constants import CROSSCODER, SUMMARY
from ..core.device import choose_device, choose_dtype, set_threads
from ..core.errors import SamesheepError
from ..core.files import read_json
from ..core.plan import compare_pairs, comparing, random_copy
from ..core.progress import say, step
from ..core.rundir import (
    MAIN_SAE,
    compare_folder,
    corpus_dir,
    corpus_manifest,
    layer_dir,
    layer_name,
    prepare_run_dir,
    record_config,
    run_path,
    sae_dir,
    safe_name,
)
from ..data.alignment import TokenRows, align, same_tokens
from ..data.store import Store
from ..lm.models import load_model, model_depth, resolve_layer
from ..lm.stage import check_layers
from ..sae.crosscoder import (
    WEIGHTS,
    Crosscoder,
    CrosscoderShape,
    CrosscodeSettings,
    Workplace,
    load_crosscoder,
    train_crosscoder,
)
from ..sae.evaluation import SpliceAt, spliced_metrics
from ..sae.model import Sae, SparseCodes
from ..sae.saelens import load_sae
from ..sae.stage import NOT_IN_TRAIN_KEY, layer_store, splice_documents, splice_settings
from ..sae.training import token_filter
from .correlation import TopPartners, correlation_blocks, gather_rows
from .crosscoder import (
    Thresholds,
    class_names,
    class_shares,
    fires,
    fvu_each,
    latent_classes,
    sae_fvu,
    shared_share,
)
from .pair import HEADLINE_R
from .stage import compare_corpus

CROSSCODE_VERSION = 4
"""Bump when the stage changes what it writes for the same crosscoders."""
TRAINING_VERSION = 1
"""Bump when training changes the crosscoders it makes for the same settings."""
ROLES = ("main", "floor", "ceiling")
STATE = "state.json"
"""A trained crosscoder's done marker, in its folder: its key and training summary."""
SENSITIVITY = (0.3, 0.4, 0.45)
"""Lower ends of the relative-norm band a latent must lie in to be shared (two models), at
which the shares are also recorded."""
NOT_IN_TRAINING = ("exclusive", "shared", "all_models")
"""crosscode settings that change the reading of a crosscoder, not the crosscoder."""


@dataclasses.dataclass
class Group:
    """The models one crosscoder reads, their aligned units and activations there."""

    models: list[str]
    layers: list[int]
    stores: list[Store]
    floors: list[Store]  # the untrained copies of every model but the first
    token_rows: list[TokenRows]  # every model's token rows (the units' windows and positions)
    rows: list[np.ndarray]  # [units] store row of each unit's last token, per model
    floor_rows: list[np.ndarray]
    doc: np.ndarray  # [units] global document number


def crosscode_stage(cfg: Config) -> dict[tuple[str, ...], dict[str, Any]]:
    """Train and read the crosscoders of the run (at the first layer setting), skipped where
    unchanged. Returns {models: record}."""
    run = prepare_run_dir(cfg)
    check_layers(cfg)
    pairs = compare_pairs(cfg)
    if not pairs:
        say("crosscode: the run has one model, nothing to compare")
        return {}
    if not (cfg.compare.floor and comparing(cfg)):
        raise SamesheepError(
            "the crosscoder's floor needs the untrained copies: set compare.floor to true and "
            "run `samesheep run` first"
        )
    corpus = read_json(corpus_manifest(run))
    if not corpus:
        raise SamesheepError(f"no corpus in {corpus_dir(run)}: run `samesheep run` first")
    info, texts, n_train = compare_corpus(run)
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    groups = [tuple(cfg.models)] if cfg.crosscode.all_models else pairs
    set_threads(cfg.train.threads)
    results = {}
    for models in groups:
        layers = [
            resolve_layer(cfg.layers[0], model_depth(m, cfg.trust_remote_code)) for m in models
        ]
        out = group_folder(cfg, list(models), layers)
        compare_key = None  # the SAE comparison a pair's tie back reads
        if len(models) == 2:
            compared = read_json(out / SUMMARY, corrupt_is_missing=True)
            if not isinstance(compared, dict):
                raise SamesheepError(
                    f"no comparison of {models[0]} and {models[1]} in {out}: run "
                    "`samesheep compare` first"
                )
            compare_key = compared.get("key")
        group = read_group(cfg, list(models), layers, (lengths, n_train))
        for store in group.stores + group.floors:
            info.check(store)
        key = settings_hash(
            CROSSCODE_VERSION,
            training_key(cfg, group, corpus["hash"]),
            dataclasses.asdict(cfg.crosscode),
            compare_key,
        )
        record = load_done(out / CROSSCODER, key)
        if record:
            say(f"crosscode {' / '.join(models)}: unchanged, skipped")
        else:
            unmark(out / CROSSCODER)
            ctx = (key, corpus["hash"], n_train, compare_key)
            record = crosscode_group(cfg, group, out, ctx)
        for line in crosscoder_lines(record):
            say(line)
        results[tuple(models)] = record
    record_config(cfg)
    return results


def group_folder(cfg: Config, models: list[str], layers: list[int]) -> Path:
    """Where a crosscoder's results go: the pair's comparison folder, or for three or more
    models compare/<m1>__<m2>__...."""
    if len(models) == 2:
        return compare_folder(cfg, models[0], models[1], layers[0], layers[1])
    out = run_path(cfg) / "compare" / "__".join(safe_name(m) for m in models)
    return out / "__".join(layer_name(L) for L in layers) if len(cfg.layers) > 1 else out


def read_group(
    cfg: Config, models: list[str], layers: list[int], corpus: tuple[np.ndarray, int]
) -> Group:
    """The models' stores and the units every model shares with the first (a unit of several
    models is a span that is a unit of each pair with the first model), kept where the
    untrained copies keep their tokens too."""
    lengths, n_train = corpus
    stores = [layer_store(cfg, m, L) for m, L in zip(models, layers, strict=True)]
    floors = [
        layer_store(cfg, random_copy(m), L) for m, L in zip(models[1:], layers[1:], strict=True)
    ]
    token_rows = [TokenRows.of(s, token_filter(s, cfg.train), n_train) for s in stores + floors]
    first, others, floor_rows = (
        token_rows[0],
        token_rows[1 : len(models)],
        token_rows[len(models) :],
    )
    for rows, floor, model in zip(others, floor_rows, models[1:], strict=True):
        if not same_tokens(rows, floor):
            raise SamesheepError(
                f"the stores of {model} and {random_copy(model)} hold different tokens: "
                "extract both again with the same settings"
            )
    rows, doc = units_of_all(first, others, lengths, cfg.compare.after_break)
    kept = np.ones(len(doc), dtype=bool)  # the untrained copies have their own outlier limits
    for r, floor in zip(rows[1:], floor_rows, strict=True):
        kept &= floor.gid[r] >= 0
    rows, doc = [r[kept] for r in rows], doc[kept]
    if len(rows[0]) < 2:
        raise SamesheepError(f"{' / '.join(models)} share {len(rows[0])} aligned units: too few")
    return Group(models, layers, stores, floors, token_rows[: len(models)], rows, rows[1:], doc)


def units_of_all(
    first: TokenRows, others: list[TokenRows], lengths: np.ndarray, after_break: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """([store rows of each unit's last token, per model], [units] global document): the
    spans that are units of every pair (first model, another model), in the first model's
    order."""
    width = int(lengths.max(initial=0)) + 1
    keep, matched, base = None, [], None
    for rows in others:
        units = align(first, rows, lengths, after_break)
        span = units.row_a * width + units.start  # a unit: its last row and its start
        if base is None:
            base = (span, units.row_a, units.doc)
            keep = np.ones(len(span), dtype=bool)
        _, here, there = np.intersect1d(base[0], span, assume_unique=True, return_indices=True)
        hit = np.zeros(len(base[0]), dtype=bool)
        hit[here] = True
        keep &= hit
        full = np.full(len(base[0]), -1, dtype=np.int64)
        full[here] = units.row_b[there]
        matched.append(full)
    assert base is not None and keep is not None, "a crosscoder reads two or more models"
    return [base[1][keep]] + [m[keep] for m in matched], base[2][keep]


def training_key(cfg: Config, group: Group, corpus_hash: str) -> str:
    """What every crosscoder of the group is trained from: the stores, the units, the train
    and crosscode settings."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in NOT_IN_TRAIN_KEY}
    cross = {k: v for k, v in dataclasses.asdict(cfg.crosscode).items() if k not in NOT_IN_TRAINING}
    stores = [s.manifest["key"] for s in group.stores + group.floors]
    return settings_hash(TRAINING_VERSION, stores, len(group.doc), train, cross, corpus_hash)


def role_blocks(group: Group, seed: int) -> dict[str, list[torch.Tensor]]:
    """Each role's activations per model [units, d_i]: the models (main); the first model
    with the others' untrained copies (floor); the first model with random rotations of
    itself (ceiling: models that represent exactly what it does)."""
    main = [s.rows(r) for s, r in zip(group.stores, group.rows, strict=True)]
    floor = [main[0]] + [s.rows(r) for s, r in zip(group.floors, group.floor_rows, strict=True)]
    ceiling = [main[0]]
    for j in range(1, len(main)):
        g = torch.Generator().manual_seed(seed * 1000 + j)
        q, _ = torch.linalg.qr(torch.randn(main[0].shape[1], main[0].shape[1], generator=g))
        ceiling.append(main[0] @ q)
    return {"main": main, "floor": floor, "ceiling": ceiling}


def crosscode_group(cfg: Config, group: Group, out: Path, ctx: tuple) -> dict[str, Any]:
    """Train (or load) the three crosscoders of a group, read them and write crosscoder.json.
    `ctx`: (the record's key, the corpus hash, training documents, the key of the SAE
    comparison the tie back reads, None for three or more models)."""
    key, corpus_hash, n_train, ctx_compare_key = ctx
    xc = cfg.crosscode
    blocks = role_blocks(group, xc.seed)
    train_rows = np.flatnonzero(group.doc < n_train)
    held = torch.from_numpy(np.flatnonzero(group.doc >= n_train))
    widths = tuple(b.shape[1] for b in blocks["main"])
    d_sae = xc.width or round(cfg.train.expansion_factor * float(np.mean(widths)))
    base = training_key(cfg, group, corpus_hash)
    t = Thresholds(xc.exclusive, xc.shared)
    m = len(group.models)
    roles: dict[str, Any] = {}
    read: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for role in ROLES:
        shape = CrosscoderShape(
            tuple(b.shape[1] for b in blocks[role]), d_sae, xc.k or cfg.train.k, xc.dedicated
        )
        settings = CrosscodeSettings(shape, xc.train_units, xc.seed)
        place = Workplace(
            out / "crosscoder" / role, settings_hash(base, role), f"crosscoder ({role})"
        )
        cc, summary = trained(cfg, blocks[role], train_rows, settings, place)
        how = Reading(t, cfg.compare.min_fires, _names(group, role))
        roles[role], read["raw" if role == "main" else role], codes = read_crosscoder(
            cc, blocks[role], held, how
        )
        roles[role]["training"] = summary
        if role == "main":
            main_cc, main_codes = cc, codes
    saes = own_saes(cfg, group)
    with torch.no_grad():
        sae_codes = [sae.encode_sparse(x) for sae, x in zip(saes, blocks["main"], strict=True)]
    own = {
        model: sae_fvu(sae, x[held], c.take(held))
        for model, sae, x, c in zip(group.models, saes, blocks["main"], sae_codes, strict=True)
    }
    recon = main_cc.reconstruct(main_codes.take(held))
    spliced = spliced_scores(cfg, group, saes, [r.cpu() for r in recon], n_train)
    record = {
        "key": key,
        "version": CROSSCODE_VERSION,
        "models": group.models,
        "layers": group.layers,
        "units": len(group.doc),
        "training_units": len(train_rows),
        "heldout_units": len(held),
        "width": d_sae,
        "k": xc.k or cfg.train.k,
        "dedicated": xc.dedicated,
        "thresholds": dataclasses.asdict(t),
        "min_fires": cfg.compare.min_fires,
        "roles": roles,
        "shared": shared_share(read, m, xc.seed),
        "own_sae_fvu": own,
        "compare_key": ctx_compare_key,
        "ce_loss_recovered": spliced,
    }
    if m == 2:
        followed = [(c, sae.cfg.d_sae) for c, sae in zip(sae_codes, saes, strict=True)]
        main = (main_codes, main_cc.shape.d_sae, read["raw"])
        record["tie_back"] = tie_back(out, group.models, main, followed)
    return mark_done(out / CROSSCODER, record)


@dataclasses.dataclass(frozen=True)
class Reading:
    """How a crosscoder's latents are read: the class thresholds, the units a latent must
    fire on to count as live, and the models' names (in the order of its blocks)."""

    thresholds: Thresholds
    min_fires: int
    names: list[str]


def read_crosscoder(
    cc: Crosscoder, blocks: list[torch.Tensor], held: torch.Tensor, how: Reading
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray], SparseCodes]:
    """(its record: live latents, class shares, the shared share at narrower bands, each
    model's FVU on the units `held`, the relative-norm histogram; (classes, live); its codes
    of every unit)."""
    m = cc.shape.models
    codes = cc.encode(blocks)
    live = fires(codes, cc.shape.d_sae) >= how.min_fires
    rel = cc.relative_norms().cpu().numpy()
    classes = latent_classes(rel, how.thresholds)
    with step("crosscoder: held-out reconstruction"):
        fvu = fvu_each(cc, [b[held] for b in blocks], codes.take(held))
    shares = class_shares(classes, live, m).tolist()
    entry = {
        "live": int(live.sum()),
        "classes": class_names(how.names),  # the order of the classes (JSON sorts keys)
        "shares": dict(zip(class_names(how.names), shares, strict=True)),
        "shared_at": {  # the shared share had the band been narrower
            f"{lo:g}-{1 - lo:g}": float(((rel[live] >= lo * 2 / m).all(1)).mean())
            for lo in SENSITIVITY
        },
        "fvu": fvu,
        "relative_norm_histogram": np.histogram(rel[live, 0], bins=20, range=(0, 1))[0].tolist(),
    }
    return entry, (classes, live), codes


def _names(group: Group, role: str) -> list[str]:
    first, others = group.models[0], group.models[1:]
    if role == "floor":
        return [first, *(random_copy(o) for o in others)]
    if role == "ceiling":
        return [first, *(f"{first} rotated {j}" for j in range(1, len(group.models)))]
    return group.models


def trained(
    cfg: Config,
    blocks: list[torch.Tensor],
    rows: np.ndarray,
    s: CrosscodeSettings,
    place: Workplace,
) -> tuple[Crosscoder, dict[str, Any]]:
    """A crosscoder trained under place.key: loaded where done, else trained (resuming)."""
    marker, weights = place.folder / STATE, place.folder / WEIGHTS
    done = load_done(marker, place.key)
    if done:
        try:
            return load_crosscoder(weights), done["summary"]
        except SamesheepError:
            pass  # unreadable: train again (from the checkpoint)
    cc, summary = train_crosscoder(blocks, rows, cfg.train, s, place)
    cc.save(weights)
    mark_done(marker, {"key": place.key, "summary": summary}, [weights])
    rate = summary["units_per_second"]
    say(
        f"{place.label}: {s.shape.d_sae:,} latents, {summary['units']:,} units"
        + (f" at {rate:,.0f} units/s" if rate else "")
    )
    return cc, summary


def own_saes(cfg: Config, group: Group) -> list[Sae]:
    """Each model's own SAE, on the CPU."""
    return [
        load_sae(sae_dir(layer_dir(run_path(cfg), model, layer), MAIN_SAE), d_in=store.d_model)
        for model, layer, store in zip(group.models, group.layers, group.stores, strict=True)
    ]


def spliced_scores(
    cfg: Config, group: Group, saes: list[Sae], recon: list[torch.Tensor], n_train: int
) -> dict[str, dict[str, Any]]:
    """Each model's CE loss recovered with the crosscoder's reconstruction `recon` (of the
    held-out units, per model) spliced in at the held-out units' last tokens, and with its
    own SAE (`saes`) at the same positions (zero-ablation there is the scores' 0), on the first
    train.splice_tokens held-out tokens. {} where train.splice_tokens is 0."""
    if cfg.train.splice_tokens <= 0:
        return {}
    device = choose_device(cfg.train.device)
    dtype = choose_dtype(cfg.extract.dtype, device)
    held = group.doc >= n_train
    out = {}
    for i, (model, layer, store) in enumerate(
        zip(group.models, group.layers, group.stores, strict=True)
    ):
        tr, rows = group.token_rows[i], group.rows[i][held]
        keys = zip(
            (tr.doc[rows] - n_train).tolist(),
            tr.window[rows].tolist(),
            tr.position[rows].tolist(),
            strict=True,
        )
        at = {key: j for j, key in enumerate(keys)}
        settings = splice_settings(store, token_filter(store, cfg.train))
        docs = splice_documents(cfg, store)
        lm = load_model(model, dtype, device, cfg.trust_remote_code)
        sae = saes[i].to(device)
        with step(f"crosscoder: {model} with the crosscoder and with its own SAE spliced in"):
            crossed = spliced_metrics(
                lm,
                layer,
                sae,
                docs,
                dataclasses.replace(settings, at=SpliceAt(at, recon[i])),
                device,
            )
            own = spliced_metrics(
                lm, layer, sae, docs, dataclasses.replace(settings, at=SpliceAt(at)), device
            )
        out[model] = {
            "crosscoder": crossed["ce_loss_score"],
            "own_sae": own["ce_loss_score"],
            "ce_clean": own["ce_clean"],
            "ce_zero": own["ce_zero"],
            "ce_crosscoder": crossed["ce_spliced"],
            "ce_own_sae": own["ce_spliced"],
            "scored_tokens": own["tokens"],
        }
        del lm
    return out


def tie_back(
    out: Path,
    models: list[str],
    main: tuple[SparseCodes, int, tuple[np.ndarray, np.ndarray]],
    followed: list[tuple[SparseCodes, int]],
) -> dict[str, Any]:
    """For the crosscoder's live latents of each class: how often the first model's SAE
    latent that best follows it (by correlation over the units) has, in the compare stage
    (partners.parquet in `out`), the second model's SAE latent that best follows it as its
    partner at r >= HEADLINE_R; how often that partner is another latent; how often it has
    none. `main`: the crosscoder's codes of every unit, its width, (classes, live);
    `followed`: each model's SAE codes of the same units and its width."""
    codes, width, (classes, live) = main
    every = np.arange(codes.tokens)
    x = gather_rows(codes, every, width)
    best = []
    for model, (sae_codes, d_sae) in zip(models, followed, strict=True):
        with step(f"crosscoder: the SAE latents of {model} that follow its latents"):
            best.append(best_followers(x, gather_rows(sae_codes, every, d_sae)))
    (sa, ra), (sb, rb) = best
    partners = pq.read_table(out / "partners.parquet", columns=["side", "latent", "partner", "r"])
    a_rows = np.asarray(partners.column("side").to_pylist()) == "a"
    latent = partners.column("latent").to_numpy()[a_rows]
    d_a = followed[0][1]
    partner, r = np.full(d_a, -1), np.zeros(d_a)
    partner[latent] = partners.column("partner").to_numpy()[a_rows]
    r[latent] = partners.column("r").to_numpy()[a_rows]
    strong = r[sa] >= HEADLINE_R
    agree = strong & (partner[sa] == sb)
    table = {}
    for c, name in enumerate(class_names(models)[:3]):
        pick = live & (classes == c)
        table[name] = {
            "latents": int(pick.sum()),
            "sae_partners_agree": int((pick & agree).sum()),
            "another_partner": int((pick & strong & ~agree).sum()),
            "no_partner": int((pick & ~strong).sum()),
            "median_r_a": float(np.median(ra[pick])) if pick.any() else math.nan,
            "median_r_b": float(np.median(rb[pick])) if pick.any() else math.nan,
        }
    return {"threshold": HEADLINE_R, "table": table}


def best_followers(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """(for each column of x: the column of y whose values correlate best with it over the
    rows, and that r), from CSR matrices [units, columns]."""
    top = TopPartners(x.shape[1], y.shape[1], 1)
    correlation_blocks(x, y, None, lambda r, v: top.add(r, v["raw"]))
    top.finish()
    return top.a_idx[:, 0], top.a_val[:, 0]


def crosscoder_lines(record: dict[str, Any]) -> list[str]:
    """The headline lines of a crosscoder record."""
    models = record["models"]
    s = record["shared"]
    main = record["roles"]["main"]

    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    lo, hi = s["raw"]["interval"]
    lines = [
        f"Crosscoder of {' / '.join(models)} ({record['width']:,} latents, k {record['k']}, "
        f"{main['live']:,} live): {pct(s['raw']['share'])} shared (95% CI {pct(lo)}-{pct(hi)}); "
        f"floor {pct(s['floor']['share'])}, ceiling {pct(s['ceiling']['share'])}",
    ]
    if "normalised" in s:
        n = s["normalised"]
        lo, hi = n["interval"]
        lines.append(f"  normalised {n['score']:.2f} (95% CI {lo:.2f} to {hi:.2f})")
    only = ", ".join(f"{k} {pct(v)}" for k, v in main["shares"].items() if k.endswith(" only"))
    lines.append(f"  {only}")
    for i, model in enumerate(models):
        lines.append(
            f"  {model}: held-out FVU {main['fvu'][i]:.3f} with the crosscoder, "
            f"{record['own_sae_fvu'][model]:.3f} with its own SAE"
        )
    for model, ce in record.get("ce_loss_recovered", {}).items():
        lines.append(
            f"  {model}: CE loss recovered {100 * ce['crosscoder']:.1f}% with the crosscoder "
            f"spliced in at the held-out units, {100 * ce['own_sae']:.1f}% with its own SAE there"
        )
    if "tie_back" in record:
        for name, row in record["tie_back"]["table"].items():
            lines.append(
                f"  {name}: {row['latents']:,} latents; their best SAE latents are partners in "
                f"the SAE comparison for {row['sae_partners_agree']:,}, another partner "
                f"{row['another_partner']:,}, none at r >= {record['tie_back']['threshold']} "
                f"{row['no_partner']:,}"
            )
    return lines
