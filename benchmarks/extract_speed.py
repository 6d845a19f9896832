"""Extraction speed: samesheep (default settings) against the naive full-model forward.

On the same texts, in one run, for each model:
  naive     float32 AutoModelForCausalLM forward with output_hidden_states=True, the whole
            model and its LM head, batches of 16 x 128 tokens (each lead's first 128)
  samesheep extract_model with the default ExtractConfig (dtype "auto", truncated at the
            layer, no head, length-sorted batches, shards written to disk)
and the machine's float32 and bfloat16 matmul rates, the bound they imply (FLOPs per token to
the layer over the matmul rate of the dtype samesheep used), and peak memory of each step.

Each measurement runs in its own process, so peak RSS is that step's own.
Usage: python benchmarks/extract_speed.py [--docs 160] [--models gemma-3-270m ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from samesheep.core.config import ExtractConfig
from samesheep.core.device import choose_device, choose_dtype, machine_lines, set_threads
from samesheep.data.corpus import Document, iter_source, write_documents
from samesheep.lm.extraction import ModelJob, extract_model
from samesheep.lm.models import decoder_blocks, load_model, resolve_layer

LAYER = "2/3"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def texts(tokenizer, n_docs: int, length: int = 128) -> tuple[list[Document], torch.Tensor]:
    """The first n_docs leads of the shipped corpus (by id) that reach `length` tokens, cut
    after their `length`-th token: as documents for samesheep, and as ids [n_docs, length]
    for the naive forward, so both see the same tokens."""
    docs, ids = [], []
    for doc in sorted(iter_source("wiki"), key=lambda d: d.id):
        enc = tokenizer(doc.text, return_offsets_mapping=True, truncation=True, max_length=length)
        if len(enc["input_ids"]) < length:
            continue
        docs.append(Document(doc.id, doc.text[: enc["offset_mapping"][-1][1]]))
        ids.append(enc["input_ids"])
        if len(docs) == n_docs:
            break
    return docs, torch.tensor(ids)


def flops_per_token(lm, layer: int, context: float) -> float:
    """Forward FLOPs per token up to and including block `layer`: 2 per weight, plus the
    attention score and value products at the given mean context length."""
    blocks = decoder_blocks(lm.model)[: layer + 1]
    weights = sum(p.numel() for b in blocks for n, p in b.named_parameters() if p.dim() == 2)
    cfg = lm.model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 4 * (layer + 1) * context * cfg.num_attention_heads * head_dim
    return 2 * weights + attn


def naive(source: str, n_docs: int) -> dict:
    """Full fp32 forward with output_hidden_states over the texts, 16 documents a batch."""
    set_threads(0)
    device = choose_device("auto")
    lm = load_model(source, torch.float32, device)
    _, ids = texts(lm.tokenizer, n_docs)
    batches = ids.to(device).split(16)  # [16, 128] each
    with torch.inference_mode():
        lm.model(input_ids=batches[0], output_hidden_states=True)  # warm-up
        t = time.perf_counter()
        for batch in batches:
            lm.model(input_ids=batch, output_hidden_states=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
    tokens = ids.numel()
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt, "peak_rss_mb": peak_rss_mb()}


def samesheep_run(source: str, n_docs: int) -> dict:
    """samesheep's extraction with default settings over the same texts."""
    cfg = ExtractConfig()
    device = choose_device(cfg.device)
    dtype = choose_dtype(cfg.dtype, device)
    set_threads(cfg.threads)
    lm = load_model(source, dtype, device)
    layer = resolve_layer(LAYER, lm.n_layers)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        docs, _ = texts(lm.tokenizer, n_docs)
        write_documents(corpus / "train.jsonl", docs[:16])  # warm-up on a few documents
        warm = ModelJob(source, corpus, Path(tmp) / "warm", "warm")
        extract_model(warm, [LAYER], cfg, lm=lm)
        write_documents(corpus / "train.jsonl", docs)
        job = ModelJob(source, corpus, Path(tmp) / "m", "bench")
        t = time.perf_counter()
        info = extract_model(job, [LAYER], cfg, lm=lm)
        dt = time.perf_counter() - t
    tokens = info["tokens"]["train"]
    ctx = 128 / 2  # mean attended context: half the window length
    return {
        "tokens": tokens,
        "seconds": dt,
        "tok_s": tokens / dt,
        "dtype": str(dtype).removeprefix("torch."),
        "layer": layer,
        "flops_per_token": flops_per_token(lm, layer, ctx),
        "peak_rss_mb": peak_rss_mb(),
    }


def child(args: argparse.Namespace) -> None:
    fn = {"naive": naive, "samesheep": samesheep_run}[args.child]
    print(json.dumps(fn(args.models[0], args.docs)))


def measure(kind: str, source: str, n_docs: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--docs", str(n_docs), "--models", source]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        sys.exit(f"{kind} {source} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=160, help="leads of 128 tokens")
    p.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    threads = set_threads(0)
    device = choose_device("auto")
    lines, rates = machine_lines(device, threads)
    print("\n".join(lines) + ("  (both sides run on it)" if device.type == "cuda" else ""))
    fp32, bf16 = rates["float32"].gflops, rates["bfloat16"].gflops
    print(f"texts: {args.docs} leads of the shipped English Wikipedia, 128 tokens each")
    rows = []
    for source in args.models:
        ours = measure("samesheep", source, args.docs)
        base = measure("naive", source, args.docs)
        rate = bf16 if ours["dtype"] == "bfloat16" else fp32
        bound = rate * 1e9 / ours["flops_per_token"]
        rows.append((source, ours, base, bound))
        print(
            f"\n{source}  layer {ours['layer']}  ({ours['flops_per_token'] / 1e6:,.0f} MFLOP/token"
            f" to the layer)\n"
            f"  naive fp32 full forward : {base['tok_s']:8,.0f} tok/s"
            f"  ({base['tokens']:,} tokens, peak RSS {base['peak_rss_mb']:,.0f} MB)\n"
            f"  samesheep ({ours['dtype']:>8}) : {ours['tok_s']:8,.0f} tok/s"
            f"  ({ours['tokens']:,} tokens, peak RSS {ours['peak_rss_mb']:,.0f} MB)\n"
            f"  speed-up over naive     : {ours['tok_s'] / base['tok_s']:8.2f}x\n"
            f"  {ours['dtype']} bound          : {bound:8,.0f} tok/s;"
            f" samesheep reaches {ours['tok_s'] / bound:.0%} of it"
        )
    # Memory stays flat in corpus size: the same extraction over four times the text.
    source, ours = rows[0][0], rows[0][1]
    big = measure("samesheep", source, 4 * args.docs)
    print(
        f"\npeak RSS of samesheep on {source}: {ours['peak_rss_mb']:,.0f} MB for"
        f" {ours['tokens']:,} tokens, {big['peak_rss_mb']:,.0f} MB for {big['tokens']:,}"
        f" ({big['tok_s']:,.0f} tok/s)"
    )


if __name__ == "__main__":
    main()
