"""On-disk activation store: safetensors shards, a Parquet token table per shard, a manifest.

A store is one folder per model and layer:

    manifest.json                  what is complete; a shard exists only once listed here
    train-00000.safetensors        {"acts": [tokens, d]} in the store dtype
    train-00000.tokens.parquet     one row per token: doc_index, doc_id, window, position,
                                   token_id, char_start, char_end, special
    heldout-00000...               the same for held-out documents

The token table carries everything that decides which tokens the SAE stages use (see
TokenFilter): whether a token is special, its position in its window, and its norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.cache import FILES, damaged, digests
from ..core.constants import SPLITS
from ..core.device import DTYPES
from ..core.errors import SamesheepError
from ..core.files import atomic_path, read_json, remove_stale_temporaries, write_json

MANIFEST = "manifest.json"
SHARD_FILES = (".safetensors", ".tokens.parquet")
FLOAT16_MAX = 65504.0
MEDIAN_SAMPLE = 2_000_000
"""At most this many norms (an evenly spaced subset) give a store's median token norm."""

TOKEN_SCHEMA = pa.schema(
    [
        ("doc_index", pa.int32()),  # line of the document in corpus/<split>.jsonl
        ("doc_id", pa.string()),
        ("window", pa.int32()),  # window of the document (long documents have several)
        ("position", pa.int32()),  # position in the window; 0 is the attention sink
        ("token_id", pa.int32()),
        ("char_start", pa.int32()),  # character span of the token in the document text
        ("char_end", pa.int32()),
        ("special", pa.bool_()),  # BOS/EOS/pad and other special tokens
        ("norm", pa.float32()),  # L2 norm of the stored activation
    ]
)


@dataclass(frozen=True)
class TokenFilter:
    """Which stored tokens the SAE stages use (training, evaluation and every later stage):
    by default neither special tokens, nor position 0 of a window (the attention sink), nor
    tokens whose norm exceeds max_norm (massive activations, which would otherwise carry
    every squared-error metric)."""

    skip_special: bool = True
    skip_first: bool = True
    max_norm: float = math.inf

    def keep(self, tokens: pa.Table) -> np.ndarray:
        """[rows] bool: the rows of a token table to use."""
        keep = np.ones(tokens.num_rows, dtype=bool)
        if self.skip_special:
            keep &= ~tokens.column("special").to_numpy(zero_copy_only=False)
        if self.skip_first:
            keep &= tokens.column("position").to_numpy() != 0
        return keep & ~self.outliers(tokens)

    def outliers(self, tokens: pa.Table) -> np.ndarray:
        """[rows] bool: rows whose norm exceeds max_norm."""
        if math.isinf(self.max_norm):
            return np.zeros(tokens.num_rows, dtype=bool)
        return tokens.column("norm").to_numpy() > self.max_norm

    def to_dict(self) -> dict[str, Any]:
        return {
            "skip_special": self.skip_special,
            "skip_first": self.skip_first,
            "max_norm": None if math.isinf(self.max_norm) else self.max_norm,
        }


@dataclass
class Shard:
    """One shard: activations and the token table, row for row."""

    name: str
    split: str
    acts: torch.Tensor  # [tokens, d]
    tokens: pa.Table  # TOKEN_SCHEMA, one row per activation row

    def mask(self, token_filter: TokenFilter | None = None) -> torch.Tensor:
        """[rows] bool: the rows to use; by default neither special tokens nor position 0
        (attention sinks). Pass the store's token_filter(...) to leave outliers out too."""
        return torch.from_numpy((token_filter or TokenFilter()).keep(self.tokens))

    def select(self, token_filter: TokenFilter | None = None) -> tuple[torch.Tensor, pa.Table]:
        """(activations [kept, d], token table of the same rows): the kept rows, row for row."""
        keep = (token_filter or TokenFilter()).keep(self.tokens)
        return self.acts[torch.from_numpy(keep)], self.tokens.filter(pa.array(keep))


def to_store_dtype(acts: torch.Tensor, dtype: str, where: str) -> torch.Tensor:
    """Cast activations for storage, failing (shard named) on values that are or would be
    non-finite: never write inf or NaN."""
    if not torch.isfinite(acts).all():
        raise SamesheepError(f"non-finite activations in {where}: refusing to write them")
    if dtype == "float16" and acts.abs().max().item() > FLOAT16_MAX:
        peak = acts.abs().max().item()
        raise SamesheepError(
            f"{where}: |x| reaches {peak:,.0f}, past float16's 65,504; "
            'use store_dtype = "bfloat16" or "float32"'
        )
    if dtype not in DTYPES:
        raise SamesheepError(f"unknown store dtype {dtype!r} (use {', '.join(DTYPES)})")
    return acts.to(DTYPES[dtype]).contiguous()


def shard_intact(folder: Path, entry: dict[str, Any]) -> bool:
    """Whether a listed shard's files are on disk and, where the manifest recorded their
    digests, still what was written."""
    names = [f"{entry['name']}{ext}" for ext in SHARD_FILES]
    if not all((folder / n).is_file() for n in names):
        return False
    return not damaged(folder, entry.get(FILES, {}))


def store_intact(folder: Path) -> bool:
    """Whether a store is complete and every shard it lists is still on disk, intact."""
    manifest = read_json(folder / MANIFEST, corrupt_is_missing=True)
    if not manifest or not manifest.get("complete"):
        return False
    return all(shard_intact(folder, s) for s in manifest["shards"])


class StoreWriter:
    """Writes shards atomically and records each in the manifest once it is whole."""

    def __init__(self, folder: Path, header: dict[str, Any]):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SamesheepError(f"cannot write to {self.folder}: {e.strerror}") from None
        remove_stale_temporaries(self.folder)
        old = read_json(self.folder / MANIFEST, corrupt_is_missing=True)
        if old is not None and old.get("key") == header["key"]:
            self.manifest = old
            # A shard listed but gone from disk (deleted by hand), or damaged since (its
            # files differ from their recorded digests), is written again.
            present = [s for s in old["shards"] if shard_intact(self.folder, s)]
            if len(present) != len(old["shards"]):
                self.manifest = {**old, "shards": present, "complete": False}
                write_json(self.folder / MANIFEST, self.manifest)
        else:  # new settings or inputs: what is here belongs to another run
            for ext in SHARD_FILES:
                for p in self.folder.glob(f"*-*{ext}"):
                    p.unlink()
            self.manifest = {**header, "shards": [], "complete": False}
            write_json(self.folder / MANIFEST, self.manifest)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def has(self, name: str) -> bool:
        """Whether shard `name` is complete on disk."""
        return any(s["name"] == name for s in self.manifest["shards"])

    def write(self, name: str, split: str, acts: torch.Tensor, tokens: pa.Table, **info: Any):
        """Write one shard (activations already in the store dtype) and list it."""
        assert acts.shape[0] == tokens.num_rows, "one token row per activation row"
        # No safetensors metadata: it is written from a hash map in an order that changes
        # between processes, and equal stores must be equal byte for byte.
        with atomic_path(self.folder / f"{name}.safetensors") as tmp:
            save_file({"acts": acts.cpu()}, str(tmp))
        with atomic_path(self.folder / f"{name}.tokens.parquet") as tmp:
            pq.write_table(tokens, tmp, compression="zstd")
        entry = {"name": name, "split": split, "tokens": int(acts.shape[0]), **info}
        entry[FILES] = digests(self.folder, [self.folder / f"{name}{ext}" for ext in SHARD_FILES])
        shards = [s for s in self.manifest["shards"] if s["name"] != name] + [entry]
        # Extraction order, whatever order shards were (re)written in: a shard rewritten
        # after being deleted keeps its place, so batch order and the input scale stay put.
        shards.sort(key=lambda s: (SPLITS.index(s["split"]), s["name"]))
        self.manifest["shards"] = shards
        write_json(self.folder / MANIFEST, self.manifest)

    def finish(self, **totals: Any) -> None:
        """Mark the store complete."""
        self.manifest.update(totals, complete=True)
        write_json(self.folder / MANIFEST, self.manifest)


class Store:
    """Reads a store: its manifest, and its shards one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = read_json(self.folder / MANIFEST)
        if manifest is None:
            raise SamesheepError(f"no activation store at {self.folder}: run `samesheep extract`")
        self.manifest: dict[str, Any] = manifest
        self._medians: dict[str, float] = {}

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def layer(self) -> int:
        return int(self.manifest["layer"])

    def shard_names(self, split: str | None = "train") -> list[str]:
        """Names of the complete shards of a split (all splits for None)."""
        return [s["name"] for s in self.manifest["shards"] if split in (None, s["split"])]

    def num_tokens(self, split: str | None = "train") -> int:
        """Stored tokens in a split, special tokens included."""
        return sum(s["tokens"] for s in self.manifest["shards"] if split in (None, s["split"]))

    def median_norm(self, split: str = "train") -> float:
        """Median activation norm of a split's ordinary tokens (neither special nor at
        position 0), from the token tables; an evenly spaced subset of at most
        MEDIAN_SAMPLE norms on very large stores."""
        if split in self._medians:
            return self._medians[split]
        stride = max(1, math.ceil(self.num_tokens(split) / MEDIAN_SAMPLE))
        parts = []
        for name in self.shard_names(split):
            table = pq.read_table(
                self.folder / f"{name}.tokens.parquet", columns=["special", "position", "norm"]
            )
            parts.append(table.column("norm").to_numpy()[TokenFilter().keep(table)][::stride])
        norms = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        if norms.size == 0:
            raise SamesheepError(f"{self.folder} holds no ordinary {split} tokens")
        self._medians[split] = float(np.median(norms))
        return self._medians[split]

    def token_filter(
        self, skip_special: bool = True, skip_first: bool = True, max_norm_ratio: float = 0.0
    ) -> TokenFilter:
        """The TokenFilter whose norm limit is max_norm_ratio times the median norm of the
        training tokens (no limit for 0)."""
        limit = max_norm_ratio * self.median_norm("train") if max_norm_ratio > 0 else math.inf
        return TokenFilter(skip_special, skip_first, limit)

    def read_tokens(self, name: str) -> pa.Table:
        """The token table of one shard (no activations)."""
        path = self.folder / f"{name}.tokens.parquet"
        try:
            return pq.read_table(path)
        except Exception as e:  # a damaged file surfaces as many exception types
            raise SamesheepError(f"cannot read token table {path}: {e}") from None

    def read(self, name: str) -> Shard:
        """Load one shard."""
        entry = next((s for s in self.manifest["shards"] if s["name"] == name), None)
        if entry is None:
            raise SamesheepError(f"{self.folder} has no complete shard {name!r}")
        path = self.folder / f"{name}.safetensors"
        try:
            with safe_open(str(path), framework="pt") as f:
                acts = f.get_tensor("acts")
            tokens = pq.read_table(self.folder / f"{name}.tokens.parquet")
        except Exception as e:  # a damaged file surfaces as many exception types
            raise SamesheepError(f"cannot read shard {path}: {e}") from None
        if acts.shape[0] != tokens.num_rows or acts.shape[0] != entry["tokens"]:
            raise SamesheepError(f"shard {path} does not match its token table (corrupt?)")
        return Shard(name, entry["split"], acts, tokens)

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """[len(rows), d_model] float32: the activations at store rows `rows` (numbered over
        every shard in manifest order, as TokenRows numbers them), in that order; one shard
        in memory at a time."""
        rows = np.asarray(rows, dtype=np.int64)
        out = torch.zeros(len(rows), self.d_model, dtype=torch.float32)
        lo = 0
        for entry in self.manifest["shards"]:
            hi = lo + int(entry["tokens"])
            mine = np.flatnonzero((rows >= lo) & (rows < hi))
            if len(mine):
                acts = self.read(entry["name"]).acts
                out[torch.from_numpy(mine)] = acts[torch.from_numpy(rows[mine] - lo)].float()
            lo = hi
        if len(rows) and (rows.min() < 0 or rows.max() >= lo):
            raise SamesheepError(f"{self.folder} has {lo:,} rows; row {rows.max():,} asked for")
        return out

    def shards(self, split: str | None = "train") -> Iterator[Shard]:
        """Yield the shards of a split in order, one in memory at a time."""
        for name in self.shard_names(split):
            yield self.read(name)


def open_store(folder: str | Path) -> Store:
    """Open an activation store folder for reading."""
    return Store(folder)
