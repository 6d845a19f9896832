"""What a crosscoder says about two or more models: which of its latents are shared and
which belong to one model, by their relative decoder norms, against the same count on the
fixed-source floor and ceiling; each model's reconstruction against its own SAE's; and the
tie back to the SAE comparison.

- the number: the crosscoder of A and B;
- the floor: the same crosscoder of A and B's untrained copy (its "shared" latents are what
  surface text alone makes shared);
- the ceiling: the same crosscoder of A and a random rotation of A, a model that represents
  exactly what A does in another basis (every latent could be shared; the share found says
  what the training finds when everything is shared).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..sae.crosscoder import Crosscoder
from ..sae.evaluation import ReconstructionStats
from ..sae.model import Sae, SparseCodes

BOOTSTRAP = 2000
"""Resamples of the latents for the intervals of the shares and the normalised score."""


@dataclass(frozen=True)
class Thresholds:
    """Where a latent's relative decoder norms ||d_i|| / sum_j ||d_j|| put it."""

    exclusive: float = 0.7
    """A latent writes to model i only where model i's relative norm is at least this."""
    shared: float = 0.3
    """A latent is shared (by every model) where each model's relative norm is at least
    this times 2 / models (0.3 for two models: relative norms between 0.3 and 0.7)."""


def latent_classes(relative: np.ndarray, t: Thresholds) -> np.ndarray:
    """[d_sae] int: i (0..models-1) for a latent that writes to model i only, `models` for a
    shared one, models + 1 for one between (some models and not others; only with three or
    more models, or thresholds that leave a gap)."""
    n, m = relative.shape
    out = np.full(n, m + 1, dtype=np.int64)
    out[(relative >= t.shared * 2 / m).all(1)] = m
    top = relative.argmax(1)
    only = relative[np.arange(n), top] >= t.exclusive
    out[only] = top[only]
    return out


def class_names(models: list[str]) -> list[str]:
    """The name of each class index of latent_classes."""
    return [f"{m} only" for m in models] + ["shared", "between"]


def class_shares(classes: np.ndarray, live: np.ndarray, models: int) -> np.ndarray:
    """[models + 2]: each class's share of the live latents."""
    counts = np.bincount(classes[live], minlength=models + 2).astype(float)
    return counts / max(int(live.sum()), 1)


def shared_share(
    runs: dict[str, tuple[np.ndarray, np.ndarray]], models: int, seed: int = 0
) -> dict[str, Any]:
    """The share of live latents that are shared, for each run ("raw", "floor", "ceiling":
    (classes, live)), each with a 95% bootstrap interval over its latents, and the
    normalised score (raw - floor) / (ceiling - floor) with the interval of the three
    resampled together."""
    rng = np.random.default_rng(seed)
    point, draws = {}, {}
    for name, (classes, live) in runs.items():
        shared = (classes[live] == models).astype(float)
        point[name] = float(shared.mean()) if len(shared) else float("nan")
        if len(shared):
            picks = rng.integers(0, len(shared), (BOOTSTRAP, len(shared)))
            draws[name] = shared[picks].mean(1)
        else:
            draws[name] = np.full(BOOTSTRAP, np.nan)
    out: dict[str, Any] = {
        name: {"share": point[name], "interval": _interval(draws[name])} for name in runs
    }
    if {"raw", "floor", "ceiling"} <= set(runs):
        out["normalised"] = {
            "score": _normalised(point["raw"], point["floor"], point["ceiling"]),
            "interval": _interval(_normalised(draws["raw"], draws["floor"], draws["ceiling"])),
        }
    return out


def _normalised(raw: Any, floor: Any, ceiling: Any) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(raw) - floor) / (np.asarray(ceiling) - floor)


def _interval(x: np.ndarray) -> list[float]:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return [float("nan"), float("nan")]
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]


def fires(codes: SparseCodes, d_sae: int) -> np.ndarray:
    """[d_sae]: units on which each latent is active."""
    return torch.bincount(codes.latents, minlength=d_sae).numpy()


@torch.no_grad()
def fvu_each(cc: Crosscoder, blocks: list[torch.Tensor], codes: SparseCodes) -> list[float]:
    """Each model's FVU with the crosscoder's reconstruction from `codes`, its codes of the
    same units."""
    recon = cc.reconstruct(codes)
    return [held_fvu(x, r, codes, cc.shape.d_sae) for x, r in zip(blocks, recon, strict=True)]


@torch.no_grad()
def sae_fvu(sae: Sae, x: torch.Tensor, codes: SparseCodes) -> float:
    """An SAE's FVU on units x from its codes of them (at the unit's last token)."""
    return held_fvu(x, sae.decode_sparse(codes), codes, sae.cfg.d_sae)


def held_fvu(x: torch.Tensor, recon: torch.Tensor, codes: SparseCodes, d_sae: int) -> float:
    """FVU as the SAE evaluation defines it (ReconstructionStats: squared error over squared
    deviations from the per-dimension mean, in float64)."""
    stats = ReconstructionStats(x.shape[1], d_sae)
    stats.update(x.float(), recon.float(), codes)
    return stats.result()["fvu"]
