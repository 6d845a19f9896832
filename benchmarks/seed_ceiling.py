"""Seed ceilings per architecture: how many latents of one SAE find a partner in an SAE
trained with another seed on the same model, layer and tokens.

For TopK and ReLU + L1, at widths 8x and 16x, on Gemma-3-270m layer 12 and
SmolLM2-135M-Instruct layer 20 of the default corpus (the extraction made by
benchmarks/architectures.py), two SAEs are trained with seeds 0 and 1 at the default
settings (1M tokens, k = 32 or the target L0 of 32). Both encode every stored kept token
(train and held-out, the units the compare stage uses on one model), and the Pearson
correlation of every latent with every latent of the other seed is computed from the sparse
codes (samesheep.correlation, as the compare stage). Printed per row: the share of live
latents (firing on at least 20 tokens) whose best partner in the other seed reaches r >= 0.5,
both ways, their mean best r, the held-out FVU and L0 of both seeds.

The literature's orderings are the check, and the last lines say whether ours agree:
overlap falls as the width grows (Paulo & Belrose 2025, "Sparse autoencoders trained on the
same data learn different features"), and ReLU-L1 SAEs are more seed-stable than TopK ones
(same paper).

Trained SAEs are kept under benchmarks/.cache/seed_ceiling (keyed on their settings), so a
second run only correlates.

Usage: python benchmarks/seed_ceiling.py [--run benchmarks/.cache/architectures]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from samesheep.compare.correlation import correlation_blocks
from samesheep.core.config import TrainConfig, settings_hash
from samesheep.core.device import machine_lines, set_threads
from samesheep.data.store import Store, open_store
from samesheep.sae.evaluation import reconstruction_metrics
from samesheep.sae.model import Sae, concat_codes
from samesheep.sae.saelens import load_sae, save_sae
from samesheep.sae.training import token_filter, train_sae

CACHE = Path("benchmarks/.cache/seed_ceiling")
MODELS = {"gemma-3-270m": 12, "smollm2-135m-instruct": 20}
ARCHS = ("topk", "relu")
WIDTHS = (8, 16)
MIN_FIRES = 20
THRESHOLD = 0.5
SAME_WITHIN = 0.01
"""Shares closer than this are called no clear difference (one percentage point)."""


def trained(store: Store, cfg: TrainConfig, folder: Path) -> Sae:
    """The SAE of these settings on this store: loaded where kept, else trained and kept."""
    key = settings_hash(store.manifest["key"], dataclasses.asdict(cfg))
    stamp = folder / "key.json"
    if stamp.is_file() and json.loads(stamp.read_text())["key"] == key:
        return load_sae(folder, d_in=store.d_model)
    sae, _ = train_sae(store, cfg, folder / "train", key, label=str(folder))
    save_sae(sae, folder)
    stamp.write_text(json.dumps({"key": key}))
    return sae


@torch.inference_mode()
def unit_codes(sae: Sae, store: Store, cfg: TrainConfig) -> sp.csr_matrix:
    """[kept tokens, latents] CSR codes of every stored kept token (train, then held-out)."""
    tokens = token_filter(store, cfg)
    parts = [
        sae.encode_sparse(shard.acts[shard.mask(tokens)])
        for split in ("train", "heldout")
        for shard in store.shards(split)
    ]
    c = concat_codes(parts)
    return sp.csr_matrix(
        (c.values.double().numpy(), c.latents.numpy(), c.offsets.numpy()),
        shape=(c.tokens, sae.cfg.d_sae),
    )


def partner_shares(a: sp.csr_matrix, b: sp.csr_matrix) -> dict[str, float]:
    """Share of a's and of b's live latents with a partner r >= THRESHOLD in the other, and
    the mean best r of the live latents."""
    best_a = np.full(a.shape[1], -1.0)
    best_b = np.full(b.shape[1], -1.0)

    def visit(rows: slice, r: dict[str, np.ndarray]) -> None:
        raw = r["raw"]
        best_a[rows] = raw.max(1)
        np.maximum(best_b, raw.max(0), out=best_b)

    correlation_blocks(a, b, None, visit)
    live_a = np.asarray((a > 0).sum(0)).ravel() >= MIN_FIRES
    live_b = np.asarray((b > 0).sum(0)).ravel() >= MIN_FIRES
    return {
        "a_share": float((best_a[live_a] >= THRESHOLD).mean()),
        "b_share": float((best_b[live_b] >= THRESHOLD).mean()),
        "a_mean": float(best_a[live_a].mean()),
        "b_mean": float(best_b[live_b].mean()),
        "live_a": int(live_a.sum()),
        "live_b": int(live_b.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="benchmarks/.cache/architectures")
    args = ap.parse_args()
    threads = set_threads(0)
    lines, _ = machine_lines(torch.device("cpu"), threads)
    print("\n".join(lines))
    results = {}
    print(
        f"{'model':24} {'arch':5} {'width':>5} {'share 0->1':>10} {'share 1->0':>10} "
        f"{'mean r':>7} {'live':>11} {'FVU (s0, s1)':>15} {'L0 (s0, s1)':>12}"
    )
    for model, layer in MODELS.items():
        store = open_store(Path(args.run) / model / f"layer_{layer}" / "acts")
        for arch in ARCHS:
            for width in WIDTHS:
                codes, fvus, l0s = [], [], []
                for seed in (0, 1):
                    cfg = TrainConfig(architecture=arch, expansion_factor=width, seed=seed)
                    sae = trained(store, cfg, CACHE / model / f"{arch}-{width}x-seed{seed}")
                    m = reconstruction_metrics(sae, store, token_filter=token_filter(store, cfg))
                    fvus.append(m["fvu"])
                    l0s.append(m["l0"])
                    codes.append(unit_codes(sae, store, cfg))
                s = partner_shares(*codes)
                results[(model, arch, width)] = (s["a_share"] + s["b_share"]) / 2
                print(
                    f"{model:24} {arch:5} {width:4d}x {100 * s['a_share']:9.1f}% "
                    f"{100 * s['b_share']:9.1f}% {(s['a_mean'] + s['b_mean']) / 2:7.3f} "
                    f"{s['live_a']:5d}/{s['live_b']:5d} {fvus[0]:7.4f} {fvus[1]:7.4f} "
                    f"{l0s[0]:5.1f} {l0s[1]:5.1f}",
                    flush=True,
                )
    print()
    for model in MODELS:
        for arch in ARCHS:
            narrow, wide = results[(model, arch, 8)], results[(model, arch, 16)]
            print(
                f"{model} {arch}: overlap {100 * narrow:.1f}% at 8x, {100 * wide:.1f}% at 16x: "
                f"{verdict(narrow - wide)} 'overlap falls as width grows'"
            )
        for width in WIDTHS:
            topk, relu = results[(model, "topk", width)], results[(model, "relu", width)]
            print(
                f"{model} {width}x: ReLU {100 * relu:.1f}% vs TopK {100 * topk:.1f}%: "
                f"{verdict(relu - topk)} 'ReLU-L1 SAEs are more seed-stable than TopK ones'"
            )


def verdict(difference: float) -> str:
    """Whether a difference of shares backs an ordering: agrees past one percentage point
    either way, else says there is no clear difference."""
    if difference > SAME_WITHIN:
        return "agrees with"
    if difference < -SAME_WITHIN:
        return "DOES NOT agree with"
    return f"no clear difference (within {100 * SAME_WITHIN:.0f} point): neither backs nor refutes"


if __name__ == "__main__":
    main()
