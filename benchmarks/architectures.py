"""All four SAE architectures on both default models at the default settings, in one run.

Each architecture (TopK, BatchTopK, JumpReLU, ReLU + L1) is trained by the pipeline's own
train stage (`samesheep.sae.stage.train_stage`: 1M training tokens, width 16x, k = 32 or the
target L0 of 32, the default learning rate, AuxK on) on Gemma-3-270m layer 12 and
SmolLM2-135M-Instruct layer 20 of the default corpus, and evaluated as the train stage
evaluates every SAE: held-out FVU, L0, dead latents (never active on the held-out tokens),
CE loss recovered with the SAE spliced into the model, and training tokens per second.

The issue's target, checked and printed: every architecture at L0 within 25% of 32 reaches a
held-out FVU within 15% of TopK's on the same model, with under 10% dead latents.

The run directory (default benchmarks/.cache/architectures) holds one extraction, made on the
first run (about 3 minutes here); each architecture's SAEs then replace the last one's.

Usage: python benchmarks/architectures.py [--run DIR] [--archs topk,relu]
"""

from __future__ import annotations

import argparse
import time

import torch

import samesheep
from samesheep import pipeline
from samesheep.core.constants import ARCHITECTURES
from samesheep.core.device import machine_lines, set_threads

TARGET_L0 = 32
FVU_WITHIN = 0.15
L0_WITHIN = 0.25
DEAD_UNDER = 0.10


def settings(run: str, arch: str) -> dict:
    return {
        "run_dir": run,
        "train__architecture": arch,
        "compare__floor": False,
        "compare__ceiling": False,
        "representations__enabled": False,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="benchmarks/.cache/architectures")
    ap.add_argument("--archs", default=",".join(ARCHITECTURES))
    args = ap.parse_args()
    archs = args.archs.split(",")
    threads = set_threads(0)
    lines, _ = machine_lines(torch.device("cpu"), threads)
    print("\n".join(lines))
    samesheep.extract(None, **settings(args.run, "topk"))

    rows = []
    for arch in archs:
        cfg = samesheep._config(None, settings(args.run, arch))
        start = time.perf_counter()
        results = pipeline.train_stage(cfg)
        seconds = time.perf_counter() - start
        for model, by_layer in results.items():
            for layer, m in by_layer.items():
                rows.append((arch, model, layer, m, seconds))

    print()
    print(
        f"{'architecture':12} {'model':24} {'layer':>5} {'FVU':>7} {'L0':>6} {'dead %':>7} "
        f"{'CE rec.':>8} {'tok/s':>7}"
    )
    topk = {(r[1], r[2]): r[3]["fvu"] for r in rows if r[0] == "topk"}
    failures = []
    for arch, model, layer, m, _ in rows:
        tps = m["training"]["tokens_per_second"] or 0
        print(
            f"{arch:12} {model:24} {layer:5d} {m['fvu']:7.4f} {m['l0']:6.1f} "
            f"{100 * m['dead_fraction']:7.2f} {100 * m.get('ce_loss_score', float('nan')):7.1f}% "
            f"{tps:7,.0f}"
        )
        base = topk.get((model, layer))
        checks = {
            "L0": abs(m["l0"] - TARGET_L0) <= L0_WITHIN * TARGET_L0,
            "dead": m["dead_fraction"] < DEAD_UNDER,
            "FVU": base is None or m["fvu"] <= (1 + FVU_WITHIN) * base,
        }
        failures += [f"{arch} on {model}: {k}" for k, ok in checks.items() if not ok]
    print()
    print(
        f"target (L0 within {100 * L0_WITHIN:.0f}% of {TARGET_L0}, FVU within "
        f"{100 * FVU_WITHIN:.0f}% of TopK's, under {100 * DEAD_UNDER:.0f}% dead): "
        + ("met by every architecture" if not failures else "missed: " + "; ".join(failures))
    )


if __name__ == "__main__":
    main()
