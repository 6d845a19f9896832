"""The report's layer-by-layer view of a pair of models: the headline metric (trimmed CKA
with the untrained copies' similarity regressed out, where they were extracted) as a heatmap
of corrected values, cells where nothing survives shown as such, beside its fixed-source
floor and the best-matching layer against depth with its interval; every other metric the
same way behind a selector (one collapsed section each)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..core.files import read_json
from ..layers.stage import FLOOR_OF
from .plots import COLORS, Grid, LineAxes, Series, heatmap, line_plot

NAMES = {
    "cka_trimmed_input_debiased": "linear CKA, outlier dimensions removed, input-debiased",
    "cka_trimmed": "linear CKA, outlier dimensions removed",
    "cka_input_debiased": "linear CKA, input-debiased",
    "cka": "linear CKA",
    "cka_unbiased": "linear CKA, unbiased HSIC",
    "cka_standardized_input_debiased": "linear CKA, standardised dimensions, input-debiased",
    "cka_standardized": "linear CKA, standardised dimensions",
    "mutual_knn": "mutual k-nearest neighbours",
    "cknna": "CKNNA",
}
"""Each metric's name on the page, the headline first; SVCCA settings follow."""
CELLS = (
    "value",
    "corrected",
    "threshold",
    "null_mean",
    "null_sd",
    "floor_a_to_b",
    "floor_b_to_a",
    "random_pair",
)
"""The per-cell numbers a cell's tip shows."""


def metric_name(metric: str) -> str:
    if metric.startswith("svcca@"):
        return f"SVCCA keeping {metric.split('@', 1)[1]} of the variance"
    return NAMES.get(metric, metric)


def _order(metrics: list[str]) -> list[str]:
    known = [m for m in NAMES if m in metrics]
    return known + sorted(m for m in metrics if m not in NAMES)


def read_layers(folder: Path) -> tuple[dict[str, Any], Any] | None:
    """(layers.json, layers.parquet as a DataFrame) of a pair, or None where the layers stage
    has not written them (or wrote them before the fixed-source floors: rerun the stage)."""
    summary = read_json(folder / "layers.json", corrupt_is_missing=True)
    if not summary or not (folder / "layers.parquet").is_file():
        return None
    df = pq.read_table(folder / "layers.parquet").to_pandas()
    if "corrected" not in df.columns:
        return None
    return summary, df


def _matrix(df: Any, column: str, n_a: int, n_b: int) -> np.ndarray:
    m = np.full((n_a, n_b), np.nan)
    m[df.layer_a.to_numpy(), df.layer_b.to_numpy()] = df[column].to_numpy(dtype=float)
    return m


def _tip(a: str, b: str, i: int, j: int, row: dict[str, float], survives: bool) -> str:
    verdict = "above" if row["value"] > row["threshold"] else "not above"
    text = (
        f"{a} layer {i}, {b} layer {j}: {row['value']:.3f} (null {row['null_mean']:.3f} "
        f"± {row['null_sd']:.3f}; {verdict} the corrected threshold {row['threshold']:.3f})"
    )
    if math.isfinite(row["floor_a_to_b"]):
        text += (
            f"; fixed-source floors {row['floor_a_to_b']:.3f} ({a}'s layer against untrained "
            f"{b}'s) and {row['floor_b_to_a']:.3f} ({b}'s against untrained {a}'s); less the "
            f"higher: {row['corrected']:.3f}"
        )
    if math.isfinite(row["random_pair"]):
        text += f"; untrained pair {row['random_pair']:.3f} (a diagnostic)"
    return text + ("" if survives else "; nothing survives")


def metric_view(summary: dict[str, Any], df: Any, metric: str, a: str, b: str) -> dict[str, Any]:
    """One metric's heatmap of corrected values (input-debiased, or less the higher
    fixed-source floor) with the cells where nothing survives struck through, the
    fixed-source floor A -> B of the metric (of its plain form, for an input-debiased one)
    on the scale of that metric's values, and the best-match plot."""
    n_a, n_b = summary["layers_a"], summary["layers_b"]
    cols = {c: _matrix(df[df.metric == metric], c, n_a, n_b) for c in CELLS}
    survives = _matrix(df[df.metric == metric], "survives", n_a, n_b) == 1.0
    kept = cols["corrected"][survives]
    scale = (0.0, float(kept.max()) if kept.size and kept.max() > 0 else 1.0)
    best = summary["best"].get(metric, {}).get("a_to_b", [])
    tips = [
        [
            _tip(a, b, i, j, {c: float(cols[c][i, j]) for c in cols}, bool(survives[i, j]))
            for j in range(n_b)
        ]
        for i in range(n_a)
    ]
    x_label, y_label = f"{b} layer", f"{a} layer"
    debiased = metric in FLOOR_OF
    what = "input-debiased" if debiased else "less its higher fixed-source floor"
    grid = Grid(cols["corrected"].tolist(), survives.tolist(), [r["best"] for r in best], tips)
    title = f"{metric_name(metric)}: {a} against {b} ({what})"
    trained = heatmap(grid, x_label, y_label, title, scale)
    plain = FLOOR_OF.get(metric, metric)
    floor_of = {c: _matrix(df[df.metric == plain], c, n_a, n_b) for c in ("value", "floor_a_to_b")}
    floor = None
    if np.isfinite(floor_of["floor_a_to_b"]).any():
        both = np.concatenate([floor_of["value"].ravel(), floor_of["floor_a_to_b"].ravel()])
        finite = both[np.isfinite(both)]
        floor = heatmap(
            Grid(floor_of["floor_a_to_b"].tolist()),
            f"untrained {b} layer",
            y_label,
            f"{metric_name(plain)}: {a}'s layer against untrained {b}'s (the fixed-source floor)",
            (float(finite.min()), float(finite.max())),
        )
    return {
        "metric": metric,
        "name": metric_name(metric),
        "floor_name": metric_name(plain),
        "debiased": debiased,
        "trained": trained,
        "floor": floor,
        "above": int(survives.sum()),
        "interval": bool(best) and all("interval" in r for r in best if r["best"] is not None),
        "pairs": n_a * n_b,
        "best_plot": best_plot(best, n_a, n_b, a, b, metric),
    }


def best_plot(best: list[dict[str, Any]], n_a: int, n_b: int, a: str, b: str, metric: str) -> Any:
    """The best-matching layer of B (as a share of B's depth) against A's depth, read from
    the corrected values where they survive (a layer without one is left out), with the 95%
    range over document halves where there is one, and the diagonal of equal depth."""
    found = [r for r in best if r["best"] is not None]
    if not found:
        return None
    x = [(r["layer"] + 1) / n_a for r in found]
    tips = []
    for r in found:
        where = ""
        if "interval" in r:
            lo, hi = r["interval"]
            where = f" (95% range {lo}-{hi}, {100 * r['agree']:.0f}% of document halves agree)"
        tips.append(f"{a} layer {r['layer']} best matches {b} layer {r['best']}{where}")
    best_depth = [(xi, (r["best"] + 1) / n_b) for xi, r in zip(x, found, strict=True)]
    series = [
        Series("best match", COLORS["raw"], best_depth, tips=tips),
        Series("equal depth", COLORS["null"], [(0.0, 0.0), (1.0, 1.0)], dash="3 3", tips=["", ""]),
    ]
    if all("interval" in r for r in found):
        for k, name in ((0, "95% range"), (1, "")):  # one legend entry for both bounds
            pts = [(xi, (r["interval"][k] + 1) / n_b) for xi, r in zip(x, found, strict=True)]
            series.append(Series(name, COLORS["ceiling"], pts, dash="2 2"))
    return line_plot(
        series,
        f"{a}: depth of the layer",
        f"{b}: depth of its best match",
        f"{metric_name(metric)}: best-matching layer",
        LineAxes(x_range=(0.0, 1.0), y_range=(0.0, 1.0), x_percent=True),
    )


def layers_view(folder: Path, a: str, b: str) -> dict[str, Any] | None:
    """Everything the report shows of a pair's layer-by-layer comparison, headline metric
    first; None where the layers stage has not run."""
    read = read_layers(folder)
    if read is None:
        return None
    summary, df = read
    metrics = _order(sorted(set(df.metric)))
    head = (summary.get("headline") or {}).get("metric")
    if head in metrics:
        metrics = [head, *(m for m in metrics if m != head)]
    views = [metric_view(summary, df, m, a, b) for m in metrics]
    return {
        "units": summary["units"],
        "documents": summary["documents"],
        "layers_a": summary["layers_a"],
        "layers_b": summary["layers_b"],
        "permutations": summary["settings"]["permutations"],
        "alpha": summary["settings"]["alpha"],
        "z": summary["z"],
        "floor": summary.get("floor", False),
        "key": summary.get("key"),
        "metrics": views,
    }
