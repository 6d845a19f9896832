"""A crosscoder: one sparse dictionary for two or more models, read on aligned units.

One encoder reads every model's activations at once; each model has its own decoder, and
the loss is the sum of the models' normalised reconstruction errors (FVU). It is built on
the BatchTopK SAE of sae/model.py, over the concatenation of the models' activations:

    x = [x_1 * s_1, ..., x_M * s_M]       each block scaled to the same total variance V
    pre = (x - b_dec) @ W_enc.T + b_enc   the one encoder, over every model
    x_hat_i = (codes @ W_dec[:, block_i] + b_dec[block_i]) / s_i

so its sparse encoding, the sparse backward pass, AuxK, the optimizer, the checkpoints and
the resume are the SAE's own. The decoder rows are kept at unit norm over the whole
concatenation (as the SAE's are), which leaves each model's part of a row free: a latent's
relative decoder norm ||d_i|| / sum_j ||d_j|| (Lindsey et al. 2024) says which models it
writes to. Scaling every block to the same variance makes those norms comparable between
models of different widths and activation scales.

Dedicated latents (arXiv 2602.11729): a share of the latents is reserved to each model, its
decoder held at zero for every other model (the gradient is masked, so Adam never moves it).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..core.config import TrainConfig, settings_hash
from ..core.device import choose_device, choose_dtype, dtype_name
from ..core.errors import SamesheepError
from ..core.files import atomic_path, remove_stale_temporaries
from ..core.progress import progress
from .model import (
    ForwardOutput,
    Sae,
    SaeConfig,
    SparseCodes,
    StepSettings,
    batchtopk_forward,
    gather_decode,
)
from .training import (
    CHECKPOINT,
    TrainState,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train_step,
)

WEIGHTS = "crosscoder.safetensors"
"""A crosscoder's file: the joint SAE's tensors and the block scales, with its shape in the
metadata (the decoder mask follows from the shape)."""


@dataclass(frozen=True)
class CrosscoderShape:
    """What defines a crosscoder besides its weights."""

    widths: tuple[int, ...]
    """Each model's hidden width, in order (the blocks of the concatenation)."""
    d_sae: int
    k: int
    """Active latents per unit, on average over a batch (BatchTopK)."""
    dedicated: float = 0.0
    """Share of the latents reserved to each model (0: every latent may write to every
    model)."""

    def __post_init__(self) -> None:
        if len(self.widths) < 2 or min(self.widths) < 1:
            raise SamesheepError(f"a crosscoder reads two or more models, got {self.widths}")
        if not 1 <= self.k <= self.d_sae:
            raise SamesheepError(f"crosscoder k = {self.k} must lie between 1 and {self.d_sae}")
        if not 0 <= self.dedicated * len(self.widths) < 1:
            raise SamesheepError(
                f"crosscode.dedicated = {self.dedicated}: the shares reserved to the "
                f"{len(self.widths)} models must leave some latents shared"
            )

    @property
    def models(self) -> int:
        return len(self.widths)

    @property
    def d_in(self) -> int:
        return sum(self.widths)

    def blocks(self) -> list[slice]:
        """Each model's columns of the concatenation."""
        edges = np.concatenate([[0], np.cumsum(self.widths)]).tolist()
        return [slice(a, b) for a, b in itertools.pairwise(edges)]

    def owners(self) -> Tensor:
        """[d_sae] int64: the model each dedicated latent is reserved to, -1 for the free
        ones (the first round(dedicated * d_sae) latents go to model 0, the next to model
        1, ...)."""
        per = round(self.dedicated * self.d_sae)
        owner = torch.full((self.d_sae,), -1, dtype=torch.long)
        for i in range(self.models):
            owner[i * per : (i + 1) * per] = i
        return owner

    def decoder_mask(self) -> Tensor:
        """[d_sae, d_in] float: 1 where a latent may write, 0 in the other models' blocks
        of a dedicated latent."""
        owner = self.owners()
        mask = torch.ones(self.d_sae, self.d_in)
        for i, block in enumerate(self.blocks()):
            mask[(owner >= 0) & (owner != i), block] = 0.0
        return mask


class Crosscoder:
    """A trained (or training) crosscoder: the joint BatchTopK SAE, the block scales and the
    decoder mask."""

    def __init__(self, shape: CrosscoderShape, scales: Tensor, device: torch.device | str = "cpu"):
        self.shape = shape
        self.scales = scales.float().to(device)  # [models] raw -> scaled, per block
        cfg = SaeConfig("batchtopk", shape.d_in, shape.d_sae, k=shape.k)
        self.sae = Sae(cfg, device)
        self.mask = shape.decoder_mask().to(device)

    @property
    def device(self) -> torch.device:
        return self.sae.W_dec.device

    def scaled(self, blocks: list[Tensor]) -> Tensor:
        """[units, d_in]: every model's raw activations, scaled and concatenated."""
        if len(blocks) != self.shape.models:
            raise SamesheepError(f"a crosscoder of {self.shape.models} models got {len(blocks)}")
        return torch.cat(
            [b.to(self.device).float() * s for b, s in zip(blocks, self.scales, strict=True)], 1
        )

    @torch.no_grad()
    def encode(self, blocks: list[Tensor], dtype: torch.dtype | None = None) -> SparseCodes:
        """The active latents of units, given every model's raw activations [units, d_i]."""
        return self.sae.encode_sparse(self.scaled(blocks), dtype)

    @torch.no_grad()
    def reconstruct(self, codes: SparseCodes) -> list[Tensor]:
        """Each model's raw-space reconstruction [units, d_i] of sparse codes."""
        sae = self.sae
        out = gather_decode(sae.W_dec, codes.values, codes.latents, codes.offsets) + sae.b_dec
        return [out[:, b] / s for b, s in zip(self.shape.blocks(), self.scales, strict=True)]

    def decoder_norms(self) -> Tensor:
        """[d_sae, models]: the norm of each latent's decoder in each model's block (scaled
        space, where the blocks have the same variance)."""
        w = self.sae.W_dec.detach()
        return torch.stack([w[:, b].norm(dim=1) for b in self.shape.blocks()], 1)

    def relative_norms(self) -> Tensor:
        """[d_sae, models]: ||d_i|| / sum_j ||d_j|| of each latent."""
        n = self.decoder_norms()
        return n / n.sum(1, keepdim=True).clamp_min(1e-12)

    def mask_gradient(self) -> None:
        """Hold the masked decoder entries (dedicated latents' other blocks) at zero."""
        if self.shape.dedicated > 0:
            self.sae.W_dec.register_hook(lambda g: g * self.mask)

    def save(self, path: Path) -> None:
        sae = self.sae
        tensors = {
            "W_enc": sae.W_enc,
            "b_enc": sae.b_enc,
            "W_dec": sae.W_dec,
            "b_dec": sae.b_dec,
            "threshold": sae.batch_threshold.reshape(1),
            "scales": self.scales,
        }
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"shape": json.dumps(asdict(self.shape))})


def load_crosscoder(path: Path, device: torch.device | str = "cpu") -> Crosscoder:
    """A crosscoder saved by Crosscoder.save, or a one-line error."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        raw = json.loads(meta["shape"])
        shape = CrosscoderShape(tuple(raw.pop("widths")), **raw)
        cc = Crosscoder(shape, tensors["scales"], device)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(cc.sae, name).copy_(tensors[name])
            cc.sae.batch_threshold.copy_(tensors["threshold"][0])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise SamesheepError(f"crosscoder {path} is unreadable ({e}): train it again") from None
    return cc


# ---- training ----


@dataclass(frozen=True)
class Workplace:
    """Where a crosscoder trains: its folder (checkpoint), the key of its settings and data,
    and the progress bar's label."""

    folder: Path
    key: str
    label: str = "crosscoder"


@dataclass(frozen=True)
class CrosscodeSettings:
    """How one crosscoder is trained, besides the SAE training settings it shares."""

    shape: CrosscoderShape
    train_units: int
    """Units to train on in total (the training units are passed over several times)."""
    seed: int = 0


def block_statistics(blocks: list[Tensor], rows: np.ndarray) -> tuple[Tensor, Tensor]:
    """([models] scales, [d_in] mean of the scaled inputs) on the training units `rows`: the
    scales bring each block's total variance per unit (the sum of its columns' variances) to
    the mean width of the blocks, so every model weighs the same in the encoder and decoder
    norms compare across models."""
    target = float(np.mean([b.shape[1] for b in blocks]))
    scales, means = [], []
    for b in blocks:
        x = b[torch.from_numpy(rows)].double()
        variance = float(x.var(0, correction=0).sum())
        if not math.isfinite(variance) or variance <= 0:
            raise SamesheepError("a model's activations do not vary on the training units")
        scales.append(math.sqrt(target / variance))
        means.append(x.mean(0) * scales[-1])
    return torch.tensor(scales, dtype=torch.float32), torch.cat(means).float()


def unit_batches(rows: np.ndarray, batch: int, seed: int) -> Iterator[np.ndarray]:
    """Batches of training units, forever: each pass a new seeded order, the remainder of
    less than a batch dropped, so no batch holds a unit twice and every run with the same
    seed draws the same batches (a resumed run replays them by counting)."""
    for epoch in range(10**9):
        order = rows[np.random.default_rng([seed, epoch]).permutation(len(rows))]
        for i in range(0, len(order) - batch + 1, batch):
            yield order[i : i + batch]


def blocks_forward(shape: CrosscoderShape) -> Callable[[Sae, Tensor, StepSettings], ForwardOutput]:
    """The training pass on scaled, concatenated units [units, d_in]: the SAE's BatchTopK
    pass, its loss the sum of every model's FVU (plus AuxK over the concatenation)."""
    blocks = tuple(shape.blocks())
    return lambda sae, x, s: batchtopk_forward(sae, x, replace(s, blocks=blocks))


def train_crosscoder(
    blocks: list[Tensor],
    rows: np.ndarray,
    tc: TrainConfig,
    xs: CrosscodeSettings,
    place: Workplace,
) -> tuple[Crosscoder, dict[str, Any]]:
    """Train a crosscoder on the units `rows` of every model's activations `blocks` [units,
    d_i] (float, in memory), with the SAE's optimizer, schedule, AuxK and checkpoints (a
    killed run resumes from the checkpoint in place.folder, written under place.key, to the
    same result). Returns the crosscoder and a training summary."""
    device = choose_device(tc.device)
    dtype = choose_dtype(tc.dtype, device)
    if len(rows) < tc.batch_tokens:
        raise SamesheepError(
            f"{len(rows):,} training units, fewer than one batch ({tc.batch_tokens:,}): use a "
            "larger corpus or lower train.batch_tokens"
        )
    tc = _as_batchtopk(tc, xs)
    total = max(xs.train_units, tc.batch_tokens) // tc.batch_tokens
    scales, mean = block_statistics(blocks, rows)
    cc = Crosscoder(xs.shape, scales, device)
    columns = torch.repeat_interleave(scales, torch.tensor(xs.shape.widths)).to(device)
    cc.sae.initialize(torch.Generator().manual_seed(xs.seed), mean.to(device))
    with torch.no_grad():
        cc.sae.W_dec.mul_(cc.mask)
        cc.sae.normalize_decoder()
        cc.sae.W_enc.copy_(cc.sae.W_dec)
    cc.mask_gradient()
    state = TrainState(
        cc.sae,
        make_optimizer(cc.sae, 0.0, device),
        torch.zeros(xs.shape.d_sae, dtype=torch.long, device=device),
    )
    work = place.folder
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(work)
    made_on = {"dtype": dtype_name(dtype), "device": device.type}
    # keyed on what it computes in, as the SAE's: another dtype or device cannot continue it
    key = settings_hash(place.key, made_on["dtype"], made_on["device"])
    path = work / CHECKPOINT
    resumed = load_checkpoint(path, state, key, made_on)
    batches = unit_batches(rows, tc.batch_tokens, xs.seed)
    for _ in range(state.step):
        next(batches)
    forward = blocks_forward(xs.shape)
    last_save, start, done = time.monotonic(), time.perf_counter(), 0
    with progress() as bar:
        task = bar.add_task(place.label, total=total, completed=state.step, rate="")
        while state.step < total:
            idx = torch.from_numpy(next(batches))
            x = torch.cat([b[idx] for b in blocks], 1).to(device).float() * columns
            out = train_step(state, x, tc, dtype, total, forward)
            done += len(idx)
            if state.step < total and time.monotonic() - last_save > tc.checkpoint_seconds:
                save_checkpoint(path, state, key, made_on)
                last_save = time.monotonic()
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=state.step, rate=f"{rate:,.0f} units/s  fvu {out.fvu:.3f}")
    seconds = time.perf_counter() - start
    save_checkpoint(path, state, key, made_on)
    summary = {
        "steps": total,
        "units": total * tc.batch_tokens,
        "training_units": len(rows),
        "epochs": round(total * tc.batch_tokens / len(rows), 3),
        "scales": scales.tolist(),
        "dtype": dtype_name(dtype),
        "device": device.type,
        "resumed": resumed,
        "dead_at_end": int((state.since_fired >= tc.dead_tokens).sum()),
        "units_per_second": done / seconds if done and seconds > 0 else None,
    }
    return cc, summary


def _as_batchtopk(tc: TrainConfig, xs: CrosscodeSettings) -> TrainConfig:
    """The SAE training settings as the crosscoder uses them: BatchTopK at its k and width."""
    return replace(tc, architecture="batchtopk", k=xs.shape.k, width=xs.shape.d_sae, seed=xs.seed)
