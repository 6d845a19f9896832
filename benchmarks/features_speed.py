"""Features stage speed and memory on the default run's SAEs (run `make demo` first): Gemma-3-270m
layer 12 (10,240 latents) and SmolLM2-135M layer 20 (9,216 latents), on their stores.

For each SAE, in a fresh process each time, the whole stage (compute_features: the encoding
pass, the two passes over the codes, the windows, the logit lens, the embedding view and the
tables) on the first half of the store's shards and on all of them, printing:
  - tokens/s of the encoding pass (the SAE's dense encoder product dominates it), against the
    bound the matmul rate measured here sets: 2 * d_in * d_sae FLOPs per token;
  - the time of every other phase (logit lens, embedding pooling, windows, tables);
  - peak RSS at both sizes (it must not grow with the number of tokens);
  - the projected time of the whole stage for 200,000 tokens: a line through the two
    measured sizes.
The corpus embedding (MiniLM over every document, done once per run and shared by every SAE)
is timed separately.

Usage: python benchmarks/features_speed.py [--run runs/default]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
from samesheep.core.config import FeaturesConfig, TrainConfig
from samesheep.data.corpus import CorpusReader
from samesheep.core.device import choose_device, choose_dtype, set_threads
from samesheep.features.embedding import DocumentStates
from samesheep.features.compute import CorpusInfo, FeatureSource, compute_features
from samesheep.lm.models import load_model, load_tokenizer
from samesheep.sae.saelens import load_sae
from samesheep.data.store import open_store
from samesheep.sae.training import token_filter

run, source, layer, store_dir, codes = sys.argv[1:6]
set_threads(0)
device = choose_device("auto")
dtype = choose_dtype("auto", device)
store = open_store(store_dir)
sae = load_sae(Path(run) / source / f"layer_{layer}" / "sae", device=device, d_in=store.d_model)
tok = load_tokenizer(source)
lm = load_model(source, dtype, device).model
info = CorpusInfo.load(CorpusReader(Path(run) / "corpus"))
states = DocumentStates.load(Path(run) / "corpus" / "embeddings.safetensors")
tokens = token_filter(store, TrainConfig())
src = FeatureSource(source, int(layer), "sae", sae, store, tokens, tok, lm)
t = time.perf_counter()
table, ex, cent, summary = compute_features(
    src, info, FeaturesConfig(), CodesPlace(Path(codes), "bench"), Encoding(device, dtype), states
)
summary["wall_s"] = time.perf_counter() - t
summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
summary["dtype"] = str(dtype).removeprefix("torch.")
summary["d_in"], summary["d_sae"] = sae.cfg.d_in, sae.cfg.d_sae
print(json.dumps(summary))
"""


def subset_store(store_dir: Path, names: list[str], out: Path) -> Path:
    """A store folder listing only `names` (the shard files linked, not copied)."""
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] in names]
    out.mkdir(parents=True)
    for s in manifest["shards"]:
        for ext in (".safetensors", ".tokens.parquet"):
            os.symlink(store_dir.resolve() / f"{s['name']}{ext}", out / f"{s['name']}{ext}")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def measure(run: Path, source: str, layer: int, store_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(run), source, str(layer), str(store_dir), str(Path(tmp) / "codes")]
        out = subprocess.run(
            [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False
        )
    if out.returncode != 0:
        sys.exit(f"{source} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default")
    args = ap.parse_args()
    run = Path(args.run)
    from samesheep.core.device import choose_device, machine_lines, set_threads

    device = choose_device("auto")
    lines, rates = machine_lines(device, set_threads(0))
    print("\n".join(lines))
    if not (run / "corpus" / "manifest.json").is_file():
        sys.exit(f"no run at {run}: run `make demo` first")

    # The corpus embedding, once per run (what every SAE's embedding view pools from).
    from samesheep.features.compute import corpus_states
    from samesheep.features.embedding import TextEmbedder

    cache = run / "corpus" / "embeddings.safetensors"
    cache.unlink(missing_ok=True)
    corpus_hash = json.loads((run / "corpus" / "manifest.json").read_text())["hash"]
    t = time.perf_counter()
    states = corpus_states(run / "corpus", corpus_hash, lambda: TextEmbedder(device))
    secs = time.perf_counter() - t
    n_wp = len(states.states)
    print(
        f"corpus embedding (all-MiniLM-L6-v2, once per run): {len(states.offsets) - 1:,} "
        f"documents, {n_wp:,} wordpieces in {secs:.1f} s = {n_wp / secs:,.0f} wordpieces/s"
    )

    for source, layer in (("gemma-3-270m", 12), ("smollm2-135m-instruct", 20)):
        store_dir = run / source / f"layer_{layer}" / "acts"
        if not (run / source / f"layer_{layer}" / "sae" / "cfg.json").is_file():
            print(f"{source}: no SAE in {run}; skipped")
            continue
        names = [s["name"] for s in json.loads((store_dir / "manifest.json").read_text())["shards"]]
        half_names = [n for n in names if n.startswith("train")][: len(names) // 2]
        with tempfile.TemporaryDirectory() as tmp:
            half = measure(run, source, layer, subset_store(store_dir, half_names, Path(tmp) / "h"))
        full = measure(run, source, layer, store_dir)
        rate = rates[full["dtype"]].gflops * 1e9
        flops = 2 * full["d_in"] * full["d_sae"]
        print(f"\n{source} layer {layer}: {full['d_sae']:,} latents, encoder in {full['dtype']}")
        for name, r in (("half the store", half), ("the whole store", full)):
            tokens = sum(r["tokens"].values())
            t = r["timings_s"]
            tps = tokens / t["stream"]
            print(
                f"  {name:16} {tokens:8,} tokens: encoding pass {tps:8,.0f} tok/s "
                f"({tps * flops / rate:.0%} of the {full['dtype']} matmul bound "
                f"{rate / flops:,.0f} tok/s); whole stage {r['wall_s']:6.1f} s; "
                f"peak RSS {r['peak_rss_mb']:,.0f} MB"
            )
            print("    phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
        # The whole stage's time as a line through the two measured sizes: what grows with
        # the tokens (the passes) and what grows only with the latents (windows, logit lens,
        # embedding view, tables) are then read off the measurements, not assumed.
        n_half, n_full = (sum(r["tokens"].values()) for r in (half, full))
        slope = (full["wall_s"] - half["wall_s"]) / max(n_full - n_half, 1)
        fixed = full["wall_s"] - slope * n_full
        print(
            f"  projected for 200,000 tokens: {fixed + slope * 200_000:.0f} s (a line through "
            f"both sizes: {1e6 * slope:.0f} s per million tokens + {fixed:.0f} s per SAE); "
            "target: under 60 s"
        )


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
