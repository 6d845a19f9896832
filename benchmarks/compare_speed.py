"""Sparse streaming correlation against the dense product, on the same codes, in one run.

Synthetic TopK codes shaped like the default comparison: 10,240 latents (Gemma layer 12,
16x) against 9,216 (SmolLM2 layer 20, 16x), k = 32 active latents per unit, 200,000 units,
with planted shared features so the result is not all noise. Both sides compute the Pearson
correlation of every latent pair:
  dense   codes as dense [units, latents] float32 matrices, 10,000 units at a time, their
          [latents, latents] product by BLAS summed in float64, then the correlations: what
          a researcher would write with numpy;
  sparse  samesheep's correlation_blocks (scipy sparse products over active latents only,
          float64), raw view only, keeping each latent's top 5 partners.
Printed: both times and peak memory (each side in a fresh process), the speed-up, and the
largest difference of the best-partner correlations (float32 dense against float64 sparse).
Then the sparse side alone on two 65,536-latent SAEs (20,000 units, three views as the
compare stage runs them): its time and peak memory, which the block size bounds.

Usage: python benchmarks/compare_speed.py [--units 200000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

M_A, M_B, K = 10_240, 9_216, 32


def codes(units: int, seed: int = 0, m_a: int = M_A, m_b: int = M_B):
    """Two models' TopK-like codes on the same units: random active sets, with 2,000 latent
    pairs of A and B that fire together (shared features)."""
    import scipy.sparse as sp

    M_A, M_B = m_a, m_b
    rng = np.random.default_rng(seed)
    idx_a = np.stack([rng.choice(M_A, K, replace=False) for _ in range(2000)])
    rows_a = np.sort(rng.integers(0, M_A, (units, K)), axis=1)
    rows_b = np.sort(rng.integers(0, M_B, (units, K)), axis=1)
    shared = rng.integers(0, 2000, units)
    rows_a[:, 0] = idx_a[shared, 0]  # one shared latent per unit: latent i of A <-> i of B
    rows_b[:, 0] = idx_a[shared, 0] % M_B
    vals_a = rng.exponential(1.0, (units, K)).astype(np.float32)
    vals_b = rng.exponential(1.0, (units, K)).astype(np.float32)
    vals_b[:, 0] = vals_a[:, 0] * rng.uniform(0.7, 1.3, units)
    indptr = np.arange(0, units * K + 1, K)
    a = sp.csr_matrix(
        (vals_a.ravel().astype(np.float64), rows_a.ravel(), indptr), shape=(units, M_A)
    )
    b = sp.csr_matrix(
        (vals_b.ravel().astype(np.float64), rows_b.ravel(), indptr), shape=(units, M_B)
    )
    a.sum_duplicates()
    b.sum_duplicates()
    return a, b


def run_dense(units: int, chunk: int = 10_000) -> dict:
    a, b = codes(units)
    start = time.perf_counter()
    cross = np.zeros((M_A, M_B))  # float64 sums of float32 chunk products
    sa, sb, qa, qb = np.zeros(M_A), np.zeros(M_B), np.zeros(M_A), np.zeros(M_B)
    for lo in range(0, units, chunk):
        da = a[lo : lo + chunk].toarray().astype(np.float32)  # [chunk, M_A]
        db = b[lo : lo + chunk].toarray().astype(np.float32)
        cross += da.T @ db
        sa += da.sum(0)
        sb += db.sum(0)
        qa += (da.astype(np.float64) ** 2).sum(0)
        qb += (db.astype(np.float64) ** 2).sum(0)
    mean_a, mean_b = sa / units, sb / units
    std_a = np.sqrt(qa / units - mean_a**2)
    std_b = np.sqrt(qb / units - mean_b**2)
    r = (cross / units - np.outer(mean_a, mean_b)) / np.maximum(np.outer(std_a, std_b), 1e-12)
    return {"seconds": time.perf_counter() - start, "best": r.max(1).tolist()}


def run_sparse(units: int) -> dict:
    from samesheep.compare.correlation import TopPartners, correlation_blocks

    a, b = codes(units)
    start = time.perf_counter()
    partners = TopPartners(M_A, M_B, 5)
    correlation_blocks(a, b, None, lambda rows, v: partners.add(rows, v["raw"]))
    partners.finish()
    return {"seconds": time.perf_counter() - start, "best": partners.a_val[:, 0].tolist()}


def run_wide(units: int, m: int = 65_536) -> dict:
    """The sparse side on two 65,536-latent SAEs with the residual and token views."""
    from samesheep.compare.measurement import Settings, measure

    a, b = codes(units, m_a=m, m_b=m)
    text = np.random.default_rng(1).integers(0, units // 4, units)
    start = time.perf_counter()
    measure(a, b, text, np.arange(units) % 20, Settings())
    return {"seconds": time.perf_counter() - start, "best": []}


def child(kind: str, units: int) -> None:
    runs = {"dense": run_dense, "sparse": run_sparse, "wide": run_wide}
    out = runs[kind](units)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=200_000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.units)
    import torch

    from samesheep.core.device import machine_lines, set_threads

    lines, _ = machine_lines(torch.device("cpu"), set_threads(0))
    print("\n".join(lines))
    print(f"codes: {M_A:,} x {M_B:,} latents, k = {K}, {args.units:,} units")
    res = {}
    for kind in ("sparse", "dense"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--units", str(args.units)],
            capture_output=True,
            text=True,
            check=True,
        )
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[kind]
        print(f"{kind:6}: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_mb']:,.0f} MB")
    diff = np.abs(np.array(res["sparse"]["best"]) - np.array(res["dense"]["best"])).max()
    speedup = res["dense"]["seconds"] / res["sparse"]["seconds"]
    print(f"speed-up of sparse over dense: {speedup:.1f}x (target: at least 20x)")
    print(f"largest difference of the best-partner r: {diff:.2e} (target: within 1e-5)")
    out = subprocess.run(
        [sys.executable, __file__, "--child", "wide", "--units", "20000"],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        "65,536 x 65,536 latents, 20,000 units, raw + residual + token views, top-5 partners "
        f"and jackknife sums: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:,.0f} MB"
    )


if __name__ == "__main__":
    main()
