"""Other runs' answers beside this run's (report.beside): the original-study preset, one
vector per text, next to the default per-token run with its floors and ceilings, so a
reader sees what the unit and the method change. Each other run is read from its own run
directory (config.toml and compare/<A>__<B>/summary.json); nothing is computed here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import config as config_mod
from ..core.config import Config
from ..core.constants import SUMMARY
from ..core.errors import SamesheepError
from ..core.files import read_json
from ..core.progress import say
from ..core.rundir import run_path, safe_name
from .overview import DIRECTIONS, MODES, has_answer, scale_cells

RERUN = "needs a rerun"
"""A number an older run's summary holds in another sense (its floor, before issue 33)."""
UNITS = {
    "token": "every token",
    "text-last": "one vector per text (its last real token)",
    "text-mean": "one vector per text (the mean over its tokens)",
}


def run_setting(cfg: Config) -> dict[str, str]:
    """What a run's numbers rest on, in words: its unit and its SAEs."""
    t = cfg.train
    width = f"{t.width:,} latents" if t.width else f"{t.expansion_factor}x"
    k = f", k = {t.k}" if t.architecture in ("topk", "batchtopk") else ""
    return {
        "unit": UNITS.get(cfg.unit, cfg.unit),
        "sae": f"{t.architecture} {width}{k}",
        "corpus": (
            f"{cfg.corpus.source}, "
            + (f"{cfg.corpus.max_tokens:,} tokens" if cfg.corpus.max_tokens else "every document")
        ),
    }


def _summaries(run: Path, a: str, b: str) -> list[dict[str, Any]]:
    """The comparison summaries of a pair in a run directory (one per layer setting)."""
    folder = run / "compare" / f"{safe_name(a)}__{safe_name(b)}"
    found = [read_json(folder / SUMMARY, corrupt_is_missing=True)]
    if folder.is_dir():
        found += [
            read_json(sub / SUMMARY, corrupt_is_missing=True)
            for sub in sorted(folder.iterdir())
            if sub.is_dir()
        ]
    return [s for s in found if s and "headline" in s]


def beside_runs(cfg: Config, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Each run of report.beside that can be read: its folder, settings, and summaries per
    pair of this run's models ({(A, B): [summary, ...]}); or a note where it cannot."""
    out = []
    here = run_path(cfg).resolve()
    for path in cfg.report.beside:
        folder = Path(path).expanduser()
        entry: dict[str, Any] = {"run": str(path), "summaries": {}, "note": ""}
        if folder.resolve() == here:
            continue  # this run itself
        try:
            other = config_mod.load(folder / "config.toml")
        except SamesheepError:
            entry["note"] = f"{path} holds no run (no config.toml): run `samesheep run` there first"
            say(f"report: {entry['note']}")
            out.append(entry)
            continue
        entry["setting"] = run_setting(other)
        for a, b in pairs:
            found = _summaries(folder, a, b)
            if found:
                entry["summaries"][(a, b)] = found
        if not entry["summaries"]:
            entry["note"] = (
                f"{path} has no comparison of these models yet: run `samesheep run` there first"
            )
            say(f"report: {entry['note']}")
        out.append(entry)
    return out


def beside_keys(runs: list[dict[str, Any]]) -> list[Any]:
    """What the report's key takes from the other runs (a change there rebuilds the site)."""
    return [
        [r["run"], r["note"], sorted(s.get("key", "") for v in r["summaries"].values() for s in v)]
        for r in runs
    ]


@dataclass(frozen=True)
class ModelPair:
    """The two models of a comparison: their sources (what the other runs' summaries are
    filed under) and their short names (what the page calls them)."""

    a: str
    b: str
    name_a: str
    name_b: str


def beside_view(
    cfg: Config, this: dict[str, Any], runs: list[dict[str, Any]], pair: ModelPair
) -> dict[str, Any] | None:
    """Rows of one pair's table: this run's headline (codes view) and each other run's,
    direction by direction, each with the setting it rests on; and the sentences comparing
    them. None where report.beside names no run."""
    if not runs:
        return None
    name_a, name_b = pair.name_a, pair.name_b
    entries = [("this run", run_setting(cfg), [this])]
    notes = []
    for r in runs:
        found = r["summaries"].get((pair.a, pair.b))
        if found:
            entries.append((r["run"], r["setting"], found))
        else:
            notes.append(r["note"] or f"{r['run']} has no comparison of {name_a} and {name_b}")
    rows, sentences = [], []
    for label, setting, summaries in entries:
        for s in summaries:
            layers = f"{s.get('layer_a', '?')} / {s.get('layer_b', '?')}"
            if not has_answer(s):
                notes.append(
                    f"{label} (layers {layers}) was compared before the fixed-source floor and "
                    "ceiling (its floor matched the two untrained copies to each other): only "
                    "its trained share is shown; run `samesheep compare` there again"
                )
            where = {"run": label, **setting, "layers": layers, "units": s.get("units", 0)}
            for d, (x, y) in zip(DIRECTIONS, ((name_a, name_b), (name_b, name_a)), strict=True):
                row = _row(s, d)
                if row is not None:
                    rows.append({**where, "direction": f"{x} → {y}", **row})
    for direction in (f"{name_a} → {name_b}", f"{name_b} → {name_a}"):
        parts = [
            f"{r['run']} ({r['unit']}, layers {r['layers']}): {r['raw']} "
            + (
                f"(floor {r['floor']}, ceiling {r['ceiling']}, normalised {r['normalised']})"
                if r["floor"] != RERUN
                else "(its floor and ceiling need a rerun)"
            )
            for r in rows
            if r["direction"] == direction
        ]
        if len(parts) > 1:
            sentences.append(f"{direction}, share with a partner of r ≥ 0.5: " + "; ".join(parts))
    return {"rows": rows, "sentences": sentences, "notes": notes}


def _row(summary: dict[str, Any], direction: str) -> dict[str, Any] | None:
    """One direction's cells of a run's headline: its answer; or, for a summary written
    before the fixed-source floor, only the trained share (its floor meant another thing)."""
    e = summary.get("headline", {}).get("raw", {}).get(direction)
    if not e or "raw" not in e:
        return None
    if "answer" in e:
        return {"mode": MODES.get(e["answer"].get("mode", ""), ""), **scale_cells(e["answer"])}
    old = scale_cells({"raw": e["raw"], "intervals": e.get("intervals", {})})
    return {**old, "mode": "", "floor": RERUN, "ceiling": RERUN, "normalised": RERUN}
