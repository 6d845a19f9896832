"""The report's layer-by-layer view of a pair of models: a heatmap per metric (the trained
models beside their random-weights copies, on one colour scale), cells that do not pass the
corrected null threshold grey, each layer's best match framed, and the best-matching layer
against depth with its interval."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..files import read_json
from .plots import COLORS, Grid, Series, heatmap, line_plot

NAMES = {
    "cka_trimmed": "linear CKA, outlier dimensions removed",
    "cka": "linear CKA",
    "cka_debiased": "linear CKA, unbiased HSIC",
    "cka_standardized": "linear CKA, standardised dimensions",
    "mutual_knn": "mutual k-nearest neighbours",
    "cknna": "CKNNA",
}
"""Each metric's name on the page, the headline first; SVCCA settings follow."""


def metric_name(metric: str) -> str:
    if metric.startswith("svcca@"):
        return f"SVCCA keeping {metric.split('@', 1)[1]} of the variance"
    return NAMES.get(metric, metric)


def _order(metrics: list[str]) -> list[str]:
    known = [m for m in NAMES if m in metrics]
    return known + sorted(m for m in metrics if m not in NAMES)


def read_layers(folder: Path) -> tuple[dict[str, Any], Any] | None:
    """(layers.json, layers.parquet as a DataFrame) of a pair, or None where the layers stage
    has not written them."""
    summary = read_json(folder / "layers.json", corrupt_is_missing=True)
    if not summary or not (folder / "layers.parquet").is_file():
        return None
    return summary, pq.read_table(folder / "layers.parquet").to_pandas()


def _matrix(df: Any, column: str, n_a: int, n_b: int) -> np.ndarray:
    m = np.full((n_a, n_b), np.nan)
    m[df.layer_a.to_numpy(), df.layer_b.to_numpy()] = df[column].to_numpy(dtype=float)
    return m


def _tip(a: str, b: str, i: int, j: int, row: dict[str, float]) -> str:
    floor = row["floor"]
    floor_text = f", random-weights floor {floor:.3f}" if math.isfinite(floor) else ""
    verdict = "above" if row["value"] > row["threshold"] else "not above"
    return (
        f"{a} layer {i}, {b} layer {j}: {row['value']:.3f} (null {row['null_mean']:.3f} "
        f"± {row['null_sd']:.3f}; {verdict} the corrected threshold {row['threshold']:.3f}"
        f"{floor_text})"
    )


def metric_view(summary: dict[str, Any], df: Any, metric: str, a: str, b: str) -> dict[str, Any]:
    """The heatmaps of one metric (trained pair, floor) and its best-match plot."""
    n_a, n_b = summary["layers_a"], summary["layers_b"]
    part = df[df.metric == metric]
    cols = {
        c: _matrix(part, c, n_a, n_b)
        for c in ("value", "threshold", "floor", "null_mean", "null_sd")
    }
    both = np.concatenate([cols["value"].ravel(), cols["floor"].ravel()])
    finite = both[np.isfinite(both)]
    scale = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    best = summary["best"].get(metric, {}).get("a_to_b", [])
    outlined = [r["best"] for r in best]
    tips = [
        [_tip(a, b, i, j, {c: float(cols[c][i, j]) for c in cols}) for j in range(n_b)]
        for i in range(n_a)
    ]
    passes = (cols["value"] > cols["threshold"]).tolist()
    x_label, y_label = f"{b} layer", f"{a} layer"
    trained = heatmap(
        Grid(cols["value"].tolist(), passes, outlined, tips),
        x_label, y_label, f"{metric_name(metric)}: {a} against {b}", scale,
    )  # fmt: skip
    floor = None
    if np.isfinite(cols["floor"]).any():
        floor = heatmap(
            Grid(cols["floor"].tolist()),
            x_label, y_label, f"{metric_name(metric)}: random-weights copies", scale,
        )  # fmt: skip
    return {
        "metric": metric,
        "name": metric_name(metric),
        "trained": trained,
        "floor": floor,
        "above": int(np.sum(passes)),
        "interval": bool(best) and all("interval" in r for r in best),
        "pairs": n_a * n_b,
        "best_plot": best_plot(best, n_a, n_b, a, b, metric),
    }


def best_plot(best: list[dict[str, Any]], n_a: int, n_b: int, a: str, b: str, metric: str) -> Any:
    """The best-matching layer of B (as a share of B's depth) against A's depth, with the
    95% range over document halves where there is one, and the diagonal of equal depth."""
    if not best:
        return None
    x = [(r["layer"] + 1) / n_a for r in best]
    tips = []
    for r in best:
        where = ""
        if "interval" in r:
            lo, hi = r["interval"]
            where = f" (95% range {lo}-{hi}, {100 * r['agree']:.0f}% of document halves agree)"
        tips.append(f"{a} layer {r['layer']} best matches {b} layer {r['best']}{where}")
    series = [
        Series("best match", COLORS["raw"],
               [(xi, (r["best"] + 1) / n_b) for xi, r in zip(x, best, strict=True)], tips=tips),
        Series("equal depth", COLORS["null"], [(0.0, 0.0), (1.0, 1.0)], dash="3 3",
               tips=["", ""]),
    ]  # fmt: skip
    if all("interval" in r for r in best):
        for k, name in ((0, "95% range"), (1, "")):  # one legend entry for both bounds
            pts = [(xi, (r["interval"][k] + 1) / n_b) for xi, r in zip(x, best, strict=True)]
            series.append(Series(name, COLORS["ceiling"], pts, dash="2 2"))
    return line_plot(
        series,
        f"{a}: depth of the layer",
        f"{b}: depth of its best match",
        f"{metric_name(metric)}: best-matching layer",
        x_range=(0.0, 1.0),
        y_range=(0.0, 1.0),
        x_percent=True,
    )


def layers_view(folder: Path, a: str, b: str) -> dict[str, Any] | None:
    """Everything the report shows of a pair's layer-by-layer comparison, headline metric
    first; None where the layers stage has not run."""
    read = read_layers(folder)
    if read is None:
        return None
    summary, df = read
    views = [metric_view(summary, df, m, a, b) for m in _order(sorted(set(df.metric)))]
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
