"""What the causal stage costs on the default run (run `make demo` first): 200 mutual pairs
(the default), each latent ablated where it fires in its model's forward pass on the
held-out documents, its floor (a random latent of B of the same firing frequency) and its
ceiling (its partner in A's second-seed SAE), timed as `samesheep causal` runs them.

Printed: the CPU and its matmul rates, the stage's time, its ratio to the issue's target
(200 pairs in at most 5 minutes on 2 cores), and the medians of agreement, floor and
ceiling with the share of pairs that agree in effect.

The stage writes into the run (runs/<run>/causal/), as `samesheep causal` does; its done
marker is removed first so that the stage runs whatever was there.

Usage: python benchmarks/causal_speed.py [--run runs/default] [--pairs 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from samesheep.causal.check import AGREES
from samesheep.causal.stage import causal_stage
from samesheep.core import config as config_mod
from samesheep.core.config import CausalConfig
from samesheep.core.constants import SUMMARY
from samesheep.core.device import (
    choose_device,
    choose_dtype,
    dtype_name,
    machine_lines,
    set_threads,
)
from samesheep.core.plan import compare_pairs
from samesheep.core.rundir import causal_folder
from samesheep.lm.models import model_depth, resolve_layer

TARGET_S = 300.0
"""The issue's target: 200 pairs on the default held-out set in at most 5 minutes."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    threads = set_threads(0)
    lines, _ = machine_lines(torch.device("cpu"), threads)
    print("\n".join(lines))
    cfg = config_mod.load(Path(args.run) / "config.toml")
    # the stage's defaults, whatever causal settings the run's recorded config holds
    cfg = dataclasses.replace(cfg, causal=CausalConfig(pairs=args.pairs))
    for a, b in compare_pairs(cfg):
        spec = cfg.layers[0]
        la = resolve_layer(spec, model_depth(a, cfg.trust_remote_code))
        lb = resolve_layer(spec, model_depth(b, cfg.trust_remote_code))
        (causal_folder(cfg, a, b, la, lb) / SUMMARY).unlink(missing_ok=True)
    device = choose_device(cfg.causal.device)
    print(f"compute dtype: {dtype_name(choose_dtype(cfg.causal.dtype, device))}")
    start = time.perf_counter()
    results = causal_stage(cfg)
    seconds = time.perf_counter() - start
    for (a, b, la, lb), s in results.items():
        d = s["distributions"]

        def med(kind: str, d=d) -> str:
            m, ci = d[kind]["median"], d[kind].get("interval")
            if m is None:
                return "none"
            return f"{m:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

        print(
            f"causal {a} layer {la} / {b} layer {lb}: {s['pairs']} pairs "
            f"(max_docs {s['settings']['max_docs']}), {s['scored_units']:,} scored units"
        )
        print(
            f"median agreement {med('agreement')} (n = {d['agreement']['n']}), "
            f"floor {med('floor')} (n = {d['floor']['n']}), "
            f"ceiling {med('ceiling')} (n = {d['ceiling']['n']})"
        )
        d["spearman"], d["above_floor"] = s["agreement_spearman"], s["above_floor"]
        print(
            f"rank (Spearman) agreement {med('spearman')}; per pair above its own floor "
            f"{med('above_floor')} (medians, 95% bootstrap intervals over the pairs)"
        )
        threshold = s["threshold"]
        print(
            f"agree in activation and in effect: {s['labels'].get(AGREES, 0.0):.1%} "
            f"(threshold {threshold if threshold is None else round(threshold, 3)}); "
            f"labels {s['labels']}"
        )
    print(
        f"time: {seconds:.1f} s for the stage (target {TARGET_S:.0f} s): "
        f"{seconds / TARGET_S:.2f}x the target"
    )


if __name__ == "__main__":
    main()
