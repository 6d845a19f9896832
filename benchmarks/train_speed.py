"""SAE training speed and quality: samesheep's TopK trainer against EleutherAI sparsify's
SparseCoder (PyPI eai-sparsify, a benchmark-only dependency) with its default optimizer.

In one run, on the same cached Gemma-3-270m layer-12 activations (about 300k training tokens;
held-out tokens from held-out documents), batch for batch (the same 4,096-token batches in the
same order, drawn once from samesheep's shuffled stream and held in memory), width 16x, k = 32,
one pass:
  sparsify   SparseCoder, float32, as its trainer drives it by default: b_dec set to the first
             batch's mean, unit-norm decoder, FVU loss, decoder-parallel gradient removed,
             schedule-free SignSGD (momentum 0.95, lr 5e-3 / sqrt(latents / 2^14))
  samesheep  train_step with the default TrainConfig, the encoder product in float32 and
             in bfloat16 (the choice of the default dtype rests on this comparison)
Like for like, twice: both sides with AuxK off (sparsify's default), then both with AuxK on
at samesheep's default weight (0.5) and dead-latent window (12,288 tokens), sparsify's AuxK
as its trainer computes it; each ratio is against sparsify in the same setting.
Only the training loop is timed (the batches are already in memory for both). Held-out
metrics on every held-out token (special tokens and window position 0 left out, as in
training): FVU, L0, dead % (never active on the held-out set).

The bound: 4 * d * m FLOPs per token (the dense encoder forward and its weight gradient,
~26 MFLOP at d=640, 16x) over the matmul rate measured here, in each side's dtype; also with
a dense decoder (6 * d * m, ~40 MFLOP).

Then peak memory of samesheep's own trainer (train_sae, streaming from the store), each in a
fresh process, for two numbers of training tokens: it must not grow with them.

Usage: python benchmarks/train_speed.py [--tokens 300000] [--skip-sparsify] [--skip-memory]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import subprocess
import sys
import time

import torch

import samesheep
from samesheep.core.config import TrainConfig
from samesheep.core.device import fast_bf16, machine_lines, set_threads
from samesheep.data.store import open_store
from samesheep.sae.training import (
    batch_stream,
    filter_counts,
    input_statistics,
    new_state,
    token_filter,
    train_step,
)

RUN = "benchmarks/.cache/gemma-300k"
LAYER = 12


def prepare(tokens: int):
    """Extract Gemma layer 12 for `tokens` training tokens (cached; skipped when present)."""
    samesheep.extract(
        None,
        run_dir=RUN,
        models=["gemma-3-270m"],
        layers=[LAYER],
        corpus__max_tokens=tokens + 10_000,
        corpus__heldout_tokens=20_000,
    )
    return open_store(f"{RUN}/gemma-3-270m/layer_{LAYER}/acts")


def heldout(store, cfg: TrainConfig) -> torch.Tensor:
    tokens = token_filter(store, cfg)
    return torch.cat([s.acts[s.mask(tokens)] for s in store.shards("heldout")]).float()


def evaluate(encode_decode, x: torch.Tensor, m: int) -> dict[str, float]:
    """FVU, L0 and dead % on held-out rows; encode_decode(batch) -> (recon, active indices,
    active mask)."""
    err = active = 0.0
    fired = torch.zeros(m, dtype=torch.bool)
    with torch.no_grad():
        for b in x.split(4096):
            recon, idx, on = encode_decode(b)
            err += (recon - b).double().pow(2).sum().item()
            active += on.sum().item()
            fired[idx[on]] = True
    total = (x - x.mean(0)).double().pow(2).sum().item()
    return {"fvu": err / total, "l0": active / x.shape[0], "dead": 100 * (1 - fired.float().mean())}


def run_sparsify(batches, x_eval, d: int, cfg: TrainConfig) -> tuple[float, dict]:
    """sparsify's trainer loop; with cfg.auxk_alpha > 0, AuxK on as its trainer runs it
    (dead = not fired for cfg.dead_tokens tokens, loss fvu + auxk_alpha * auxk)."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(cfg.seed)
    sae = SparseCoder(d, SparseCoderConfig(expansion_factor=cfg.expansion_factor, k=cfg.k))
    lr = 5e-3 / (sae.num_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    start = time.perf_counter()
    for i, b in enumerate(batches):
        x = b.float()
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        if cfg.auxk_alpha > 0:
            out = sae(x, dead_mask=since_fired > cfg.dead_tokens)
            (out.fvu + cfg.auxk_alpha * out.auxk_loss).backward()
            since_fired += x.shape[0]
            since_fired[out.latent_indices.flatten()] = 0
        else:
            out = sae(x)
            out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    opt.eval()  # schedule-free: evaluate the averaged weights, as sparsify saves them

    def encode_decode(b):
        out = sae(b)
        return out.sae_out, out.latent_indices, out.latent_acts > 0

    return seconds, evaluate(encode_decode, x_eval, sae.num_latents)


def run_samesheep(batches, x_eval, store, cfg: TrainConfig, dtype) -> tuple[float, dict]:
    scale, mean = input_statistics(store, token_filter(store, cfg))
    state = new_state(cfg, store.d_model, scale, mean, torch.device("cpu"))
    start = time.perf_counter()
    for b in batches:
        train_step(state, b, cfg, dtype, len(batches))
    seconds = time.perf_counter() - start
    sae = state.sae

    def encode_decode(b):
        codes = sae.encode_sparse(b)
        return sae.decode_sparse(codes), codes.latents, codes.values > 0

    return seconds, evaluate(encode_decode, x_eval, sae.cfg.d_sae)


MEMORY_SCRIPT = """
import resource, sys, tempfile
from pathlib import Path
from samesheep.core.config import TrainConfig
from samesheep.data.store import open_store
from samesheep.sae.training import train_sae
cfg = TrainConfig(train_tokens=int(sys.argv[2]), splice_tokens=0)
with tempfile.TemporaryDirectory() as tmp:
    _, summary = train_sae(open_store(sys.argv[1]), cfg, Path(tmp), "memory")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, summary["tokens_per_second"])
"""


def peak_memory(store, tokens: int) -> tuple[float, float]:
    """(peak RSS in MB, tokens/s) of train_sae for `tokens` training tokens, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(store.folder), str(tokens)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--skip-sparsify", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    threads = set_threads(0)
    lines, rates = machine_lines(torch.device("cpu"), threads)
    print("\n".join(lines))
    f32, bf16 = rates["float32"].gflops, rates["bfloat16"].gflops
    # bfloat16 products without hardware support run single-threaded, orders of magnitude
    # slower (1 GFLOP/s measured on an AVX2-only EPYC): that side would take hours.
    sides = [("float32", torch.float32, f32)]
    if fast_bf16(torch.device("cpu")):
        sides.append(("bfloat16", torch.bfloat16, bf16))

    store = prepare(args.tokens)
    cfg = TrainConfig()  # defaults: topk, 16x, k=32, batches of 4,096
    tokens = token_filter(store, cfg)
    n_steps = min(args.tokens, filter_counts(store, tokens)[0]) // cfg.batch_tokens
    batches = list(itertools.islice(batch_stream(store, cfg, tokens), n_steps))
    x_eval = heldout(store, cfg)
    d = store.d_model
    m = cfg.expansion_factor * d
    n_tok = n_steps * cfg.batch_tokens
    print(
        f"gemma-3-270m layer {LAYER}: d={d}, {m:,} latents, k={cfg.k}, {n_steps} batches of "
        f"{cfg.batch_tokens:,} = {n_tok:,} training tokens (one pass), "
        f"{x_eval.shape[0]:,} held-out tokens"
    )
    enc_flops, dense_flops = 4 * d * m, 6 * d * m
    print(
        f"bound: {enc_flops / 1e6:.1f} MFLOP/token (dense encoder fwd + weight grad), "
        f"{dense_flops / 1e6:.1f} with a dense decoder"
    )

    header = f"{'':34} {'tok/s':>8} {'ratio':>6} {'of bound':>9} {'(dense dec.)':>12}"
    print(header + f" {'FVU':>7} {'L0':>6} {'dead %':>7}")
    # Like for like: both sides with AuxK off (sparsify's default), then both with it on at
    # the same weight and dead-latent window (samesheep's defaults); each ratio is against
    # sparsify in the same setting.
    for auxk in ("off", "on"):
        setting = cfg if auxk == "on" else dataclasses.replace(cfg, auxk_alpha=0.0)
        rows = []
        if not args.skip_sparsify:
            secs, metrics = run_sparsify(batches, x_eval, d, setting)
            rows.append((f"sparsify 1.3.3 (float32) AuxK {auxk}", secs, metrics, f32))
        for name, dtype, rate in sides:
            secs, metrics = run_samesheep(batches, x_eval, store, setting, dtype)
            rows.append((f"samesheep ({name}) AuxK {auxk}", secs, metrics, rate))
        base = n_tok / rows[0][1]
        for name, secs, mt, rate in rows:
            tps = n_tok / secs
            bound = rate * 1e9 / enc_flops
            print(
                f"{name:34} {tps:8,.0f} {tps / base:5.2f}x {100 * tps / bound:8.0f}% "
                f"{100 * tps * dense_flops / (rate * 1e9):11.0f}% {mt['fvu']:7.4f} "
                f"{mt['l0']:6.1f} {mt['dead']:7.2f}",
                flush=True,
            )
    if len(sides) == 2:
        f32_fvu, bf16_fvu = rows[-2][2]["fvu"], rows[-1][2]["fvu"]
        rel = (bf16_fvu - f32_fvu) / f32_fvu
        print(
            f"bfloat16 encoder: held-out FVU {100 * rel:+.2f}% relative to float32 "
            f"({'within' if abs(rel) <= 0.01 else 'outside'} the 1% tolerance)"
        )
        assert math.isfinite(rel)
    else:
        print("bfloat16 encoder: skipped (no fast bfloat16 on this CPU)")
    if not args.skip_memory:
        for tokens in (100_000, 4 * n_tok):
            rss, tps = peak_memory(store, tokens)
            print(
                f"train_sae streaming from the store, {tokens:,} training tokens: "
                f"peak RSS {rss:,.0f} MB ({tps:,.0f} tok/s)"
            )


if __name__ == "__main__":
    main()
