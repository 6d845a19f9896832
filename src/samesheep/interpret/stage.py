"""The interpret stage: a language model explains a sample of each SAE's latents from their
exemplar windows, and every label of a latent (the model's, the statistical one, a user's,
and another latent's as the baseline) is scored on windows the explainer never saw. Where
models are compared, each explanation is also scored on its latent's best partner in the
other model: a shared feature should keep its score there.

    <model>/layer_<L>/features/explanations.parquet   one row per (latent, label, scored-on)
    interpret/cache/<backend>.jsonl                   every answer, by request (resumable)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.cache import load_done, mark_done, unmark
from ..core.config import Config, InterpretConfig, settings_hash
from ..core.constants import SUMMARY
from ..core.errors import SamesheepError
from ..core.files import atomic_path, read_json
from ..core.plan import compare_pairs
from ..core.progress import say, step
from ..core.rundir import (
    compare_folder,
    features_dir,
    interpret_dir,
    layer_dir,
    prepare_run_dir,
    record_config,
    run_path,
    safe_name,
)
from ..lm.models import model_depth, resolve_layer
from .backends import Calls, Request, make_backend
from .prompts import Example, clean_explanation, explain_messages
from .scoring import Questions, ScoreSet, detection, fuzzing

EXPLANATIONS = "explanations.json"
"""A features folder's explanations summary, written last: the done marker of
explanations.parquet."""
INTERPRET_VERSION = 2
"""Bump when the stage changes what it writes for the same inputs."""
NOT_IN_KEY = ("enabled", "concurrency", "timeout", "retries", "api_key_env")
"""Settings that do not change the answers (and, for the key's variable, nothing secret is
hashed either way)."""
SOURCES = ("llm", "statistical", "user", "random")
"""Label sources: the explainer's, the features stage's log-odds label, the user's own,
and another latent's explanation (the baseline a label must beat)."""


@dataclasses.dataclass
class LatentExamples:
    """A latent's windows: those shown to the explainer and those it is scored on."""

    explain: list[Example]
    scoring: ScoreSet


def _example(row: dict[str, Any]) -> Example:
    return Example(
        text=row["text"] or "",
        starts=np.asarray(row["token_starts"] or [], dtype=np.int64),
        ends=np.asarray(row["token_ends"] or [], dtype=np.int64),
        acts=np.asarray(row["activations"] or [], dtype=np.float64),
        value=float(row["value"] or 0.0),
    ).clipped()


def split_examples(rows: list[dict[str, Any]], n_explain: int, n_score: int) -> LatentExamples:
    """One latent's exemplar rows split apart: the explainer sees the top training windows
    of even rank, then windows across the activation range; the scores use the top ones of
    odd rank, the held-out documents' and the rest of the range, and the windows where the
    latent does not fire."""
    top = sorted((r for r in rows if r["kind"] == "top"), key=lambda r: (r["split"], r["rank"]))
    quant = sorted(
        (r for r in rows if r["kind"] == "quantile"), key=lambda r: (-r["bin"], r["rank"])
    )
    shown_top = [r for r in top if r["split"] == "train" and r["rank"] % 2 == 0]
    held_top = [r for r in top if not (r["split"] == "train" and r["rank"] % 2 == 0)]
    n_top = min(len(shown_top), max(1, (n_explain * 3) // 5))
    explain = shown_top[:n_top] + [r for r in quant if r["split"] == "train"][: n_explain - n_top]
    used = {id(r) for r in explain}
    # scored on: the top windows it did not see and the rest of the range, interleaved
    rest = [r for r in quant if id(r) not in used]
    active = [r for pair in zip(held_top, rest, strict=False) for r in pair]
    active += held_top[len(rest) :] + rest[len(held_top) :]
    inactive = [r for r in rows if r["kind"] == "random"]
    return LatentExamples(
        [_example(r) for r in explain],
        ScoreSet(
            [_example(r) for r in active if (r["value"] or 0) > 0][:n_score],
            [_example(r) for r in inactive][:n_score],
        ),
    )


@dataclasses.dataclass
class SaeInfo:
    """One SAE whose latents are explained: its model, layer, folder and tables."""

    model: str
    layer: int
    folder: Path  # the features folder
    features_key: str
    labels: dict[int, str]
    live: np.ndarray  # latents that fire
    exemplars: pa.Table  # sorted by latent
    bounds: dict[int, tuple[int, int]]  # each latent's rows in it

    def rows(self, latent: int) -> list[dict[str, Any]]:
        """The exemplar rows of one latent (read out of the table only when asked)."""
        lo, hi = self.bounds.get(latent, (0, 0))
        return self.exemplars.slice(lo, hi - lo).to_pylist()


def _sae_info(cfg: Config, source: str, layer: int) -> SaeInfo:
    folder = features_dir(layer_dir(run_path(cfg), source, layer))
    summary = read_json(folder / SUMMARY, corrupt_is_missing=True)
    if not summary:
        raise SamesheepError(
            f"no features for {source} layer {layer}: run `samesheep features` "
            "(or `samesheep run`) first"
        )
    try:
        table = pq.read_table(folder / "feature_table.parquet", columns=["latent", "label", "dead"])
        ex = pq.read_table(folder / "exemplars.parquet")
    except (OSError, pa.ArrowInvalid) as e:
        raise SamesheepError(
            f"cannot read the features of {source} layer {layer} ({str(e).splitlines()[0]}): "
            "run `samesheep features` again"
        ) from None
    latents = table.column("latent").to_numpy()
    labels = dict(zip(latents.tolist(), table.column("label").to_pylist(), strict=True))
    live = latents[~table.column("dead").to_numpy(zero_copy_only=False)]
    ex = ex.take(pc.sort_indices(ex, [("latent", "ascending")]))
    which = ex.column("latent").to_numpy()
    cuts = np.flatnonzero(np.diff(which)) + 1
    bounds = {
        int(which[lo]): (int(lo), int(hi))
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(which)], strict=True)
        if hi > lo
    }
    return SaeInfo(source, layer, folder, summary["key"], labels, live, ex, bounds)


def chosen_latents(info: SaeInfo, ic: InterpretConfig) -> np.ndarray:
    """The latents to explain: those named (each checked to exist), else a seeded sample of
    the live ones (all of them for sample = 0)."""
    if ic.latents:
        bad = [i for i in ic.latents if i not in info.labels]
        if bad:
            raise SamesheepError(
                f"interpret.latents names latent {bad[0]}, which {info.model} layer "
                f"{info.layer}'s SAE does not have (it has {len(info.labels):,})"
            )
        return np.asarray(sorted(set(ic.latents)), dtype=np.int64)
    live = info.live[np.isin(info.live, list(info.bounds))]
    if ic.sample <= 0 or ic.sample >= len(live):
        return np.sort(live)
    rng = np.random.default_rng([ic.seed, info.layer])
    return np.sort(rng.choice(live, ic.sample, replace=False))


def read_user_labels(path: str, models: list[str]) -> dict[tuple[str, int], str]:
    """{(model, latent): label} from a JSONL file of {"model", "latent", "label"} lines."""
    if not path:
        return {}
    out = {}
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SamesheepError(f"cannot read interpret.user_labels {path}: {e.strerror}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key = (str(item["model"]), int(item["latent"]))
            label = str(item["label"]).strip()
        except (ValueError, KeyError, TypeError):
            raise SamesheepError(
                f'{path} line {n} is not {{"model": ..., "latent": ..., "label": ...}}'
            ) from None
        if key[0] not in models:
            raise SamesheepError(f"{path} line {n} names model {key[0]!r}, not one of the run's")
        if label:
            out[key] = label
    return out


def _cache_path(run: Path, name: str) -> Path:
    return interpret_dir(run) / "cache" / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.jsonl"


def interpret_stage(cfg: Config) -> dict[str, dict[int, dict[str, Any]]]:
    """Explain and score the chosen latents of every SAE of the run (skipped when unchanged;
    an interrupted run keeps every answer it got)."""
    run = prepare_run_dir(cfg)
    ic = cfg.interpret
    if ic.score_examples < 1 or ic.explain_examples < 1:
        raise SamesheepError("interpret.explain_examples and score_examples must be at least 1")
    infos: dict[tuple[str, int], SaeInfo] = {}
    for source in cfg.models:  # every input checked before any model is loaded
        depth = model_depth(source, cfg.trust_remote_code)
        for spec in cfg.layers:
            layer = resolve_layer(spec, depth)
            infos[(source, layer)] = _sae_info(cfg, source, layer)
    user = read_user_labels(ic.user_labels, cfg.models)
    chosen = {k: chosen_latents(info, ic) for k, info in infos.items()}
    partners = _partners(cfg)
    settings = {k: v for k, v in dataclasses.asdict(ic).items() if k not in NOT_IN_KEY}
    key = settings_hash(
        INTERPRET_VERSION,
        settings,
        [(m, layer, i.features_key) for (m, layer), i in infos.items()],
        sorted(f"{k[0]}:{k[1]}:{v}" for k, v in user.items()),
        sorted(partners.get("keys", [])),
    )
    if all(load_done(i.folder / EXPLANATIONS, key) for i in infos.values()):
        say("interpret: unchanged, skipped")
        return {}
    explainer = make_backend(ic.explainer, ic, cfg.trust_remote_code)
    explain_calls = Calls(explainer, _cache_path(run, explainer.name), ic.concurrency)
    scorer_spec = ic.scorer or ic.explainer
    scorer = (
        explainer
        if scorer_spec == ic.explainer
        else make_backend(scorer_spec, ic, cfg.trust_remote_code)
    )
    score_calls = Calls(scorer, _cache_path(run, scorer.name), ic.concurrency)
    for backend in (explainer, scorer):
        backend.check()

    examples: dict[tuple[str, int], dict[int, LatentExamples]] = {}
    explained = {}
    for k, info in infos.items():
        examples[k] = {
            int(i): split_examples(info.rows(int(i)), ic.explain_examples, ic.score_examples)
            for i in chosen[k]
        }
        with step(f"interpret: {info.model} layer {info.layer}: {len(chosen[k])} explanations"):
            asked = [i for i in chosen[k] if examples[k][int(i)].explain]
            requests = [
                Request.of(explain_messages(examples[k][int(i)].explain), ic.max_tokens)
                for i in asked
            ]
            replies = explain_calls.ask(requests)
        explained[k] = {int(i): clean_explanation(r) for i, r in zip(asked, replies, strict=True)}

    gathered = Gathered(explained, user, examples, partners, infos)
    out = {}
    for k, info in infos.items():
        jobs = _label_jobs(k, info, chosen[k], ic, gathered)
        with step(f"interpret: {info.model} layer {info.layer}: scoring {len(jobs)} labels"):
            rows = _score(jobs, score_calls, ic)
        table = pa.table(
            {name: [r[name] for r in rows] for name in ROW_FIELDS}
            if rows
            else {name: [] for name in ROW_FIELDS}
        )
        unmark(info.folder / EXPLANATIONS)
        with atomic_path(info.folder / "explanations.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        summary = {"key": key, "explainer": explainer.name, "scorer": scorer.name}
        summary.update(latents=len(chosen[k]), **_means(rows))
        files = [info.folder / "explanations.parquet"]
        summary = mark_done(info.folder / EXPLANATIONS, summary, files)  # last: marks it done
        say(_summary_line(info, summary))
        out[k] = summary
    say(
        f"interpret: {explain_calls.sent + score_calls.sent:,} calls sent "
        f"({len(explain_calls.answers) + len(score_calls.answers):,} answers cached)"
    )
    record_config(cfg)
    return out


ROW_FIELDS = (
    "latent",
    "source",
    "label",
    "from_latent",
    "scored_model",
    "scored_layer",
    "scored_latent",
    "partner_r",
    "detection",
    "fuzzing",
    "n_active",
    "n_inactive",
)


@dataclasses.dataclass
class LabelJob:
    """One label scored on one latent's windows."""

    latent: int  # the latent of this SAE the row belongs to
    source: str  # llm, statistical, user, random
    label: str
    from_latent: int  # whose label it is (another latent's for the baseline)
    scored: tuple[str, int, int]  # (model, layer, latent) whose windows it is scored on
    partner_r: float
    windows: ScoreSet


@dataclasses.dataclass(frozen=True)
class Gathered:
    """What the stage has gathered for every SAE, which each SAE's labels draw on: the
    explainer's explanations {(model, layer): {latent: text}}, the user's labels
    {(model, latent): label}, each chosen latent's windows, the best partners in the compared
    models (from _partners) and every SAE, whose windows a partner is scored on."""

    explained: dict[tuple[str, int], dict[int, str]]
    user: dict[tuple[str, int], str]
    examples: dict[tuple[str, int], dict[int, LatentExamples]]
    partners: dict[Any, Any]
    infos: dict[tuple[str, int], SaeInfo]


def _label_jobs(
    k: tuple[str, int], info: SaeInfo, chosen: np.ndarray, ic: InterpretConfig, gathered: Gathered
) -> list[LabelJob]:
    """Every label of every chosen latent, on its own windows, and its explanation on the
    best partner's windows in each compared model. The baseline ("random") is another
    latent's explanation, or where no other latent has a usable one, another chosen latent's
    statistical label, so that no SAE is left without a baseline."""
    model, layer = k
    user, infos, examples = gathered.user, gathered.infos, gathered.examples
    mine = gathered.explained[k]
    rng = np.random.default_rng([ic.seed, layer, 1])
    others = [i for i in mine if mine[i]]
    statistical = [int(j) for j in chosen if info.labels.get(int(j))]
    jobs = []
    for i in (int(x) for x in chosen):
        own = examples[k][i].scoring
        here = (model, layer, i)
        labels = [("llm", mine.get(i, ""), i), ("statistical", info.labels.get(i) or "", i)]
        if (model, i) in user:
            labels.append(("user", user[(model, i)], i))
        pool = [j for j in others if j != i]
        spare = [j for j in statistical if j != i]
        if pool:  # the baseline: another latent's explanation
            j = int(rng.choice(pool))
            labels.append(("random", mine[j], j))
        elif spare:  # none usable: another latent's statistical label
            j = int(rng.choice(spare))
            labels.append(("random", info.labels[j], j))
        for source, label, from_latent in labels:
            if label:
                jobs.append(LabelJob(i, source, label, from_latent, here, np.nan, own))
        for (pm, pl), best in gathered.partners.get(k, {}).items():
            if i in best and mine.get(i):
                j, r = best[i]
                windows = split_examples(
                    infos[(pm, pl)].rows(j), ic.explain_examples, ic.score_examples
                ).scoring
                jobs.append(LabelJob(i, "llm", mine[i], i, (pm, pl, j), r, windows))
    return jobs


def _partners(cfg: Config) -> dict:
    """{(model, layer): {(other model, layer): {latent: (best partner, r)}}} from the
    comparisons the run has made (none before the compare stage), and their keys."""
    out: dict[Any, Any] = {"keys": []}
    for a, b in compare_pairs(cfg):
        for spec in cfg.layers:
            la = resolve_layer(spec, model_depth(a, cfg.trust_remote_code))
            lb = resolve_layer(spec, model_depth(b, cfg.trust_remote_code))
            folder = compare_folder(cfg, a, b, la, lb)
            summary = read_json(folder / SUMMARY, corrupt_is_missing=True)
            if not summary or not (folder / "partners.parquet").is_file():
                continue
            out["keys"].append(summary.get("key", ""))
            columns = ["side", "latent", "partner", "r"]
            t = pq.read_table(folder / "partners.parquet", columns=columns).to_pydict()
            for side, me, other in (("a", (a, la), (b, lb)), ("b", (b, lb), (a, la))):
                rows = zip(t["side"], t["latent"], t["partner"], t["r"], strict=True)
                best = {
                    int(i): (int(p), float(r))
                    for s, i, p, r in rows
                    if s == side and p is not None and p >= 0 and r is not None
                }
                out.setdefault(me, {})[other] = best
    return out


def _score(jobs: list[LabelJob], calls: Calls, ic: InterpretConfig) -> list[dict[str, Any]]:
    """Every job's detection and fuzzing scores, all questions asked in one batch."""
    questions: list[tuple[Questions, Questions]] = []
    for job in jobs:
        # the same wrong marks for a label's windows on every run (so the cache answers)
        seed = [ic.seed, *job.scored[1:], job.from_latent, SOURCES.index(job.source)]
        rng = np.random.default_rng(seed)
        questions.append((detection(job.label, job.windows), fuzzing(job.label, job.windows, rng)))
    flat = [r for d, f in questions for r in (*d.requests, *f.requests)]
    answers = iter(calls.ask(flat))
    rows = []
    for job, (d, f) in zip(jobs, questions, strict=True):
        det = d.score([next(answers) for _ in d.requests])
        fuz = f.score([next(answers) for _ in f.requests])
        rows.append(
            {
                "latent": job.latent,
                "source": job.source,
                "label": job.label,
                "from_latent": job.from_latent,
                "scored_model": job.scored[0],
                "scored_layer": job.scored[1],
                "scored_latent": job.scored[2],
                "partner_r": job.partner_r,
                "detection": det,
                "fuzzing": fuz,
                "n_active": len(job.windows.active),
                "n_inactive": len(job.windows.inactive),
            }
        )
    return rows


def _means(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean scores per label source on the latents' own windows, and the explanations'
    scores on the partners' windows."""
    out: dict[str, Any] = {}
    own = [r for r in rows if r["scored_latent"] == r["latent"] and np.isnan(r["partner_r"])]
    for source in SOURCES:
        for score in ("detection", "fuzzing"):
            vals = [r[score] for r in own if r["source"] == source and np.isfinite(r[score])]
            out.setdefault(source, {})[score] = float(np.mean(vals)) if vals else None
            out[source]["labels"] = sum(r["source"] == source for r in own)
    on_partner = [r for r in rows if np.isfinite(r["partner_r"])]
    for score in ("detection", "fuzzing"):
        vals = [r[score] for r in on_partner if np.isfinite(r[score])]
        out.setdefault("on_partner", {})[score] = float(np.mean(vals)) if vals else None
    out["on_partner"]["labels"] = len(on_partner)
    return out


def _summary_line(info: SaeInfo, s: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}"

    parts = [
        f"{src} {f(s[src]['detection'])}/{f(s[src]['fuzzing'])}"
        for src in ("llm", "statistical", "user", "random")
        if s[src]["labels"]
    ]
    if s["on_partner"]["labels"]:
        p = s["on_partner"]
        parts.append(f"explanation on the partner {f(p['detection'])}/{f(p['fuzzing'])}")
    return (
        f"interpret {safe_name(info.model)} layer {info.layer}: {s['latents']} latents; mean "
        "detection/fuzzing (balanced accuracy, 0.5 = chance): " + ", ".join(parts)
    )
