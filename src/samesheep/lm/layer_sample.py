"""The layer sample: every layer's hidden states on the first few held-out documents, from
one forward pass per model. Small (a few thousand tokens), and kept apart from the per-layer
stores the SAEs train on:

    <model>/layer_sample/states.safetensors   layer_<L>: [tokens, d] for every block L,
                                              norms: [layers, tokens] float32
    <model>/layer_sample/tokens.parquet       the store's token table (doc_index: held-out line)
    <model>/layer_sample/manifest.json        written last: the sample is complete
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.cache import load_done, mark_done, unmark
from ..core.config import ExtractConfig, settings_hash
from ..core.device import choose_device, choose_dtype, dtype_name, set_threads
from ..core.errors import SamesheepError
from ..core.files import atomic_path, read_json
from ..data.corpus import Document, read_documents
from ..data.store import TokenFilter, to_store_dtype
from .extraction import ModelJob, bos_prefix, forward_windows, token_table, windows_of
from .models import LoadedModel, fingerprint, load_model

SAMPLE_VERSION = 1
"""Bump when what a layer sample holds changes for the same settings."""
CHARS_PER_UNIT = 8
"""Characters of held-out text read per aligned unit asked for: the shipped corpus has about
4.8 characters per unit, and some units are left out (special tokens, sinks, massive norms)."""
FOLDER = "layer_sample"
MANIFEST = "manifest.json"


def sample_documents(corpus_dir: Path, units: int) -> list[tuple[int, Document]]:
    """(held-out line, document) of the first held-out documents holding at least
    units * CHARS_PER_UNIT characters between them (all of them where there are fewer): by
    characters, so every model of a run reads the same documents."""
    chosen, chars = [], 0
    path = Path(corpus_dir) / "heldout.jsonl"
    docs = read_documents(path) if path.is_file() else iter(())
    for index, doc in enumerate(docs):
        if chars >= units * CHARS_PER_UNIT:
            break
        chosen.append((index, doc))
        chars += len(doc.text)
    return chosen


def sample_key(source: str, cfg: ExtractConfig, units: int, corpus_hash: str, seed: int = 0) -> str:
    """What the sample of one model depends on: its weights, the corpus, how it is cut into
    windows and computed, and how many units are asked for."""
    device = choose_device(cfg.device)
    where = (dtype_name(choose_dtype(cfg.dtype, device)), device.type)
    settings = [cfg.context_length, cfg.add_bos, cfg.store_dtype, cfg.batch_tokens]
    return settings_hash(
        SAMPLE_VERSION, corpus_hash, fingerprint(source, seed), settings, where, units
    )


def sample_current(model_dir: Path, key: str) -> bool:
    """Whether the model's layer sample is complete and was made with this key."""
    return load_done(Path(model_dir) / FOLDER / MANIFEST, key) is not None


def extract_layer_sample(
    job: ModelJob, cfg: ExtractConfig, units: int
) -> tuple[dict[str, Any], LoadedModel | None]:
    """Write the model's layer sample (every block's output on the sample documents), unless
    it is already complete with these settings. Returns (its manifest, with "skipped"; the
    model it loaded, for the caller to reuse, or None where it loaded none)."""
    source, corpus_hash = job.source, job.corpus_hash
    key = sample_key(source, cfg, units, corpus_hash, job.seed)
    folder = Path(job.model_dir) / FOLDER
    if sample_current(job.model_dir, key):
        return {**read_json(folder / MANIFEST), "skipped": True}, None
    docs = sample_documents(job.corpus_dir, units)
    if not docs:
        raise SamesheepError(
            f"the corpus in {job.corpus_dir} has no held-out documents for the layer sample: "
            "set corpus.heldout_tokens above 0 (or representations.enabled = false)"
        )
    device = choose_device(cfg.device)
    set_threads(cfg.threads)
    dtype = choose_dtype(cfg.dtype, device)
    lm = load_model(source, dtype, device, job.trust_remote_code, job.seed)
    windows = windows_of(
        docs, lm.tokenizer, bos_prefix(lm.tokenizer, cfg.add_bos), cfg.context_length
    )
    layers = list(range(lm.n_layers))
    with torch.inference_mode():
        states = forward_windows(lm, layers, windows, cfg.batch_tokens, device)
    tensors = {
        f"layer_{L}": to_store_dtype(states[L], cfg.store_dtype, f"{folder} layer {L}")
        for L in layers
    }
    norms = torch.stack([tensors[f"layer_{L}"].float().norm(dim=1) for L in layers])
    folder.mkdir(parents=True, exist_ok=True)
    unmark(folder / MANIFEST)  # incomplete until written again
    with atomic_path(folder / "states.safetensors") as tmp:
        save_file({**tensors, "norms": norms.contiguous()}, str(tmp))
    with atomic_path(folder / "tokens.parquet") as tmp:
        pq.write_table(token_table(windows, norms[-1].numpy()), tmp)
    manifest = {
        "key": key,
        "model": source,
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "documents": len(docs),
        "tokens": int(norms.shape[1]),
        "corpus": corpus_hash,
    }
    files = [folder / "states.safetensors", folder / "tokens.parquet"]
    manifest = mark_done(folder / MANIFEST, manifest, files)
    return {**manifest, "skipped": False}, lm


@dataclass
class LayerSample:
    """A model's complete layer sample, read back."""

    folder: Path
    manifest: dict[str, Any]
    tokens: pa.Table
    norms: np.ndarray  # [layers, tokens]

    @classmethod
    def open(cls, model_dir: Path, source: str) -> LayerSample:
        folder = Path(model_dir) / FOLDER
        manifest = read_json(folder / MANIFEST, corrupt_is_missing=True)
        if not manifest:
            raise SamesheepError(
                f"no layer sample for {source}: run `samesheep extract` (or `samesheep run`)"
            )
        try:
            tokens = pq.read_table(folder / "tokens.parquet")
            with safe_open(str(folder / "states.safetensors"), framework="pt") as f:
                norms = f.get_tensor("norms").numpy()
        except Exception as e:  # a damaged file surfaces as many exception types
            raise SamesheepError(
                f"cannot read the layer sample in {folder} ({e}): delete it and run "
                "`samesheep extract` again"
            ) from None
        if norms.shape != (manifest["n_layers"], tokens.num_rows):
            raise SamesheepError(
                f"the layer sample in {folder} is damaged: delete it and extract again"
            )
        return cls(folder, manifest, tokens, norms)

    @property
    def n_layers(self) -> int:
        return int(self.manifest["n_layers"])

    def states(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """[len(rows), d] float32 hidden states after block `layer` at the given token rows."""
        with safe_open(str(self.folder / "states.safetensors"), framework="pt") as f:
            x = f.get_tensor(f"layer_{layer}")[torch.from_numpy(np.asarray(rows))]
        x = x.float().numpy()
        if not np.isfinite(x).all():
            raise SamesheepError(f"non-finite states in {self.folder} layer {layer}: extract again")
        return x

    def keep(self, skip_special: bool, skip_first: bool, max_norm_ratio: float) -> np.ndarray:
        """[tokens] bool: the tokens every layer comparison uses: by the SAE stages' rule,
        with massive norms judged at every layer (a token past max_norm_ratio times that
        layer's median at any layer is left out of all, so every layer pair sees the same
        units)."""
        keep = TokenFilter(skip_special, skip_first).keep(self.tokens)
        if max_norm_ratio > 0 and keep.any():
            median = np.median(self.norms[:, keep], axis=1, keepdims=True)
            keep &= ~(self.norms > max_norm_ratio * median).any(0)
        return keep
