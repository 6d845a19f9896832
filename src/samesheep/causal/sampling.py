"""Which pairs the causal check runs: mutual pairs stratified by firing frequency, each with
its floor latent (a random latent of B of the same firing frequency) and its ceiling latent
(the partner of A's latent in A's second-seed SAE)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

STRATA = 10
"""Firing-frequency strata of the sampled pairs: deciles of A's firing counts."""
FLOOR_BINS = 100
"""B's live latents are split into this many bins of equal count by firing count; a pair's
floor latent is drawn from its partner's bin."""


@dataclass
class Sample:
    """The sampled pairs, one entry each."""

    latent_a: np.ndarray
    latent_b: np.ndarray
    r: np.ndarray
    fires_a: np.ndarray
    fires_b: np.ndarray
    stratum: np.ndarray  # decile of fires_a among the mutual pairs, 0 = rarest
    floor_b: np.ndarray  # a latent of B in latent_b's frequency bin, never latent_b
    ceiling_a: np.ndarray  # latent_a's partner in A's second-seed SAE, -1 where none

    def __len__(self) -> int:
        return len(self.latent_a)


def strata(fires: np.ndarray, n: int = STRATA) -> np.ndarray:
    """The stratum of each count: its quantile bin (0..n-1) among `fires`, by rank, so that
    ties never empty a bin and every bin holds about len(fires)/n entries."""
    order = np.argsort(fires, kind="stable")
    out = np.empty(len(fires), dtype=np.int64)
    out[order] = np.arange(len(fires)) * n // max(len(fires), 1)
    return out


def stratified(groups: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to n entries, as equal a number from each group as the groups hold
    (a group with too few gives all it has, the others share the rest), each group's at
    random; sorted."""
    members = [rng.permutation(np.flatnonzero(groups == g)) for g in np.unique(groups)]
    taken = [0] * len(members)
    total = 0
    while total < n:
        open_ = [k for k, m in enumerate(members) if taken[k] < len(m)]
        if not open_:
            break
        for k in open_:
            if total == n:
                break
            taken[k] += 1
            total += 1
    picked = [m[:t] for m, t in zip(members, taken, strict=True)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def floor_latents(
    latent_b: np.ndarray, fires_all_b: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each latent of B, another live latent of B from the same firing-frequency bin
    (FLOOR_BINS bins of equal count over B's live latents), at random."""
    live = np.flatnonzero(fires_all_b > 0)
    bins = np.full(len(fires_all_b), -1, dtype=np.int64)
    bins[live] = strata(fires_all_b[live], min(FLOOR_BINS, len(live)))
    out = np.empty(len(latent_b), dtype=np.int64)
    for k, j in enumerate(latent_b.tolist()):
        same = live[(bins[live] == bins[j]) & (live != j)]
        if len(same) == 0:  # j alone in its bin (or dead): the nearest live latents by fires
            others = live[live != j]
            gap = np.abs(fires_all_b[others] - fires_all_b[j])
            same = others[gap == gap.min()]
        out[k] = rng.choice(same)
    return out


def sample_pairs(pairs: pa.Table, partners: pa.Table, n: int, rng: np.random.Generator) -> Sample:
    """Up to n mutual pairs of a comparison's pairs table, stratified by deciles of A's
    firing counts, with their floor latents (from the partners table's firing counts of B)
    and their ceiling latents (its ceiling_partner of A, where the comparison has one)."""
    p = {c: pairs.column(c).to_numpy() for c in ("latent_a", "latent_b", "r", "fires_a", "fires_b")}
    mutual = np.flatnonzero(pairs.column("mutual").to_numpy(zero_copy_only=False))
    deciles = strata(p["fires_a"][mutual])
    take = mutual[stratified(deciles, n, rng)]
    stratum = deciles[np.searchsorted(mutual, take)]
    side = partners.column("side").to_numpy(zero_copy_only=False)
    latent = partners.column("latent").to_numpy()
    fires = partners.column("fires").to_numpy()
    is_b = side == "b"
    fires_all_b = np.zeros(int(latent[is_b].max()) + 1 if is_b.any() else 0, dtype=np.int64)
    fires_all_b[latent[is_b]] = fires[is_b]
    ceiling = np.full(int(latent.max()) + 1 if len(latent) else 0, -1, dtype=np.int64)
    if "ceiling_partner" in partners.column_names:
        cp = partners.column("ceiling_partner").to_numpy(zero_copy_only=False)
        a = (side == "a") & ~np.isnan(np.asarray(cp, dtype=float))
        ceiling[latent[a]] = np.asarray(cp[a], dtype=np.int64)
    latent_b = p["latent_b"][take].astype(np.int64)
    return Sample(
        latent_a=p["latent_a"][take].astype(np.int64),
        latent_b=latent_b,
        r=p["r"][take].astype(np.float64),
        fires_a=p["fires_a"][take].astype(np.int64),
        fires_b=p["fires_b"][take].astype(np.int64),
        stratum=stratum,
        floor_b=floor_latents(latent_b, fires_all_b, rng),
        ceiling_a=ceiling[p["latent_a"][take]],
    )
