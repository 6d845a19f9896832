"""Shared, spread out, or absent: every judged latent of each model labelled by its partner
in the other model's SAE and by conditional probes of the other model's hidden state (see
probes.py), with the three-way split per direction and its jackknife intervals."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch

from ..core.config import CompareConfig
from ..core.progress import step
from ..data.alignment import Units
from .measurement import Measurement, dropped_best, shifted_within_documents
from .pair import HEADLINE_R, MIN_CROSSFIT_DOCUMENTS, PairInputs, best_of, crossfit_of
from .probes import (
    LABELS,
    DirectionProbes,
    LabelRule,
    ProbeData,
    ProbeSettings,
    fit_probes,
    label_split,
)


def null_order(units: Units, first_heldout: int, seed: int) -> np.ndarray:
    """The units' order in the null: shifted within documents; where every document is one
    unit, shuffled among the documents of the same split instead (the probes' training and
    held-out units stay apart)."""
    if len(np.unique(units.doc)) < len(units):
        return shifted_within_documents(units, seed)
    rng = np.random.default_rng(seed)
    perm = np.arange(len(units))
    for part in (units.doc < first_heldout, units.doc >= first_heldout):
        rows = np.flatnonzero(part)
        perm[rows] = rows[rng.permutation(len(rows))]
    return perm


def _best(raw: Measurement, direction: str, crossfit: bool) -> tuple[np.ndarray, list]:
    """Each source latent's best partner r (as the headline reads it) and its values with
    each document group left out."""
    best = crossfit_of(raw, direction)[0] if crossfit else best_of(raw, "raw", direction)[0]
    return best, dropped_best(raw, direction, crossfit)


def direction_probes(
    y: sp.csr_matrix,
    x: dict[str, np.ndarray],
    units: tuple[Units, np.ndarray],
    judged: np.ndarray,
    inp: tuple[int, CompareConfig, Any],
) -> DirectionProbes:
    """The probes of the judged source latents (y: [units, latents]) from the target's
    inputs x ("target", "floor"), and the same probes on the null's order of the units;
    `units`: the units and their document groups (the headline's jackknife groups)."""
    units, groups = units
    first_heldout, cfg, device = inp
    cols = np.flatnonzero(judged)
    data = ProbeData(y[:, cols].tocsr(), x, units.doc, first_heldout, groups)
    settings = ProbeSettings(folds=cfg.probe_folds, seed=cfg.seed)
    order = null_order(units, first_heldout, cfg.seed)
    fitted, fitted_null = fit_probes(data, settings, device, order)
    n = y.shape[1]
    result = fitted.columns(slice(None), n, cols)
    null = fitted_null.columns(slice(None), n, cols)
    cond = result.conditional()
    probed = judged & np.isfinite(cond) & np.isfinite(result.r2["target"])
    return DirectionProbes(result, null, probed)


def presence(
    inp: PairInputs, result: dict[str, Any], cfg: CompareConfig, device: torch.device | str
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]] | None:
    """(the summary's "presence" entry, per side the partner table's probe columns), or
    None where the comparison has no floor (the probes need the untrained copies) or the
    probes are off."""
    if (
        not cfg.probes
        or inp.floor is None
        or any(s.store is None for s in (inp.a, inp.b, *inp.floor))
    ):
        return None
    units, raw = result["units"], result["runs"]["raw"]
    n_docs = len(np.unique(units.doc))
    crossfit = raw.half_of_group is not None and n_docs >= MIN_CROSSFIT_DOCUMENTS
    rule = LabelRule(HEADLINE_R, cfg.probe_min_r2)
    summary: dict[str, Any] = {
        "mode": "crossfit" if crossfit else "in_sample",
        "labels": LABELS,
        "folds": cfg.probe_folds,
    }
    columns = {}
    fa, fb = inp.floor
    plan = (
        ("a_to_b", "a", result["a"], (inp.b, fb), units.row_b, raw.fires_a),
        ("b_to_a", "b", result["b"], (inp.a, fa), units.row_a, raw.fires_b),
    )
    for direction, side, y, (target, floor), rows, fires in plan:
        with step(f"probes {direction}: {target.model} and {floor.model} hidden states"):
            x = {"target": target.store.rows(rows).numpy(), "floor": floor.store.rows(rows).numpy()}
            judged = fires >= cfg.min_fires
            where = (units, result["groups"])
            probes = direction_probes(y, x, where, judged, (inp.n_train_docs, cfg, device))
            del x
        labels, split = label_split(probes, _best(raw, direction, crossfit), rule)
        split["judged"] = int(judged.sum())
        summary[direction] = split
        r, nr = probes.result, probes.null
        values = {
            "probe_r2": r.r2["target"],
            "probe_r2_floor": r.r2["floor"],
            "probe_r2_both": r.r2["both"],
            "probe_conditional_r2": r.conditional(),
            "probe_null_conditional_r2": nr.conditional(),
        }
        columns[side] = {
            **{k: np.where(probes.probed, v, math.nan) for k, v in values.items()},
            "presence": np.where(probes.probed, labels, ""),
        }
    return summary, columns


def with_presence(partners: pa.Table, columns: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """The partner table (side a's rows, then side b's) with the probe columns added."""
    for name in columns["a"]:
        values = np.concatenate([columns["a"][name], columns["b"][name]])
        partners = partners.append_column(name, pa.array(values))
    return partners


def presence_sentence(summary: dict[str, Any], x: str, y: str, direction: str) -> str:
    """'of A's 9,384 judged latents (probed in B), 11% are shared as latents (95% CI
    11-12%), 8% present but spread out (...), 81% absent (...)'."""
    e = summary.get(direction)
    if not e or not e.get("probed"):
        return f"{x} -> {y}: no latent could be probed"
    parts = []
    for k, name in (("shared", "are shared as latents"), *list(LABELS.items())[1:]):
        lo, hi = e["intervals"][k]
        ci = f"95% CI {100 * lo:.0f}-{100 * hi:.0f}%" if math.isfinite(lo) else "no interval"
        parts.append(f"{100 * e['shares'][k]:.0f}% {name} ({ci})")
    return (
        f"Of {x}'s {e['probed']:,} judged latents (probed in {y}), "
        + ", ".join(parts[:-1])
        + f", {parts[-1]}"
    )
