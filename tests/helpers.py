"""Helpers shared by the test files: a small corpus and CLI settings for small runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from samesheep.interpret.prompts import Example

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


# ---------------------------------------------------------------- shared by several test files


ERROR_PREFIX = "samesheep: error: "


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m samesheep ARGS` offline, with the test's private cache."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    assert full.get("SAMESHEEP_CACHE"), "tests must never write to the user's cache"
    return subprocess.run(
        [sys.executable, "-m", "samesheep", *args],
        capture_output=True,
        text=True,
        env=full,
        # a guard against a hang, not a time limit: a whole tiny pipeline takes 3-5 min on
        # a busy 2-core machine
        timeout=900,
    )


def cli_parallel(
    jobs: dict[str, tuple[list[str], dict[str, str]]],
) -> dict[str, subprocess.CompletedProcess]:
    """Run several independent commands at once (each pays the torch import on its own)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(cli, *args, env=env) for name, (args, env) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_one_line_error(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert lines[0][len(ERROR_PREFIX) :].strip(), "the error line says nothing"


def assert_nothing_half_written(folder: Path, cache: bool = False) -> None:
    """No temporary files, no activation shards, no store or stage marked complete; in the
    model cache, only whole conversions (other tests may have converted a GGUF there)."""
    if not folder.exists():
        return
    for p in folder.rglob("*"):
        assert not p.name.endswith(".tmp"), p
        assert not (p.name.startswith(".") and p.is_dir()), f"temporary folder left: {p}"
        if cache:
            assert p.suffix != ".safetensors" or (p.parent / "config.json").is_file(), p
        else:
            assert p.suffix != ".safetensors", p
        if p.name in ("manifest.json", "extract.json"):
            assert not json.loads(p.read_text()).get("complete"), p


def token_clusters(store, tokenizer) -> dict[tuple[str, int, int, int], tuple[int, int, str]]:
    """{(split, doc_index, char_start, char_end) of every stored token with characters:
    (start, end, decoded text) of its run of overlapping tokens}. A token alone in its span
    decodes to itself; byte pieces of one character decode together to the character."""
    out = {}
    for shard in store.shards(None):
        t = shard.tokens.select(["doc_index", "token_id", "char_start", "char_end"]).to_pydict()
        run, key = [], None
        rows = zip(t["doc_index"], t["token_id"], t["char_start"], t["char_end"], strict=True)
        for doc, tid, a, b in [*rows, (None, None, None, None)]:
            if run and (doc != key or a >= max(e for _, _, e in run)):
                lo, hi = run[0][1], max(e for _, _, e in run)
                text = tokenizer.decode([i for i, _, _ in run])
                for _, s, e in run:
                    out[(shard.split, key, s, e)] = (lo, hi, text)
                run = []
            if doc is not None and b > a:
                run.append((tid, a, b))
                key = doc
    return out


def assert_token_spans(exemplars, docs: dict[str, list[str]], store, tokenizer) -> int:
    """Every exemplar token's span is a stored token's, and its text there is that token's
    own decoded text (or, for byte pieces sharing or overlapping a character's span, the
    run of pieces decodes to the characters the run covers). Returns the tokens checked."""
    clusters = token_clusters(store, tokenizer)
    checked = 0
    for row in exemplars.itertuples():
        doc = docs[row.split][row.doc_index]
        assert row.text == doc[row.char_start : row.char_end]
        for s, e in zip(row.token_starts, row.token_ends, strict=True):
            a, b = row.char_start + s, row.char_start + e
            lo, hi, text = clusters[(row.split, row.doc_index, a, b)]
            assert text == doc[lo:hi], (row.text, doc[lo:hi], text)
            if (lo, hi) == (a, b):  # a token alone (or byte pieces of one character)
                assert row.text[s:e] == text, (row.text, row.text[s:e], text)
            checked += 1
    return checked


def window(text: str, firing: list[int], values: list[float]) -> Example:
    """A window of whitespace-separated tokens, those at `firing` with `values`."""
    starts, ends, at = [], [], 0
    for word in text.split(" "):
        starts.append(at)
        ends.append(at + len(word))
        at += len(word) + 1
    acts = np.zeros(len(starts))
    acts[firing] = values
    return Example(text, np.array(starts), np.array(ends), acts, float(max(values, default=0)))


def load_same_outputs():
    """scripts/same_outputs.py as a module (it is a script, not part of the package)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "same_outputs.py"
    spec = importlib.util.spec_from_file_location("same_outputs", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module
