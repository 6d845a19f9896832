"""Crosscoder training against SAE training, side by side on the default run's stores (run
`make demo` first): both models' SAEs, then the crosscoder of the pair on the aligned
units, each for the same number of optimizer steps with the run's train settings.

Printed: the CPU and its matmul rates; each SAE's tokens/s and the crosscoder's units/s
(one unit is one token position of each model, so its tokens/s per model is its units/s);
the ratio of the crosscoder's rate to each SAE's against the issue's target (within a
factor of 2: a ratio >= 0.5); and each run's encoder product in GFLOP/s as a fraction of
the matmul rate of the dtype it computes in (measured in the same run).

Nothing is written into the run: the checkpoints go to a temporary folder.

Usage: python benchmarks/crosscoder_speed.py [--run runs/default] [--steps 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from samesheep.compare.crosscode import read_group, role_blocks
from samesheep.compare.stage import compare_corpus
from samesheep.core import config as config_mod
from samesheep.core.device import (
    choose_device,
    choose_dtype,
    dtype_name,
    machine_lines,
    set_threads,
)
from samesheep.core.plan import compare_pairs
from samesheep.core.rundir import run_path
from samesheep.lm.models import model_depth, resolve_layer
from samesheep.sae.crosscoder import CrosscoderShape, CrosscodeSettings, Workplace, train_crosscoder
from samesheep.sae.stage import layer_store
from samesheep.sae.training import sae_config, train_sae

TARGET_RATIO = 0.5
"""The issue's target: the crosscoder's tokens/s per model within a factor of 2 of the SAE's."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    threads = set_threads(0)
    lines, rates = machine_lines(torch.device("cpu"), threads)
    print("\n".join(lines))
    cfg = config_mod.load(Path(args.run) / "config.toml")
    cfg = dataclasses.replace(cfg, crosscode=config_mod.load(None, []).crosscode)
    tc = dataclasses.replace(cfg.train, train_tokens=args.steps * cfg.train.batch_tokens)
    dtype = dtype_name(choose_dtype(tc.dtype, choose_device(tc.device)))
    bound = rates[dtype].gflops
    a, b = compare_pairs(cfg)[0]
    layers = [resolve_layer(cfg.layers[0], model_depth(m, cfg.trust_remote_code)) for m in (a, b)]
    sae_rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, layer in zip((a, b), layers, strict=True):
            store = layer_store(cfg, model, layer)
            _, summary = train_sae(store, tc, Path(tmp) / model.replace("/", "_"), "bench")
            rate = summary["tokens_per_second"]
            d_sae = sae_config(tc, store.d_model).d_sae
            gflops = rate * 2 * store.d_model * d_sae / 1e9
            sae_rates[model] = rate
            print(
                f"SAE of {model} ({tc.architecture}, {store.d_model} x {d_sae:,}, {dtype}): "
                f"{rate:,.0f} tokens/s; encoder product {gflops:.0f} GFLOP/s, "
                f"{gflops / bound:.0%} of the {dtype} matmul rate"
            )
        _, texts, n_train = compare_corpus(run_path(cfg))
        lengths = np.array([len(t) for t in texts], dtype=np.int64)
        group = read_group(cfg, [a, b], layers, (lengths, n_train))
        blocks = role_blocks(group, 0)["main"]
        widths = tuple(x.shape[1] for x in blocks)
        xc = cfg.crosscode
        d_sae = xc.width or round(tc.expansion_factor * float(np.mean(widths)))
        shape = CrosscoderShape(widths, d_sae, xc.k or tc.k, xc.dedicated)
        settings = CrosscodeSettings(shape, args.steps * tc.batch_tokens, xc.seed)
        rows = np.flatnonzero(group.doc < n_train)
        _, summary = train_crosscoder(blocks, rows, tc, settings, Workplace(Path(tmp) / "cc", "b"))
    rate = summary["units_per_second"]
    gflops = rate * 2 * sum(widths) * d_sae / 1e9
    print(
        f"crosscoder of both ({sum(widths)} x {d_sae:,}, batchtopk, k {shape.k}, {dtype}): "
        f"{rate:,.0f} units/s = {rate:,.0f} tokens/s per model; encoder product "
        f"{gflops:.0f} GFLOP/s, {gflops / bound:.0%} of the {dtype} matmul rate"
    )
    both = 1 / sum(1 / r for r in sae_rates.values())
    print(
        f"crosscoder / both SAEs it stands for (each trained on the same number of tokens): "
        f"{rate / both:.2f}x ({1e6 / rate:.0f} s per million units against "
        f"{1e6 / both:.0f} s for a million tokens of each model's SAE)"
    )
    for model, sae_rate in sae_rates.items():
        ratio = rate / sae_rate
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        print(
            f"crosscoder / SAE of {model}: {ratio:.2f}x per model "
            f"({verdict} the target of >= {TARGET_RATIO})"
        )


if __name__ == "__main__":
    main()
