"""Helpers shared by the test files: a small corpus and CLI settings for small runs."""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "The cat sat on the mat and looked at the sea.",
    "Paris is the capital and largest city of France, on the Seine.",
    "In 1969 the first people walked on the Moon; millions watched.",
    "Rivers run to the sea, and the sea is never full.",
    "A sparse autoencoder learns a dictionary of directions.",
]


def write_corpus(path: Path, n: int = 40, titles: bool = False) -> Path:
    """A JSONL corpus of n short documents, some long enough for several windows."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 7))
            row = {"id": f"doc{i}", "text": text, **({"title": f"Doc {i}"} if titles else {})}
            f.write(json.dumps(row) + "\n")
    return path


def sets(run_dir: Path, model: str | Path, corpus: Path, **extra: str) -> list[str]:
    """--set arguments for a small run; values are TOML."""
    values = {
        "corpus.source": json.dumps(str(corpus)),
        "corpus.max_tokens": "3000",
        "corpus.heldout_tokens": "500",
        "extract.shard_tokens": "500",
        "models": json.dumps([str(model)]),
        "layers": "[1]",
        "run_dir": json.dumps(str(run_dir)),
        "train.expansion_factor": "4",
        "train.k": "8",
        "train.batch_tokens": "256",
        "train.train_tokens": "5120",
        "train.splice_tokens": "400",
        "train.threads": "1",
        **extra,
    }
    return [a for key, value in values.items() for a in ("--set", f"{key}={value}")]


def flat(text: str) -> str:
    """Whitespace collapsed, for matching status lines whatever their wrapping."""
    return " ".join(text.split())


def write_store(folder: Path, splits: dict, shard_tokens: int = 1000, context: int = 50) -> Path:
    """An activation store of given activations {split: [tokens, d] tensor}, laid out as
    extraction lays it out: windows of `context` tokens whose position 0 is a special token."""
    import numpy as np
    import pyarrow as pa
    import torch

    from samesheep.data.store import TOKEN_SCHEMA, StoreWriter

    d = next(iter(splits.values())).shape[1]
    header = {
        "key": "synthetic",
        "layer": 0,
        "d_model": d,
        "model": "synthetic",
        "n_layers": 1,
        "dtype": "float32",
        "compute_dtype": "float32",
        "device": "cpu",
        "context_length": context,
        "prefix_ids": [0],
    }
    writer = StoreWriter(folder, header)
    for split, acts in splits.items():
        for i, lo in enumerate(range(0, acts.shape[0], shard_tokens)):
            chunk = acts[lo : lo + shard_tokens].float().contiguous()
            n = chunk.shape[0]
            pos = np.arange(lo, lo + n) % context
            table = pa.table(
                {
                    "doc_index": np.arange(lo, lo + n) // context,
                    "doc_id": [f"d{j // context}" for j in range(lo, lo + n)],
                    "window": np.zeros(n, dtype=np.int32),
                    "position": pos,
                    "token_id": np.ones(n, dtype=np.int32),
                    "char_start": pos,
                    "char_end": pos + 1,
                    "special": pos == 0,
                    "norm": chunk.norm(dim=1).numpy(),
                }
            ).cast(TOKEN_SCHEMA)
            writer.write(f"{split}-{i:05d}", split, chunk.to(torch.float32), table)
    writer.finish()
    return folder


def sparse_data(n: int, d: int = 32, n_dirs: int = 64, k: int = 4, seed: int = 0):
    """(data [n, d], directions [n_dirs, d]): each row a sum of k random unit directions
    with magnitudes between 0.5 and 1.5, plus an offset."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_dirs, generator=g).argsort(dim=1)[:, :k]
    mags = 0.5 + torch.rand(n, k, generator=g)
    coef = torch.zeros(n, n_dirs).scatter_(1, idx, mags)
    return coef @ dirs + 0.3, dirs


def copy_run(run_dir: Path, args: list[str], to: Path) -> tuple[Path, list[str]]:
    """A copy of a run folder, and the CLI arguments pointing at the copy (a test may then
    damage it without touching the module's shared run)."""
    import shutil

    shutil.copytree(run_dir, to)
    return to, [a.replace(str(run_dir), str(to)) for a in args]
