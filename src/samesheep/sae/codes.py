"""An SAE's sparse codes over an activation store, streamed shard by shard with their token
rows, and kept on disk so that later passes (exemplar windows, the comparison of models)
read them instead of encoding again.

A codes folder mirrors a store: one file per shard,

    manifest.json                  the key (SAE, store, token filter) and the finished shards
    train-00000.safetensors        {"values": [nnz] float32, "latents": [nnz] int32,
                                    "offsets": [kept + 1] int64}

holding the codes of the shard's kept rows (TokenFilter) in row order: kept row i has the
entries offsets[i]:offsets[i + 1].
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.cache import FILES, damaged, digest
from ..core.errors import SamesheepError
from ..core.files import atomic_path, read_json, remove_stale_temporaries, write_json
from ..core.progress import progress
from ..data.store import Store, TokenFilter
from .model import Sae, SparseCodes, concat_codes

MANIFEST = "manifest.json"


@dataclass
class CodedShard:
    """One shard's kept token rows and their codes, row for row."""

    name: str
    split: str
    tokens: pa.Table  # the store's token table, kept rows only
    codes: SparseCodes  # on the CPU, one CSR row per kept row
    all_tokens: pa.Table  # the whole token table of the shard
    keep: np.ndarray  # [all rows] bool: the kept rows
    encoded: bool  # False where the codes were read from disk


def _save(path: Path, codes: SparseCodes) -> None:
    tensors = {
        "values": codes.values.float().contiguous().cpu(),
        "latents": codes.latents.to(torch.int32).contiguous().cpu(),
        "offsets": codes.offsets.contiguous().cpu(),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _load(path: Path, rows: int) -> SparseCodes:
    try:
        with safe_open(str(path), framework="pt") as f:
            values, latents = f.get_tensor("values"), f.get_tensor("latents").long()
            offsets = f.get_tensor("offsets")
    except (SafetensorError, OSError, ValueError) as e:
        raise SamesheepError(f"cannot read codes {path}: {e}; delete it to encode again") from None
    if offsets.numel() != rows + 1 or int(offsets[-1]) != values.numel() != latents.numel():
        raise SamesheepError(f"codes {path} do not match their shard; delete it to encode again")
    return SparseCodes(values, latents, offsets)


@dataclass(frozen=True)
class Encoding:
    """How an SAE encodes a store: on which device, the encoder product's dtype, tokens
    per batch, and the progress bar's label."""

    device: torch.device
    dtype: torch.dtype | None = None
    batch_tokens: int = 4096
    label: str = "encode"


@torch.inference_mode()
def stream_codes(
    sae: Sae,
    store: Store,
    token_filter: TokenFilter,
    folder: Path,
    key: str,
    encoding: Encoding,
) -> Iterator[CodedShard]:
    """The codes of every shard of the store (train split, then held-out), in order: read
    from `folder` where a shard's codes were written under the same key, else encoded (the
    encoder product in `encoding.dtype`) and written there. A killed run resumes from the
    shards already written. The SAE must be on `encoding.device`."""
    device, dtype, batch_tokens = encoding.device, encoding.dtype, encoding.batch_tokens
    if store.d_model != sae.cfg.d_in:
        raise SamesheepError(
            f"the SAE reads {sae.cfg.d_in} dimensions but {store.folder} holds {store.d_model}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    manifest = read_json(folder / MANIFEST, corrupt_is_missing=True)
    if not manifest or manifest.get("key") != key:
        for p in folder.glob("*.safetensors"):
            p.unlink()
        manifest = {"key": key, "d_sae": sae.cfg.d_sae, "shards": []}
        write_json(folder / MANIFEST, manifest)
    names = store.shard_names(None)
    total = store.num_tokens(None)
    with progress() as bar:
        task = bar.add_task(encoding.label, total=total, rate="")
        start, done = time.perf_counter(), 0
        for name in names:
            shard = store.read(name)
            keep = token_filter.keep(shard.tokens)
            tokens = shard.tokens.filter(pa.array(keep))
            path = folder / f"{name}.safetensors"
            if name in manifest["shards"] and _intact(manifest, folder, path):
                codes, encoded = _load(path, tokens.num_rows), False
            else:
                acts = shard.acts[torch.from_numpy(keep)]
                codes = concat_codes(
                    [_cpu(sae.encode_sparse(x.to(device), dtype)) for x in acts.split(batch_tokens)]
                )
                _save(path, codes)
                manifest.setdefault(FILES, {})[path.name] = digest(path)
                manifest["shards"] = [*(s for s in manifest["shards"] if s != name), name]
                write_json(folder / MANIFEST, manifest)
                encoded = True
                done += tokens.num_rows
            rate = done / (time.perf_counter() - start) if done else 0
            bar.update(
                task, advance=shard.tokens.num_rows, rate=f"{rate:,.0f} tok/s" if rate else ""
            )
            yield CodedShard(name, shard.split, tokens, codes, shard.tokens, keep, encoded)


def read_codes(folder: Path, store: Store, token_filter: TokenFilter) -> Iterator[CodedShard]:
    """The codes written by stream_codes, shard by shard, with their kept token rows."""
    manifest = read_json(folder / MANIFEST, corrupt_is_missing=True)
    if not manifest:
        raise SamesheepError(f"no codes at {folder}: run `samesheep features`")
    for entry in store.manifest["shards"]:
        name = entry["name"]
        if name not in manifest["shards"]:
            raise SamesheepError(
                f"the codes at {folder} lack shard {name}: run `samesheep features`"
            )
        all_tokens = store.read_tokens(name)
        keep = token_filter.keep(all_tokens)
        tokens = all_tokens.filter(pa.array(keep))
        path = folder / f"{name}.safetensors"
        if not _intact(manifest, folder, path):
            raise SamesheepError(
                f"the codes {path} are damaged or gone: run `samesheep features` to encode again"
            )
        codes = _load(path, tokens.num_rows)
        yield CodedShard(name, entry["split"], tokens, codes, all_tokens, keep, False)


def _intact(manifest: dict[str, Any], folder: Path, path: Path) -> bool:
    """Whether a shard's codes are on disk and still what was written (where the manifest
    recorded their digest)."""
    recorded = manifest.get(FILES, {}).get(path.name)
    return path.is_file() and not (recorded and damaged(folder, {path.name: recorded}))


def _cpu(codes: SparseCodes) -> SparseCodes:
    return SparseCodes(*(t.cpu() for t in codes))
