"""Layer-by-layer similarity speed: every layer of one model against every layer of another,
each metric of samesheep.similarity, with a within-document permutation null, in one run.

Shaped like the default models on the layer issue's sample: Gemma-3-270m's 18 layers
(d = 640) against SmolLM2-135M's 30 (d = 576), 3,000 aligned units from 150 documents. The
states are synthetic residual streams: a shared latent signal read differently at each
depth, noise, and one massive dimension per layer (as Gemma's and SmolLM2's have), so
neighbour searches and SVD truncations do the work they do on real states. Each layer is
prepared once (centring, standardising, outlier dimensions, nearest neighbours, SVCCA
bases); each pair is then scored on the true pairing and on --perms permutations of the
units within their documents.

Printed: the CPU and both matmul rates measured now, the time to prepare the layers, the
time of all pairs with the null, each metric family's share of the pair time, and the total
against the issue's target (under two minutes).

Usage: python benchmarks/layers_speed.py [--units 3000] [--perms 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from samesheep import similarity as S
from samesheep.device import machine_lines, set_threads

LAYERS_A, D_A = 18, 640
LAYERS_B, D_B = 30, 576


def states(n: int, layers: int, d: int, shared: np.ndarray, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(layers):
        depth = layer / max(layers - 1, 1)
        read = rng.standard_normal((shared.shape[1], d)) / np.sqrt(shared.shape[1])
        x = np.tanh(shared * (0.5 + depth)) @ read + rng.standard_normal((n, d)) * (
            1.0 - 0.5 * depth
        )
        x[:, rng.integers(d)] *= 90.0  # one massive dimension
        out.append(x.astype(np.float32))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=3000)
    ap.add_argument("--docs", type=int, default=150)
    ap.add_argument("--perms", type=int, default=10)
    args = ap.parse_args()
    threads = set_threads(0)
    lines, _ = machine_lines(torch.device("cpu"), threads)
    print("\n".join(lines))
    n = args.units
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((n, 48))
    docs = np.sort(rng.integers(0, args.docs, n))
    xa = states(n, LAYERS_A, D_A, shared, 1)
    xb = states(n, LAYERS_B, D_B, shared, 2)
    print(
        f"{LAYERS_A} x {LAYERS_B} layers (d = {D_A} and {D_B}), {n:,} units in {args.docs} "
        f"documents, {args.perms} within-document permutations per pair"
    )

    t0 = time.perf_counter()
    pa = [S.prepare(x) for x in xa]
    pb = [S.prepare(x) for x in xb]
    t_prep = time.perf_counter() - t0
    print(f"prepare {LAYERS_A + LAYERS_B} layers: {t_prep:.1f} s")

    perms = [S.within_group_permutation(docs, np.random.default_rng(s)) for s in range(args.perms)]
    t0 = time.perf_counter()
    best = np.zeros((LAYERS_A, LAYERS_B))
    for i, a in enumerate(pa):
        for j, b in enumerate(pb):
            best[i, j] = S.pair_metrics(a, b)["cka"]
            for perm in perms:
                S.pair_metrics(a, b, perm)
    t_pairs = time.perf_counter() - t0
    n_calls = LAYERS_A * LAYERS_B * (1 + args.perms)
    print(
        f"all {LAYERS_A * LAYERS_B} pairs, true pairing + {args.perms} permutations: "
        f"{t_pairs:.1f} s ({t_pairs / n_calls * 1e3:.1f} ms per scoring)"
    )

    # each metric family's share, timed apart on a sample of pairs
    a, b, perm = pa[LAYERS_A // 2], pb[LAYERS_B // 2], perms[0]
    reps = 20
    family = {}
    for name, fn in {
        "CKA (raw, debiased, standardised, trimmed)": lambda: S._crosses(
            a.x.T @ b.x[perm], (a.inv_sd, b.inv_sd), (a.kept, b.kept)
        ),
        "mutual kNN and CKNNA": lambda: S._knn_pair(a.neighbours, b.neighbours.permuted(perm)),
        "SVCCA sweep": lambda: [S._mean_canonical(a.bases[k], b.bases[k][perm]) for k in a.bases],
    }.items():
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        family[name] = (time.perf_counter() - t0) / reps
    whole = sum(family.values())
    for name, t in family.items():
        print(f"  {name:45s} {t * 1e3:6.1f} ms  {t / whole:5.1%}")
    total = t_prep + t_pairs
    print(f"total {total:.1f} s (target: under 120 s)")
    i, j = np.unravel_index(best.argmax(), best.shape)
    print(f"(synthetic states: the best CKA pair is layer {i} of A with layer {j} of B)")


if __name__ == "__main__":
    main()
