"""The overview page: the answer of every comparison in sentences written from its numbers,
the numbers with their floors, nulls, ceilings and intervals, the plots, and the run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import Config, to_toml
from ..files import read_json
from ..models import safe_name
from .plots import COLORS, Series, bar_plot, line_plot
from .site import DASH, number, percent

R = 0.5  # the headline threshold (comparison.HEADLINE_R)
KEY = f"share_r{R:g}"
ROLES = (
    ("raw", "trained pair", ""),
    ("floor", "random-weights floor", "6 3"),
    ("null", "within-document null", "2 3"),
    ("across", "across documents", "1 3"),
    ("ceiling", "seed ceiling", "8 3"),
)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def answer_sentences(summary: dict[str, Any], a: str, b: str) -> list[str]:
    """The answer, direction by direction, in sentences built from the summary's numbers."""
    out = []
    head = summary["headline"]
    geometry = summary.get("geometry", {})
    for direction, (x, y) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
        e = head["raw"][direction]
        raw = e["raw"][KEY]
        ci = e.get("intervals", {}).get(KEY, {})
        text = (
            f"{percent(raw)} of {x}'s {e['raw']['judged']:,} judged latents have a {y} partner "
            f"with r ≥ {R:g}"
        )
        if "raw" in ci and all(_finite(v) for v in ci["raw"]):
            text += f" (95% CI {percent(ci['raw'][0])} to {percent(ci['raw'][1])})"
        text += "."
        refs = []
        if "floor" in e:
            refs.append(
                f"two random-weights copies of the models give {percent(e['floor'][KEY])}"
                " (the floor)"
            )
        if "null" in e:
            refs.append(
                f"units shifted inside each document give {percent(e['null'][KEY])} (the null)"
            )
        if "ceiling" in e:
            arch = summary.get("ceiling_architecture")
            kind = f"{arch} " if arch and arch != summary.get("architecture") else ""
            refs.append(
                f"a second {kind}SAE on {x} with another seed gives "
                f"{percent(e['ceiling'][KEY])} (the ceiling)"
            )
        if refs:
            text += " Against it, " + "; ".join(refs) + "."
        norm = e.get("normalised", {}).get(KEY)
        if "floor" in e and "ceiling" in e:
            if _finite(norm):
                lo, hi = ci.get("normalised", [math.nan, math.nan])
                text += f" On the scale from floor (0) to ceiling (1) that is {norm:.2f}"
                if _finite(lo) and _finite(hi):
                    text += f" (95% CI {lo:.2f} to {hi:.2f})"
                text += "."
            else:
                side = "above" if raw > e["floor"][KEY] else "below"
                text += (
                    " The floor is not below the ceiling, so no scale runs from one to the "
                    "other and the normalised score is undefined: by this measure two untrained "
                    f"models share more than two seeds of one trained model. The trained pair "
                    f"lies {side} its floor."
                )
        res = head.get("residual", {}).get(direction)
        if res and "raw" in res:
            r_raw = res["raw"][KEY]
            kept = r_raw / raw if raw > 0 else math.nan
            text += (
                f" Once each latent's word-level part is removed (its mean code over the units "
                f"with the same text), {percent(r_raw)} keep a partner with r ≥ {R:g}"
            )
            refs = [
                f"{label} {percent(res[role][KEY])}"
                for role, label in (("floor", "floor"), ("ceiling", "ceiling"))
                if role in res
            ]
            if refs:
                text += " (" + ", ".join(refs) + ")"
            if _finite(kept):
                text += f": {percent(kept, 0)} of the raw share survives"
            text += "."
        out.append(text)
    sv = geometry.get("svcca_0.9")
    if sv:
        out.append(
            f"The decoder directions of the {geometry['pairs']:,} matched pairs with r ≥ {R:g} "
            f"have an SVCCA of {sv['value']:.2f} at 90% of the variance, against "
            f"{sv['null_mean']:.3f} ± {sv['null_sd']:.3f} for {sv['pairings']} random pairings "
            f"(p = {sv['p']:.3g})."
        )
    elif geometry.get("note"):
        out.append(f"Geometry: {geometry['note']}.")
    return out


def headline_rows(summary: dict[str, Any], a: str, b: str) -> list[dict[str, Any]]:
    """Rows of the headline table: per view and direction, every reference beside the raw
    number, with the interval and the normalised score."""
    rows = []
    views = (
        ("raw", "codes"),
        ("residual", "beyond the unit's text"),
        ("token", "what the unit's text predicts"),
    )
    for view, what in views:
        for direction, (x, y) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
            e = summary["headline"].get(view, {}).get(direction)
            if not e:
                continue
            ci = e.get("intervals", {}).get(KEY, {})
            row = {"what": what, "direction": f"{x} → {y}", "judged": e["raw"]["judged"]}
            for role, _, _ in ROLES:
                row[role] = percent(e[role][KEY]) if role in e else DASH
            row["heldout"] = percent(e["heldout"][KEY]) if "heldout" in e else DASH
            row["ci"] = (
                f"{percent(ci['raw'][0])} to {percent(ci['raw'][1])}"
                if "raw" in ci and all(_finite(v) for v in ci["raw"])
                else DASH
            )
            norm = e.get("normalised", {}).get(KEY)
            row["normalised"] = f"{norm:.2f}" if _finite(norm) else "undefined"
            nci = ci.get("normalised")
            row["normalised_ci"] = (
                f"{nci[0]:.2f} to {nci[1]:.2f}" if nci and all(_finite(v) for v in nci) else ""
            )
            row["mean_r"] = number(e["raw"].get("mean_best_r"))
            rows.append(row)
    return rows


def _pct_tip(name: str, x: float, y: float) -> str:
    return f"{name}: {percent(y)} of judged latents have a partner with r ≥ {x:.2f}"


def curve_plot(e: dict[str, Any], title: str) -> Any:
    series = []
    for role, label, dash in ROLES:
        pts = e.get("curves", {}).get(role)
        if pts:
            xy = [(x, y) for x, y in pts]
            series.append(
                Series(label, COLORS[role], xy, dash, [_pct_tip(label, x, y) for x, y in xy])
            )
    return line_plot(series, "best-partner correlation r", "share of judged latents ≥ r", title)


def histogram_plot(e: dict[str, Any], title: str) -> Any:
    hists = e.get("histograms", {})
    series = []
    for role, label, dash in ROLES:
        counts = hists.get(role)
        if not counts or role in ("null", "across"):
            continue
        total = max(sum(counts), 1)
        width = 1.0 / len(counts)
        xy = [((i + 0.5) * width, c / total) for i, c in enumerate(counts)]
        tips = [
            f"{label}: {c:,} latents ({percent(c / total)}) with best r in "
            f"{i * width:.2f}-{(i + 1) * width:.2f}"
            for i, c in enumerate(counts)
        ]
        series.append(Series(label, COLORS[role], xy, dash, tips))
    return line_plot(series, "best-partner correlation r", "share of judged latents", title)


def decile_plot(e: dict[str, Any], title: str) -> Any:
    by_role = e.get("deciles_by_role") or {"raw": e.get("deciles", [])}
    cats = [str(d["decile"]) for d in by_role.get("raw", [])]
    series = []
    for role, label, _ in ROLES:
        rows = by_role.get(role)
        if not rows:
            continue
        xy = [(i, d[KEY]) for i, d in enumerate(rows)]
        tips = [
            f"{label}, decile {d['decile']} ({d['min_fires']:,}-{d['max_fires']:,} units): "
            f"{percent(d[KEY])} with r ≥ {R:g}"
            for d in rows
        ]
        series.append(Series(label, COLORS[role], xy, tips=tips))
    return bar_plot(
        cats, series, "firing-frequency decile (1 = rarest)", f"share with r ≥ {R:g}", title
    )


def topic_plot(topics: dict[str, Any], direction: str, title: str) -> Any | None:
    rows = topics.get(direction) or {}
    if not rows:
        return None
    cats = sorted(rows)
    xy = [(i, rows[t][KEY]) for i, t in enumerate(cats)]
    tips = [
        f"{t}: {rows[t]['judged']:,} judged latents, {percent(rows[t][KEY])} with r ≥ {R:g}"
        for t in cats
    ]
    return bar_plot(
        cats,
        [Series("trained pair", COLORS["raw"], xy, tips=tips)],
        "",
        f"share with r ≥ {R:g}",
        title,
        rotate=True,
    )


def comparison_view(
    summary: dict[str, Any], a: str, b: str, key_a: str, key_b: str, fa: Any, fb: Any
) -> dict[str, Any]:
    """Everything the overview shows of one comparison."""
    raw = summary["headline"]["raw"]
    plots = {}
    for direction, (x, y) in (("a_to_b", (a, b)), ("b_to_a", (b, a))):
        e = raw[direction]
        plots[direction] = {
            "curve": curve_plot(e, f"{x} → {y}: share with a partner of at least r"),
            "histogram": histogram_plot(e, f"{x} → {y}: best-partner r"),
            "deciles": decile_plot(e, f"{x} → {y}: by firing frequency"),
            "topics": topic_plot(
                summary.get("topics", {}), direction, f"{x} → {y}: by corpus topic"
            ),
            "title": f"{x} → {y}",
        }
    mutual = summary["headline"]["raw"].get("mutual_pairs", {})
    mutual_roles = summary["headline"]["raw"].get("mutual_pairs_by_role", {})
    cov = summary.get("coverage", {})
    geometry = summary.get("geometry", {})
    return {
        "answer": answer_sentences(summary, a, b),
        "verdict": summary.get("verdict", []),
        "rows": headline_rows(summary, a, b),
        "plots": plots,
        "mutual": {k: v for k, v in mutual.items()},
        "mutual_roles": mutual_roles,
        "units": summary.get("units", 0),
        "documents": summary.get("documents", 0),
        "coverage": cov,
        "too_rare": {s: summary.get("too_rare", {}).get(s, {}).get("count", 0) for s in "ab"},
        "matched": summary.get("matched_pairs", {}),
        "meaning": summary.get("meaning", {}),
        "geometry": {k: v for k, v in geometry.items() if isinstance(v, dict)},
        "by_share": {d: raw[d].get("by_share_of_documents", []) for d in ("a_to_b", "b_to_a")},
        "seconds": summary.get("seconds"),
        "min_fires": summary.get("settings", {}).get("min_fires", 20),
    }


def run_info(cfg: Config, metrics: dict[str, dict[str, Any]], timings: dict | None) -> dict:
    """The run: models, corpus, layers, settings, stage times, and the SAE quality table."""
    run = Path(cfg.run_dir).expanduser()
    corpus = read_json(run / "corpus" / "manifest.json", corrupt_is_missing=True) or {}
    quality = []
    for rel, m in metrics.items():
        role = (
            "floor (random weights)"
            if m["source"].startswith("random:")
            else "ceiling (second seed)"
            if m["sae"] != "sae"
            else "trained"
        )
        quality.append(
            {
                "model": m["source"],
                "layer": m["layer"],
                "sae": m["sae"],
                "role": role,
                "fvu": number(m.get("fvu")),
                "median_error": number(m.get("median_relative_error")),
                "l0": number(m.get("l0"), 1),
                "dead": percent(m.get("dead_fraction")),
                "ce": percent(m.get("ce_loss_score")) if "ce_loss_score" in m else DASH,
                "tokens": number(m.get("tokens")),
                "outliers": number(m.get("outlier_tokens")),
                "path": rel,
            }
        )
    return {
        "models": list(cfg.models),
        "names": [safe_name(m) for m in cfg.models],
        "layers": [str(x) for x in cfg.layers],
        "corpus": {
            "source": cfg.corpus.source,
            "train_docs": corpus.get("train", {}).get("documents"),
            "train_tokens": corpus.get("train", {}).get("tokens"),
            "heldout_docs": corpus.get("heldout", {}).get("documents"),
            "heldout_tokens": corpus.get("heldout", {}).get("tokens"),
        },
        "quality": quality,
        "timings": (timings or {}).get("seconds", {}),
        "total_seconds": (timings or {}).get("total"),
        "config": to_toml(cfg, comments=False),
    }
