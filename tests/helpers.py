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
        **extra,
    }
    return [a for key, value in values.items() for a in ("--set", f"{key}={value}")]


def flat(text: str) -> str:
    """Whitespace collapsed, for matching status lines whatever their wrapping."""
    return " ".join(text.split())
