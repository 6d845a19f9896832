"""Bounded per-group selections and counts over streams of (group, item, score) entries: the
machinery behind exemplar heaps, reservoirs and per-latent token and document counts. All of
it is vectorised numpy: a shard's million entries are merged in one sort, never one by one."""

from __future__ import annotations

import numpy as np


def rank_in_group(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank): `order` sorts rows by the key columns (most significant first; ties keep
    their input order), `rank[i]` is the position of row order[i] within its group of equal
    first keys."""
    order = np.lexsort(keys[::-1]) if len(keys) > 1 else np.argsort(keys[0], kind="stable")
    group = keys[0][order]
    n = len(group)
    if n == 0:
        return order, np.zeros(0, dtype=np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = group[1:] != group[:-1]
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, n))
    return order, np.arange(n) - np.repeat(starts, sizes)


def best_per_group(group: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest-scoring rows of each group (ties: earlier rows first), sorted
    by group, then score from high to low."""
    order, rank = rank_in_group(group, -score)
    return order[rank < n]


def best_per_group_capped(
    group: np.ndarray, sub: np.ndarray, score: np.ndarray, n: int, per_sub: int
) -> np.ndarray:
    """Like best_per_group, with at most per_sub rows of each (group, sub) pair (for
    example at most two exemplars of a latent from one document)."""
    order, _ = rank_in_group(group, sub, -score)
    g, s = group[order], sub[order]
    n_rows = len(order)
    new = np.ones(n_rows, dtype=bool)
    new[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    starts = np.flatnonzero(new)
    sub_rank = np.arange(n_rows) - np.repeat(starts, np.diff(np.append(starts, n_rows)))
    kept = order[sub_rank < per_sub]
    return kept[best_per_group(group[kept], score[kept], n)]


class TopList:
    """The n best rows of every group seen so far (with at most per_sub rows per (group,
    sub) pair), over batches: exact, memory bounded by groups x n. Rows carry any number of
    named payload columns."""

    def __init__(self, n: int, per_sub: int | None = None):
        self.n, self.per_sub = n, per_sub
        self.cols: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.cols.get("group", ()))

    def threshold(self, n_groups: int) -> np.ndarray:
        """[n_groups] the score a new row must beat to enter each group (-inf where the group
        holds fewer than n rows)."""
        out = np.full(n_groups, -np.inf)
        if len(self):
            g, s = self.cols["group"], self.cols["score"]
            counts = np.bincount(g, minlength=n_groups)
            full = counts >= self.n
            # rows are sorted by group then score, so a full group's last row is its n-th
            last = np.cumsum(counts) - 1
            out[full] = s[last[full]]
        return out

    def add(self, **cols: np.ndarray) -> None:
        """Merge a batch of rows (columns "group", "score", "sub" when capped, and payload)."""
        if not len(cols["group"]):
            return
        if self.cols:
            cols = {k: np.concatenate([self.cols[k], v]) for k, v in cols.items()}
        if self.per_sub is None:
            keep = best_per_group(cols["group"], cols["score"], self.n)
        else:
            keep = best_per_group_capped(
                cols["group"], cols["sub"], cols["score"], self.n, self.per_sub
            )
        self.cols = {k: v[keep] for k, v in cols.items()}


class PairCounter:
    """Counts and summed weights per int64 key (e.g. latent * vocab + token), merged batch by
    batch. When it holds more than `cap` keys it keeps, for each group (key // group_size),
    the `keep` keys of largest weight; `pruned` then says the tail counts may be short."""

    def __init__(self, group_size: int, cap: int = 8_000_000, keep: int = 256):
        self.group_size, self.cap, self.keep = group_size, cap, keep
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.weights = np.zeros(0, dtype=np.float64)
        self.pruned = False

    def add(self, keys: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add one count (and its weight, 1 by default) per key."""
        if not len(keys):
            return
        w = np.ones(len(keys)) if weights is None else np.asarray(weights, dtype=np.float64)
        ukeys, inverse = np.unique(keys.astype(np.int64), return_inverse=True)
        ucounts = np.bincount(inverse, minlength=len(ukeys)).astype(np.int64)
        uweights = np.bincount(inverse, weights=w, minlength=len(ukeys))
        pos = np.searchsorted(self.keys, ukeys)
        hit = pos < len(self.keys)
        hit[hit] = self.keys[pos[hit]] == ukeys[hit]
        self.counts[pos[hit]] += ucounts[hit]
        self.weights[pos[hit]] += uweights[hit]
        new = ~hit
        if new.any():
            # Two sorted runs: a stable sort merges them in linear time.
            keys_all = np.concatenate([self.keys, ukeys[new]])
            order = np.argsort(keys_all, kind="stable")
            self.keys = keys_all[order]
            self.counts = np.concatenate([self.counts, ucounts[new]])[order]
            self.weights = np.concatenate([self.weights, uweights[new]])[order]
        if len(self.keys) > self.cap:
            self.prune(self.keep)

    def prune(self, keep: int, protect: np.ndarray | None = None) -> None:
        """Keep the `keep` heaviest keys of each group, and every key where `protect`."""
        chosen = best_per_group(self.keys // self.group_size, self.weights, keep)
        mask = np.zeros(len(self.keys), dtype=bool)
        mask[chosen] = True
        if protect is not None:
            mask |= protect
        if not mask.all():
            self.pruned = protect is None or self.pruned
            self.keys, self.counts, self.weights = (
                self.keys[mask],
                self.counts[mask],
                self.weights[mask],
            )

    def by_group(self, n_groups: int) -> np.ndarray:
        """[n_groups + 1] offsets: group g holds keys[offsets[g]:offsets[g + 1]]."""
        group = self.keys // self.group_size
        return np.searchsorted(group, np.arange(n_groups + 1))
