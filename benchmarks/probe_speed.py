"""What the conditional probes cost, on the default run's real codes and hidden states (run
`make demo` first): every judged latent of both SAEs probed from the other model's hidden
state, its untrained copy's and both, each ridge strength chosen by 3-fold cross-validation
over the training documents, scored on the held-out documents, with the null (the same
probes on units shifted within documents) and the jackknife intervals of the three-way split.

Printed: the CPU and its matmul rates, the time of the probes against the issue's target
(<= 90 s on 2 cores), the matmul work they do and the fraction of the float32 bound that
makes, and the three-way split of each direction.

Usage: python benchmarks/probe_speed.py [--run runs/default]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from fixed_floor_cost import load_inputs

from samesheep.compare.measurement import document_groups, measure
from samesheep.compare.pair import _side_matrix, common_units, settings_of
from samesheep.compare.presence import presence, presence_sentence
from samesheep.compare.probes import INPUTS, INTERVALS, ProbeSettings
from samesheep.core.device import machine_lines, set_threads

TARGET_S = 90.0


def matmul_gflop(d: dict[str, int], latents: int, units: tuple[int, int], folds: int) -> float:
    """The dense products the probes of one direction make, in GFLOP: per fold, input and
    ridge strength the regularised inverse and the two products over latents (weights,
    then the held-in fold's error), the final fits of the probes and of the null, the
    held-out predictions of the inputs with intervals, and X'X once."""
    alphas = len(ProbeSettings().alphas)
    total = 2.0 * sum(units) * d["both"] ** 2  # X'X of every unit, once
    for name in INPUTS:
        k = d[name]
        total += folds * alphas * (2 * 2 * k * k * latents + 3 * k**3)  # cross-validation
        total += 2 * 2 * k * k * latents  # the final fits, real and null
        if name in INTERVALS:
            total += 2 * units[1] * k * latents  # held-out predictions
    return total / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default")
    args = parser.parse_args()
    threads = set_threads(0)
    lines, rates = machine_lines(torch.device("cpu"), threads)
    print("\n".join(lines))
    inp, cfg = load_inputs(Path(args.run))
    c = cfg.compare
    units = common_units(inp, c)
    a = _side_matrix(inp.a, units, "a", c.unit_value)
    b = _side_matrix(inp.b, units, "b", c.unit_value)
    groups = document_groups(units, c.groups, c.seed)
    raw = measure(a, b, None, groups, settings_of(c), True)
    result = {"units": units, "runs": {"raw": raw}, "a": a, "b": b, "groups": groups}
    start = time.perf_counter()
    summary, _ = presence(inp, result, c, torch.device("cpu"))
    seconds = time.perf_counter() - start
    held = int((units.doc >= inp.n_train_docs).sum())
    work = 0.0
    for direction, target, floor in (
        ("a_to_b", inp.b, inp.floor[1]),
        ("b_to_a", inp.a, inp.floor[0]),
    ):
        dt, df = target.store.d_model, floor.store.d_model
        d = {"target": dt, "floor": df, "both": dt + df}
        n = summary[direction]["judged"]
        work += matmul_gflop(d, n, (len(units) - held, held), c.probe_folds)
    f32 = rates["float32"].gflops if "float32" in rates else float("nan")
    print(
        f"probes {inp.a.model} / {inp.b.model}: {inp.a.d_sae:,} + {inp.b.d_sae:,} latents, "
        f"{len(units):,} units ({held:,} held out), {c.probe_folds} folds"
    )
    print(
        f"time: {seconds:.1f} s (target <= {TARGET_S:.0f} s): {seconds / TARGET_S:.2f} of the "
        f"target; {work:,.0f} GFLOP of products, {work / seconds:.0f} GFLOP/s = "
        f"{work / seconds / f32:.0%} of the float32 matmul rate"
    )
    for direction, (x, y) in (
        ("a_to_b", (inp.a.model, inp.b.model)),
        ("b_to_a", (inp.b.model, inp.a.model)),
    ):
        print(presence_sentence(summary, x, y, direction))
        null = summary[direction]["null_conditional_r2"]
        print(
            f"  null conditional R^2: median {null['median']:.4f}, "
            f"99th percentile {null['q99']:.4f}"
        )


if __name__ == "__main__":
    main()
