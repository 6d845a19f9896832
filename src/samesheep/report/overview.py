"""The overview page: the answer of every comparison in sentences written from its numbers,
the numbers with their floors, nulls, ceilings and intervals, the plots, and the run."""

from __future__ import annotations

import math
from typing import Any

from ..compare.presence import presence_sentence
from ..core.config import Config, to_toml
from ..core.files import read_json
from ..core.rundir import corpus_manifest, run_path, safe_name
from .plots import COLORS, BarAxes, LineAxes, Series, bar_plot, hbar_plot, line_plot
from .site import DASH, number, percent

R = 0.5  # the headline threshold (comparison.HEADLINE_R)
KEY = f"share_r{R:g}"
ROLES = (
    ("raw", "trained pair", ""),
    ("floor", "fixed-source floor", "6 3"),
    ("ceiling", "seed ceiling", "8 3"),
)
"""The three numbers of one population: the source latents held fixed, only the target
changes (the other model's SAE, its untrained copy's, a second seed of the source's)."""
DIAGNOSTICS = (
    ("null", "within-document null", "2 3"),
    ("across", "across documents", "1 3"),
    ("untrained_pair", "two untrained networks' dictionaries", "4 2"),
)
"""Numbers read beside the headline, never as its floor."""
UNTRAINED_PAIR = "surface text alone makes dictionaries this alike."
MODES = {"crossfit": "cross-fitted", "in_sample": "in-sample"}
CROSSFIT = (
    "cross-fitted: each latent's partner is chosen on one half of the documents and its r "
    "measured on the other, both ways round"
)
VIEWS = (
    ("raw", "codes"),
    ("residual", "beyond the unit's text"),
    ("token", "what the unit's text predicts"),
)
DIRECTIONS = ("a_to_b", "b_to_a")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def has_answer(summary: dict[str, Any]) -> bool:
    """Whether a comparison summary holds the fixed-source answer (written since issue 33);
    an older one's floor matched the two untrained copies to each other."""
    raw = summary.get("headline", {}).get("raw", {})
    return all("answer" in raw.get(d, {}) for d in DIRECTIONS)


def _names(a: str, b: str) -> dict[str, tuple[str, str]]:
    return {"a_to_b": (a, b), "b_to_a": (b, a)}


def interval(ci: Any, share: bool = True) -> str:
    """ "12.1% to 13.4%" (or "0.38 to 0.48"), or "" where there is no finite interval."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or not all(_finite(v) for v in ci):
        return ""
    if share:
        return f"{percent(ci[0])} to {percent(ci[1])}"
    return f"{ci[0]:.2f} to {ci[1]:.2f}"


def _share(n: dict[str, Any], role: str) -> float:
    return n.get(role, {}).get(KEY, math.nan)


def undefined_because(n: dict[str, Any]) -> str:
    """Why a population's normalised score is missing, in words ("" where it is not)."""
    if "floor" not in n:
        return "the run has no floor (compare.floor = false)"
    if "ceiling" not in n:
        return "the run has no seed ceiling (compare.ceiling = false)"
    if not n.get("raw", {}).get("judged"):
        return "no latent of this population is judged"
    value = n.get("normalised", {}).get(KEY)
    if _finite(value):
        return ""
    return (
        f"its floor ({percent(_share(n, 'floor'))}) is not below its ceiling "
        f"({percent(_share(n, 'ceiling'))})"
    )


def normalised_text(n: dict[str, Any]) -> str:
    """A population's normalised score at r >= R ("0.43"), "undefined", or a dash where the
    run has no floor or ceiling to read it on."""
    if "floor" not in n or "ceiling" not in n or not n.get("raw", {}).get("judged"):
        return DASH
    value = n.get("normalised", {}).get(KEY)
    return f"{value:.2f}" if _finite(value) else "undefined"


def scale_cells(n: dict[str, Any]) -> dict[str, Any]:
    """Table cells of one population (a comparison's `answer`, or its shape): the judged
    latents; the normalised score, the trained share, its floor and its ceiling at r >= R,
    each with its 95% interval ("" where there is none)."""
    ci = n.get("intervals", {}).get(KEY, {})
    out: dict[str, Any] = {"judged": n.get("raw", {}).get("judged", 0)}
    for role, _, _ in ROLES:
        out[role] = percent(_share(n, role)) if role in n else DASH
        out[f"{role}_ci"] = interval(ci.get(role))
    out["normalised"] = normalised_text(n)
    out["normalised_ci"] = interval(ci.get("normalised"), share=False)
    return out


def dictionary_rows(record: dict[str, Any], a: str, b: str) -> list[dict[str, Any]]:
    """Table rows of `samesheep dictionaries` (dictionaries.json): the SAE pair, then each
    dictionary that is not an SAE, per direction, with scale_cells' numbers."""
    answers = [("SAE", record.get("sae", {}))]
    answers += [(m.upper(), v.get("answer", {})) for m, v in record.get("methods", {}).items()]
    rows = []
    for name, by_direction in answers:
        for d, (x, y) in _names(a, b).items():
            if d in by_direction:
                rows.append(
                    {"name": name, "direction": f"{x} → {y}", **scale_cells(by_direction[d])}
                )
    return rows


CROSSCODER_ROLES = (
    ("raw", "main", "trained pair", "{a} and {b}"),
    ("floor", "floor", "fixed-source floor", "{a} and {b}'s untrained copy"),
    ("ceiling", "ceiling", "ceiling", "{a} and a random rotation of {a}"),
)
"""The crosscoder's three runs: (key in its shares and in COLORS, role folder, name, what it
reads)."""


def crosscoder_view(record: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """The crosscoder's section (crosscoder.json): per run the share of live latents that
    are shared, A's only and B's only, with the shared share's interval; the normalised
    score; each model's held-out FVU against its own SAE's; the tie back to the SAE
    comparison; the histogram of relative decoder norms."""
    shared = record["shared"]
    rows = []
    for key, role, name, reads in CROSSCODER_ROLES:
        entry = record["roles"][role]
        shares = [entry["shares"][c] for c in entry["classes"]]
        rows.append(
            {
                "name": name,
                "reads": reads.format(a=a, b=b),
                "live": entry["live"],
                "shared": percent(shared[key]["share"]),
                "shared_ci": interval(shared[key]["interval"]),
                "a_only": percent(shares[0]),
                "b_only": percent(shares[1]),
                "fvu": " / ".join(number(f, 3) for f in entry["fvu"]),
            }
        )
    n = shared.get("normalised", {})
    models = record["models"]
    spliced = record.get("ce_loss_recovered", {})
    fvu = [
        {
            "model": name,
            "crosscoder": number(record["roles"]["main"]["fvu"][i], 3),
            "own": number(record["own_sae_fvu"][m], 3),
            "ce_crosscoder": percent(spliced[m]["crosscoder"]) if m in spliced else DASH,
            "ce_own": percent(spliced[m]["own_sae"]) if m in spliced else DASH,
        }
        for i, (m, name) in enumerate(zip(models, (a, b), strict=True))
    ]
    tie = [
        {"name": name.replace(models[0], a).replace(models[1], b), **row}
        for name, row in record.get("tie_back", {}).get("table", {}).items()
    ]
    plot = norm_plot(record["roles"], a)
    return {
        "rows": rows,
        "normalised": number(n.get("score", math.nan), 2),
        "normalised_ci": interval(n.get("interval"), share=False),
        "width": record["width"],
        "k": record["k"],
        "units": record["roles"]["main"]["training"]["units"],
        "training_units": record["training_units"],
        "heldout": record["heldout_units"],
        "thresholds": record["thresholds"],
        "fvu": fvu,
        "tie_back": tie,
        "tie_threshold": record.get("tie_back", {}).get("threshold", R),
        "plot": plot,
    }


def norm_plot(roles: dict[str, Any], a: str) -> Any:
    """Each run's live latents by relative decoder norm, in tenths (the record's twentieths
    summed in twos): the trained pair beside its floor and ceiling."""
    series = []
    for key, role, name, _ in CROSSCODER_ROLES:
        hist = roles[role]["relative_norm_histogram"]
        tenths = [sum(hist[i : i + 2]) for i in range(0, len(hist), 2)]
        n = len(tenths)
        tips = [
            f"{name}: {c:,} live latents with relative norm {i / n:.1f}-{(i + 1) / n:.1f}"
            for i, c in enumerate(tenths)
        ]
        xy = [(i, float(c)) for i, c in enumerate(tenths)]
        series.append(Series(name, COLORS[key], xy, tips=tips))
    return bar_plot(
        [f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)],
        series,
        f"relative decoder norm (1: {a} only, 0: the other)",
        "live latents",
        "Crosscoder latents by relative decoder norm",
        BarAxes(y_percent=False),
    )


def in_sample(e: dict[str, Any]) -> dict[str, Any]:
    """A direction's in-sample numbers (every partner chosen and measured on all the
    documents) in the shape of its `answer`."""
    out = {role: e[role] for role, _, _ in ROLES if role in e}
    out.update(mode="in_sample", normalised=e.get("normalised", {}))
    out["intervals"] = e.get("intervals", {})
    return out


def lead(summary: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """What the overview opens with: the normalised score of each direction with its
    interval; then the trained share between its fixed-source floor and ceiling; the
    finding where a floor is not below its ceiling (said once); the surface/rest split; the
    view beyond the unit's text; the diagnostics; the decoder geometry."""
    raw = summary["headline"]["raw"]
    answers = {d: raw[d]["answer"] for d in DIRECTIONS}
    mode = MODES.get(answers["a_to_b"].get("mode", ""), "in-sample")
    scores = []
    for d, (x, y) in _names(a, b).items():
        n = answers[d]
        ci = interval(n.get("intervals", {}).get(KEY, {}).get("normalised"), share=False)
        score = {
            "direction": f"{x} → {y}",
            "value": normalised_text(n),
            "ci": f"95% CI {ci}" if ci else "",
            "why": undefined_because(n),
        }
        scores.append(score)
    return {
        "mode": mode,
        "scores": scores,
        "shares": [share_sentence(summary, d, x, y) for d, (x, y) in _names(a, b).items()],
        "finding": finding(answers, a, b),
        "split": [s for d, (x, y) in _names(a, b).items() if (s := split_sentence(raw[d], x, y))],
        "residual": residual_sentence(summary, a, b),
        "diagnostic": diagnostic_sentences(summary, a, b),
        "geometry": geometry_sentence(summary.get("geometry", {})),
        "presence": [
            presence_sentence(summary["presence"], x, y, d) for d, (x, y) in _names(a, b).items()
        ]
        if "presence" in summary
        else [],
        "presence_note": presence_note(summary.get("presence", {})),
    }


def presence_note(presence: dict[str, Any]) -> str:
    """How the three labels are given, with the run's thresholds."""
    rule = next((presence[d]["rule"] for d in DIRECTIONS if d in presence), None)
    if rule is None:
        return ""
    mode = MODES.get(presence.get("mode", ""), "in-sample")
    return (
        f"Shared as a latent: a partner with r ≥ {rule['partner_r']:g} ({mode}). Present but "
        "spread out: no such partner, but ridge probes of the other model's hidden state "
        "predict the latent on held-out documents beyond what its untrained copy's hidden "
        f"state predicts (conditional R² ≥ {rule['min_r2']:g}, and above its null, the same "
        "probes on units shifted within documents, by as much). Absent: neither. Intervals: "
        "95%, delete-one-group jackknife over documents."
    )


def share_sentence(summary: dict[str, Any], d: str, x: str, y: str) -> str:
    """One direction's trained share between its fixed-source floor and its seed ceiling,
    each with its interval, and where the share lies between them."""
    e = summary["headline"]["raw"][d]
    n = e["answer"]
    ci = n.get("intervals", {}).get(KEY, {})

    def with_ci(role: str) -> str:
        i = interval(ci.get(role))
        return percent(_share(n, role)) + (f" (95% CI {i})" if i else "")

    text = (
        f"{x} → {y}: {with_ci('raw')} of {x}'s {n['raw']['judged']:,} judged latents have a "
        f"{y} partner with r ≥ {R:g}"
    )
    refs = []
    if "floor" in n:
        refs.append(
            f"its fixed-source floor ({x}'s latents against the SAE of {y}'s untrained copy) "
            f"is {with_ci('floor')}"
        )
    if "ceiling" in n:
        arch = summary.get("ceiling_architecture")
        kind = f"{arch} " if arch and arch != summary.get("architecture") else ""
        refs.append(
            f"its seed ceiling ({x}'s latents against a second {kind}SAE on {x}, another "
            f"seed) is {with_ci('ceiling')}"
        )
    text += "; " + " and ".join(refs) + "." if refs else "."
    raw, floor, ceiling = (_share(n, r) for r in ("raw", "floor", "ceiling"))
    if _finite(floor) and _finite(ceiling) and floor < ceiling:
        if floor < raw < ceiling:
            text += " The trained share lies above its floor and below its ceiling."
        elif raw <= floor:
            text += " The trained share does not lie above its floor."
        else:
            text += " The trained share lies at or above its ceiling."
    elif _finite(floor) and not _finite(ceiling):
        above = "lies above" if raw > floor else "does not lie above"
        text += f" The trained share {above} its floor."
    if n.get("mode") == "crossfit":
        text += (
            f" All three are {CROSSFIT}; in-sample they are "
            + ", ".join(percent(_share(e, r)) for r, _, _ in ROLES if r in e)
            + "."
        )
    return text


def finding(answers: dict[str, dict[str, Any]], a: str, b: str) -> str:
    """The one sentence, for every direction at once, saying that a fixed-source floor lies
    at or above its ceiling ("" where none does): a finding, not a failure."""
    hits = []
    for d, (x, y) in _names(a, b).items():
        n = answers[d]
        floor, ceiling = _share(n, "floor"), _share(n, "ceiling")
        if _finite(floor) and _finite(ceiling) and floor >= ceiling:
            hits.append((x, y, n, floor, ceiling))
    if not hits:
        return ""
    where = "; ".join(
        f"{x} → {y}: floor {percent(f)}, ceiling {percent(c)}" for x, y, _, f, c in hits
    )
    below = [f"{x} → {y}" for x, y, n, f, _ in hits if _share(n, "raw") <= f]
    text = (
        "A finding: the fixed-source floor is not below the seed ceiling ("
        + where
        + "). An untrained copy of the other model, reading the same text, supplies as many "
        "of these latents as a second seed of their own model does, so no scale runs from "
        "floor to ceiling and the normalised score is undefined."
    )
    if below:
        text += f" The trained pair lies at or below its floor ({', '.join(below)})."
    return text


def split_sentence(e: dict[str, Any], x: str, y: str) -> str:
    """The split of one direction's source latents into surface latents (a partner with
    r >= the split's threshold in either untrained copy's SAE) and the rest."""
    split = e.get("split")
    if not split:
        return ""
    t = split.get("threshold", R)
    parts = []
    for part, what in (
        ("surface", f"surface latents (a partner with r ≥ {t:g} in an untrained copy's SAE)"),
        ("rest", "beyond the surface"),
    ):
        n = split.get(part, {})
        judged = n.get("raw", {}).get("judged", 0)
        if not judged:
            parts.append(f"none {what}")
            continue
        c = scale_cells(n)
        norm = c["normalised"] + (f", 95% CI {c['normalised_ci']}" if c["normalised_ci"] else "")
        parts.append(
            f"{judged:,} {what}: {c['raw']} with a {y} partner (floor {c['floor']}, "
            f"ceiling {c['ceiling']}, normalised {norm})"
        )
    return f"Of {x}'s judged latents, " + "; ".join(parts) + "."


def residual_sentence(summary: dict[str, Any], a: str, b: str) -> str:
    """How much agreement survives once each latent's word-level part is removed."""
    res = summary["headline"].get("residual", {})
    parts = []
    for d, (x, y) in _names(a, b).items():
        e = res.get(d)
        if not e or "raw" not in e:
            continue
        n = e.get("answer") or in_sample(e)
        refs = [f"{label} {percent(_share(n, role))}" for role, label, _ in ROLES[1:] if role in n]
        if "floor" in n and "ceiling" in n:
            refs.append(f"normalised {normalised_text(n)}")
        parts.append(
            f"{x} → {y} {percent(_share(n, 'raw'))}" + (f" ({', '.join(refs)})" if refs else "")
        )
    if not parts:
        return ""
    return (
        "Once each latent's word-level part is removed (its mean code over the units with the "
        f"same text), the share with a partner of r ≥ {R:g} is "
        + "; ".join(parts)
        + " (in-sample)."
    )


def diagnostic_sentences(summary: dict[str, Any], a: str, b: str) -> list[str]:
    """The untrained pair and the nulls: read beside the headline, never as its floor."""
    raw = summary["headline"]["raw"]
    out = []
    pair = [
        f"{x} → {y} {percent(_share(raw[d], 'untrained_pair'))}"
        for d, (x, y) in _names(a, b).items()
        if "untrained_pair" in raw[d]
    ]
    if pair:
        out.append(
            "Two untrained networks' dictionaries (the SAEs of both untrained copies matched "
            f"to each other): {'; '.join(pair)} with a partner of r ≥ {R:g}; "
            f"{UNTRAINED_PAIR} A diagnostic, not the floor."
        )
    nulls = []
    for role, label, _ in DIAGNOSTICS[:2]:
        got = [
            f"{x} → {y} {percent(_share(raw[d], role))}"
            for d, (x, y) in _names(a, b).items()
            if role in raw[d]
        ]
        if got:
            nulls.append(f"the {label} gives " + " and ".join(got))
    if nulls:
        out.append("Against chance: " + "; ".join(nulls) + ".")
    return out


def geometry_sentence(geometry: dict[str, Any]) -> str:
    """The decoder geometry of the matched pairs in one sentence ("" where it was not measured)."""
    sv = geometry.get("svcca_0.9")
    if sv:
        return (
            f"The decoder directions of the {geometry['pairs']:,} matched pairs with r ≥ {R:g} "
            f"have an SVCCA of {sv['value']:.2f} at 90% of the variance, against "
            f"{sv['null_mean']:.3f} ± {sv['null_sd']:.3f} for {sv['pairings']} random pairings "
            f"(p = {sv['p']:.3g})."
        )
    if geometry.get("note"):
        return f"Decoder geometry: {geometry['note']}."
    return ""


def number_groups(summary: dict[str, Any], a: str, b: str) -> list[dict[str, Any]]:
    """The numbers table, direction by direction: each population (the headline, in-sample,
    the surface latents and the rest, each view) with its normalised score, trained share,
    floor and ceiling, and intervals."""
    head = summary["headline"]
    groups = []
    for d, (x, y) in _names(a, b).items():
        e = head["raw"][d]
        n = e["answer"]
        rows = [{"what": f"codes ({MODES.get(n.get('mode', ''), 'in-sample')})", **scale_cells(n)}]
        if n.get("mode") == "crossfit":
            rows.append({"what": "codes (in-sample)", **scale_cells(in_sample(e))})
        split = e.get("split")
        if split:
            for part, what in (("surface", "surface latents"), ("rest", "beyond the surface")):
                if part in split:
                    mode = MODES.get(split[part].get("mode", ""), "")
                    rows.append({"what": f"{what} ({mode})", **scale_cells(split[part])})
        for view, what in VIEWS[1:]:
            v = head.get(view, {}).get(d)
            if v and "raw" in v:
                cells = scale_cells(v.get("answer") or in_sample(v))
                rows.append({"what": f"{what} (in-sample)", **cells})
        groups.append({"direction": f"{x} → {y}", "rows": rows})
    return groups


def diagnostic_groups(summary: dict[str, Any], a: str, b: str) -> list[dict[str, Any]]:
    """The diagnostics table, direction by direction and view by view: the nulls, the
    untrained pair, the held-out units, the mean best r (all in-sample)."""
    groups = []
    for d, (x, y) in _names(a, b).items():
        rows = []
        for view, what in VIEWS:
            e = summary["headline"].get(view, {}).get(d)
            if not e or "raw" not in e:
                continue
            row = {"what": what}
            for role in (*(r for r, _, _ in DIAGNOSTICS), "heldout"):
                row[role] = percent(_share(e, role)) if role in e else DASH
            row["mean_r"] = number(e["raw"].get("mean_best_r"))
            rows.append(row)
        groups.append({"direction": f"{x} → {y}", "rows": rows})
    return groups


def _pct_tip(name: str, x: float, y: float) -> str:
    return f"{name}: {percent(y)} of judged latents have a partner with r ≥ {x:.2f}"


def curve_plot(n: dict[str, Any], title: str) -> Any:
    """The floor, trained and ceiling curves of one population (a direction's answer); the
    trained pair's tips also give the normalised score at each threshold."""
    norm = {round(p[0], 2): p[1:] for p in n.get("normalised_curve", [])}
    series = []
    for role, label, dash in ROLES:
        pts = n.get("curves", {}).get(role)
        if not pts:
            continue
        xy = [(x, y) for x, y in pts]
        tips = [_pct_tip(label, x, y) for x, y in xy]
        if role == "raw" and norm:
            for i, (x, _) in enumerate(xy):
                v, lo, hi = norm.get(round(x, 2), (None, None, None))
                ci = interval([lo, hi], share=False)
                tips[i] += "; normalised " + (
                    f"{v:.2f}" + (f" (95% CI {ci})" if ci else "") if _finite(v) else "undefined"
                )
        series.append(Series(label, COLORS[role], xy, dash, tips))
    return line_plot(series, "best-partner correlation r", "share of judged latents ≥ r", title)


def normalised_plot(n: dict[str, Any], title: str) -> Any | None:
    """The normalised score at every threshold of the curve, with its 95% interval as a
    band; None where it is nowhere defined."""
    pts = [p for p in n.get("normalised_curve", []) if len(p) == 4]
    if not any(_finite(p[1]) for p in pts):
        return None
    ys = [v for p in pts for v in p[1:] if _finite(v)]
    lo, hi = max(min(min(ys), 0.0), -1.0), min(max(max(ys), 1.0), 2.0)
    tips = []
    for x, v, a, b in pts:
        ci = interval([a, b], share=False)
        text = f"{v:.2f}" + (f" (95% CI {ci})" if ci else "") if _finite(v) else "undefined"
        tips.append(f"normalised score at r ≥ {x:.2f}: {text}")
    score = [(p[0], p[1]) for p in pts]
    band = [(p[0], p[2], p[3]) for p in pts]
    floor, ceiling = [(0.0, 0.0), (1.0, 0.0)], [(0.0, 1.0), (1.0, 1.0)]
    series = [
        Series("normalised score", COLORS["normalised"], score, "", tips, band=band),
        Series("floor (0) and ceiling (1)", COLORS["null"], floor, "2 3", ["the floor: 0"] * 2),
        Series("", COLORS["null"], ceiling, "2 3", ["the ceiling: 1"] * 2),
    ]
    axes = LineAxes(y_range=(lo, hi), y_percent=False)
    return line_plot(series, "best-partner correlation r", "normalised score", title, axes)


def diagnostic_plot(e: dict[str, Any], title: str) -> Any | None:
    """The trained pair's in-sample curve beside the nulls and the untrained pair."""
    curves = e.get("curves", {})
    series = []
    for role, label, dash in (ROLES[0], *DIAGNOSTICS):
        pts = curves.get(role)
        if pts:
            xy = [(x, y) for x, y in pts]
            series.append(
                Series(label, COLORS[role], xy, dash, [_pct_tip(label, x, y) for x, y in xy])
            )
    if len(series) < 2:
        return None
    return line_plot(series, "best-partner correlation r", "share of judged latents ≥ r", title)


def histogram_plot(e: dict[str, Any], title: str) -> Any:
    hists = e.get("histograms", {})
    series = []
    for role, label, dash in ROLES:
        counts = hists.get(role)
        if not counts:
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
    """The trained pair's share by corpus topic, one bar per topic, its name beside it."""
    rows = topics.get(direction) or {}
    if not rows:
        return None
    cats = sorted(rows)
    xy = [(i, rows[t][KEY]) for i, t in enumerate(cats)]
    tips = [
        f"{t}: {rows[t]['judged']:,} judged latents, {percent(rows[t][KEY])} with r ≥ {R:g}"
        for t in cats
    ]
    return hbar_plot(
        cats,
        [Series("trained pair (in-sample)", COLORS["raw"], xy, tips=tips)],
        f"share with r ≥ {R:g}",
        title,
    )


def comparison_view(summary: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """Everything the overview shows of one comparison (of models named a and b)."""
    raw = summary["headline"]["raw"]
    plots = {}
    for direction, (x, y) in _names(a, b).items():
        e = raw[direction]
        n = e["answer"]
        mode = MODES.get(n.get("mode", ""), "in-sample")
        plots[direction] = {
            "curve": curve_plot(n, f"{x} → {y}: floor, trained pair and ceiling ({mode})"),
            "normalised": normalised_plot(n, f"{x} → {y}: normalised score at each r ({mode})"),
            "diagnostics": diagnostic_plot(e, f"{x} → {y}: the trained pair beside diagnostics"),
            "histogram": histogram_plot(e, f"{x} → {y}: best-partner r"),
            "deciles": decile_plot(e, f"{x} → {y}: by firing frequency"),
            "topics": topic_plot(
                summary.get("topics", {}), direction, f"{x} → {y}: by corpus topic"
            ),
            "title": f"{x} → {y}",
            "mode": mode,
        }
    mutual = raw.get("mutual_pairs", {})
    mutual_roles = raw.get("mutual_pairs_by_role", {})
    cov = summary.get("coverage", {})
    geometry = summary.get("geometry", {})
    return {
        "lead": lead(summary, a, b),
        "groups": number_groups(summary, a, b),
        "diagnostics": diagnostic_groups(summary, a, b),
        "surface_r": summary.get("surface_r", R),
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
        "by_share": {d: raw[d].get("by_share_of_documents", []) for d in DIRECTIONS},
        "seconds": summary.get("seconds"),
        "min_fires": summary.get("settings", {}).get("min_fires", 20),
    }


def run_info(cfg: Config, metrics: dict[str, dict[str, Any]], timings: dict | None) -> dict:
    """The run: models, corpus, layers, settings, stage times, and the SAE quality table."""
    corpus = read_json(corpus_manifest(run_path(cfg)), corrupt_is_missing=True) or {}
    quality = []
    for rel, m in metrics.items():
        role = (
            "untrained copy (floor, surface score)"
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
