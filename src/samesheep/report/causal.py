"""What the report shows of the causal check (`samesheep causal`), where it has run: its
answer in the overview, a list of pair pages for the sampled pairs, and on each of them both
latents' effect profiles over the held-out text."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..core.constants import SUMMARY
from ..core.errors import SamesheepError
from ..core.files import read_json
from .data import segments, sig

WINDOWS = 3
"""Documents whose effects a pair page shows, those with the largest effects first."""
MAX_CHARS = 600
"""The longest stretch of a document one effect window shows."""


def causal_summary(folder: Path) -> dict[str, Any] | None:
    """The causal check's summary.json where it has run (and finished), else None."""
    summary = read_json(folder / SUMMARY, corrupt_is_missing=True)
    return summary or None


def _read(folder: Path, name: str) -> Any:
    try:
        return pq.read_table(folder / name).to_pandas()
    except Exception as e:  # a damaged file surfaces as many exception types
        raise SamesheepError(
            f"cannot read {folder / name}: {e}; run `samesheep causal` again"
        ) from None


def _window(rows: Any, text: str) -> dict[str, Any]:
    """One document's effects: the text whose log-probability each intervention changed (the
    unit after each firing unit), shaded by the change, around the largest one."""
    size = (rows.effect_a.abs() + rows.effect_b.abs()).to_numpy()
    top = rows.iloc[int(np.argmax(size))]
    lo = max(0, int(top.end) - MAX_CHARS // 2)
    hi = min(len(text), max(lo + MAX_CHARS, int(top.next_end)))
    inside = rows[(rows.end >= lo) & (rows.next_end <= hi)]
    spans = {
        side: [
            (int(r.end) - lo, int(r.next_end) - lo, float(getattr(r, f"effect_{side}")))
            for r in inside.itertuples()
        ]
        for side in ("a", "b")
    }
    return {
        "text": text[lo:hi],
        "a": segments(spans["a"], hi - lo),
        "b": segments(spans["b"], hi - lo),
        # each row shaded against its own largest change, as activations against theirs
        "max_a": float(max(np.abs(inside.effect_a).max(), 1e-12)),
        "max_b": float(max(np.abs(inside.effect_b).max(), 1e-12)),
    }


def _number(v: Any) -> float | None:
    return sig(float(v)) if v is not None and math.isfinite(float(v)) else None


def causal_pairs(folder: Path, texts: list[str]) -> dict[tuple[int, int], dict[str, Any]]:
    """Per sampled pair (latent of A, latent of B): its agreement, floor, ceiling, label and
    the effect windows of its pair page (texts: every document, train then held-out, by
    global number)."""
    pairs = _read(folder, "pairs.parquet")
    profiles = _read(folder, "profiles.parquet")
    by_pair = dict(list(profiles.groupby(["latent_a", "latent_b"])))
    out = {}
    for r in pairs.itertuples():
        key = (int(r.latent_a), int(r.latent_b))
        windows = []
        rows = by_pair.get(key)
        if rows is not None and len(rows):
            size = (rows.effect_a.abs() + rows.effect_b.abs()).groupby(rows.doc).sum()
            for doc in size.sort_values(ascending=False).index[:WINDOWS]:
                if not 0 <= int(doc) < len(texts):
                    raise SamesheepError(
                        f"{folder / 'profiles.parquet'} names document {doc}, which the "
                        "corpus does not hold: run `samesheep causal` again"
                    )
                windows.append(_window(rows[rows.doc == doc], texts[int(doc)]))
        out[key] = {
            "agreement": _number(r.agreement),
            "floor": _number(r.floor_agreement),
            "ceiling": _number(r.ceiling_agreement),
            "label": r.label,
            "units": int(r.units),
            "windows": windows,
        }
    return out


def causal_order(causal: dict[tuple[int, int], dict[str, Any]]) -> list[tuple[int, int]]:
    """The sampled pairs, highest agreement first (those without one last)."""
    return sorted(causal, key=lambda k: -(causal[k]["agreement"] or -math.inf))
