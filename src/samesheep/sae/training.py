"""Training one SAE on an activation store: a seeded shuffled stream of batches, Adam with
warm-up and decay, dead-latent bookkeeping for AuxK, and checkpoints a killed run resumes
from with the same result as an uninterrupted run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.config import TrainConfig, settings_hash
from ..core.device import choose_device, choose_dtype, dtype_name
from ..core.errors import SamesheepError
from ..core.files import atomic_path, remove_stale_temporaries
from ..core.progress import progress, say
from ..data.store import Store, TokenFilter
from .model import ForwardOutput, Sae, SaeConfig, StepSettings, train_forward

CHECKPOINT = "checkpoint.safetensors"
SCALE_SAMPLE_TOKENS = 65_536
DEFAULT_SPARSITY = {"jumprelu": 1.0, "relu": 0.02}
"""Sparsity coefficients: jumprelu's weighs its (L0 / target - 1)^2 penalty, fixed; relu's
L1 coefficient is where steering starts (unless train.sparsity_coefficient fixes it)."""
STEERED = ("relu",)
LR_FACTOR = {"relu": 2.0}
"""ReLU + L1 learns slower: on Gemma layer 12 its held-out FVU fell as the rate rose from half
the default to twice it, while at four times most of its latents died (measured: see
benchmarks/RESULTS.md, 'Four SAE architectures')."""
STEER_GAIN = 0.1
STEER_LIMIT = 0.1
CALIBRATION_TOKENS = 8192
"""Training tokens on which a jumprelu or relu SAE's thresholds or biases are calibrated."""


def sae_config(cfg: TrainConfig, d_in: int) -> SaeConfig:
    """The SAE's shape and architecture from the training settings."""
    width = cfg.width if cfg.width > 0 else cfg.expansion_factor * d_in
    return SaeConfig(cfg.architecture, d_in, width, k=cfg.k)


def learning_rate(cfg: TrainConfig, d_sae: int, steps: int) -> float:
    """The configured rate, or the default: 4e-3 scaled like sparsify's by 1/sqrt(width), and
    by sqrt(100 / steps) for runs longer than 100 steps, times LR_FACTOR for the
    architecture. Measured on Gemma layer 12 and SmolLM2 layer 20 (244 steps): 5e-3 leaves 7%
    and 39% of the latents dead, 3.2e-3 under 5% at the same or lower held-out FVU; at 73
    steps 5e-3 gives the lower FVU."""
    if cfg.lr > 0:
        return cfg.lr
    base = 4e-3 / math.sqrt(d_sae / 16384) * min(1.0, math.sqrt(100 / max(steps, 1)))
    return base * LR_FACTOR.get(cfg.architecture, 1.0)


def lr_factor(step: int, total: int, warmup: float, decay: float) -> float:
    """Linear warm-up from 0, constant, then linear decay to 0 over the last steps."""
    warm = max(1, round(warmup * total))
    fall = round(decay * total)
    if step < warm:
        return (step + 1) / warm
    if fall and step >= total - fall:
        return max(0.0, (total - step) / fall)
    return 1.0


# ---- data ----


def token_filter(store: Store, cfg: TrainConfig) -> TokenFilter:
    """The tokens the SAE stages use on this store, by the training settings."""
    return store.token_filter(cfg.skip_special, cfg.skip_first, cfg.max_norm_ratio)


def filter_counts(store: Store, token_filter: TokenFilter, split: str = "train") -> tuple[int, int]:
    """(kept tokens, tokens left out for their norm alone) of a split, from the token tables."""
    kept = outliers = 0
    for name in store.shard_names(split):
        table = pq.read_table(
            store.folder / f"{name}.tokens.parquet", columns=["special", "position", "norm"]
        )
        kept += int(token_filter.keep(table).sum())
        ordinary = TokenFilter(token_filter.skip_special, token_filter.skip_first).keep(table)
        outliers += int((ordinary & token_filter.outliers(table)).sum())
    return kept, outliers


def shard_rows(store: Store, name: str, token_filter: TokenFilter) -> torch.Tensor:
    """The kept activations of one shard, checked to be finite (the shard named if not)."""
    shard = store.read(name)
    acts = shard.acts[shard.mask(token_filter)]
    if not all_finite(acts):
        raise SamesheepError(
            f"NaN or infinite activations in {store.folder / name}.safetensors: "
            "delete the store and extract again"
        )
    return acts


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value is finite. For 16-bit floats by their exponent bits (all ones
    means inf or NaN), much faster than torch.isfinite on bfloat16."""
    if x.dtype == torch.bfloat16:
        return not bool(((x.view(torch.int16) & 0x7F80) == 0x7F80).any())
    if x.dtype == torch.float16:
        return not bool(((x.view(torch.int16) & 0x7C00) == 0x7C00).any())
    return bool(torch.isfinite(x).all())


def batch_stream(
    store: Store, cfg: TrainConfig, token_filter: TokenFilter
) -> Iterator[torch.Tensor]:
    """Batches [batch_tokens, d] in the store dtype, forever. Each pass visits the shards in
    a new seeded order and mixes rows through a shuffle buffer; at the end of a pass the
    buffer is emitted whole and what is left (less than a batch) is dropped, so no batch
    holds a token twice and no pass repeats a token. Memory is bounded by the buffer, and the
    stream is the same on every run with the same seed."""
    names = store.shard_names("train")
    if not names:
        return
    # Where the whole split fits in the shuffle buffer, its kept rows are read (and checked)
    # once and reused by every pass: the same rows in the same order, without the reading.
    stored = sum(s["tokens"] for s in store.manifest["shards"] if s["split"] == "train")
    kept: dict[str, torch.Tensor] | None = {} if stored <= cfg.buffer_tokens else None
    buffer: list[torch.Tensor] = []
    held = 0
    for epoch in range(10**9):
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(len(names))
        for n_read, i in enumerate(order, start=1):
            if kept is None:
                rows = shard_rows(store, names[i], token_filter)
            elif names[i] not in kept:
                rows = kept[names[i]] = shard_rows(store, names[i], token_filter)
            else:
                rows = kept[names[i]]
            buffer.append(rows)
            held += rows.shape[0]
            last = n_read == len(order)
            if held < max(cfg.buffer_tokens, 2 * cfg.batch_tokens) and not last:
                continue
            mixed = torch.cat(buffer)[torch.from_numpy(rng.permutation(held))]
            # Emit half the buffer (the rest mixes with the next shards), or all of it at the
            # end of the pass.
            n_out = (held if last else held // 2) // cfg.batch_tokens * cfg.batch_tokens
            yield from mixed[:n_out].split(cfg.batch_tokens)
            buffer, held = ([], 0) if last else ([mixed[n_out:]], held - n_out)


def input_sample(store: Store, token_filter: TokenFilter) -> torch.Tensor:
    """The first SCALE_SAMPLE_TOKENS kept training tokens, float32."""
    sample, n = [], 0
    for name in store.shard_names("train"):
        rows = shard_rows(store, name, token_filter).float()
        sample.append(rows)
        n += rows.shape[0]
        if n >= SCALE_SAMPLE_TOKENS:
            break
    return torch.cat(sample)[:SCALE_SAMPLE_TOKENS]


def input_statistics(
    store: Store, token_filter: TokenFilter, x: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """(scale, mean of scaled inputs): the scale brings the mean squared norm of the first
    training tokens (`x`, the input_sample, read here if not given) to d_in."""
    x = input_sample(store, token_filter) if x is None else x
    # Row sums of squares in float32 (d terms each), their mean in float64; torch's float32
    # column means sum in cascades (within about 1e-6 of float64, and no float64 copy).
    squares = x.pow(2).sum(1).double()
    scale = math.sqrt(x.shape[1] / squares.mean().item())
    return scale, x.mean(0) * scale


# ---- checkpoints ----


@dataclass
class TrainState:
    """Everything that changes during training, apart from the data stream's position,
    which is replayed from the step count."""

    sae: Sae
    opt: torch.optim.Optimizer
    since_fired: torch.Tensor  # [d_sae] training tokens since each latent last fired
    step: int = 0
    coefficient: float = 0.0
    """Weight of the sparsity penalty now (jumprelu, relu): steered towards the target L0
    step by step unless train.sparsity_coefficient fixes it."""


def save_checkpoint(
    path: Path, state: TrainState, key: str, made_on: dict[str, str] | None = None
) -> None:
    """Weights, Adam's moments and the dead-latent counters in one safetensors file;
    `made_on` ({"dtype": ..., "device": ...}) records what it was computed with."""
    tensors = {f"sae.{n}": t.detach() for n, t in state.sae.state_dict().items()}
    names = {id(p): n for n, p in state.sae.named_parameters()}
    for p, s in state.opt.state.items():
        for field, value in s.items():
            # safetensors keeps no 0-d tensors: Adam's step count goes as shape [1]
            tensors[f"adam.{names[id(p)]}.{field}"] = value.reshape(1) if value.ndim == 0 else value
    tensors["since_fired"] = state.since_fired
    tensors["coefficient"] = torch.tensor([state.coefficient], dtype=torch.float64)
    meta = {"key": key, "step": str(state.step), **(made_on or {})}
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_checkpoint(
    path: Path, state: TrainState, key: str, made_on: dict[str, str] | None = None
) -> bool:
    """Restore a checkpoint written with the same key; False where there is none to use
    (saying so in a line where one exists that was computed with another dtype or on another
    kind of device, which cannot continue exactly). A damaged or mismatched checkpoint is an
    error: it is never silently trained over."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                _say_why_not_resumed(path, meta, made_on or {})
                return False
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise SamesheepError(
            f"checkpoint {path} is corrupt ({e}); delete it to train from the start"
        ) from None
    device = state.since_fired.device
    try:
        state.sae.load_state_dict(
            {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("sae.")}
        )
        names = {id(p): n for n, p in state.sae.named_parameters()}
        for p in state.opt.param_groups[0]["params"]:
            name = names[id(p)]
            s = state.opt.state[p]
            for field in ("step", "exp_avg", "exp_avg_sq"):
                value = tensors[f"adam.{name}.{field}"].to(device)
                s[field] = value.reshape(()) if field == "step" else value
        state.since_fired.copy_(tensors["since_fired"])
        state.coefficient = float(tensors["coefficient"][0])
        state.step = int(meta["step"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise SamesheepError(
            f"checkpoint {path} does not match this SAE ({str(e).splitlines()[0]}); "
            "delete it to train from the start"
        ) from None
    return True


def _say_why_not_resumed(path: Path, meta: dict[str, str], made_on: dict[str, str]) -> None:
    """One line where a checkpoint differs from this run only in what it was computed with."""
    differ = [k for k, v in made_on.items() if meta.get(k) not in (None, v)]
    if not differ:
        return  # other settings: an unrelated checkpoint, replaced without a word
    was = " on ".join(meta[k] for k in differ)
    now = " on ".join(made_on[k] for k in differ)
    hint = " or ".join(f'train.{k} = "{meta[k]}"' for k in differ)
    say(
        f"{path} was written computing in {was}; this run computes in {now}, which cannot "
        f"continue it exactly, so training starts over (set {hint} to continue it instead, "
        "where that is possible)"
    )


# ---- the loop ----


def make_optimizer(sae: Sae, lr: float, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in sae.parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=fused)


def target_l0(cfg: TrainConfig) -> float:
    """The L0 a jumprelu or relu SAE is steered to (train.target_l0, or k)."""
    return cfg.target_l0 if cfg.target_l0 > 0 else float(cfg.k)


def new_state(
    cfg: TrainConfig,
    d_in: int,
    scale: float,
    mean: torch.Tensor,
    device: torch.device,
    sample: torch.Tensor | None = None,
) -> TrainState:
    """A freshly initialised SAE (seeded), its optimizer and dead-latent counters; a jumprelu
    or relu SAE's thresholds or biases calibrated on `sample` (raw training inputs) so that
    it starts at the target L0."""
    scfg = sae_config(cfg, d_in)
    scfg.input_scale = scale
    sae = Sae(scfg, device)
    sae.initialize(torch.Generator().manual_seed(cfg.seed), mean.to(device))
    if sample is not None:
        sae.calibrate(sample[:CALIBRATION_TOKENS].to(device) * scale, target_l0(cfg))
    opt = make_optimizer(sae, 0.0, device)  # train_step sets the rate of every step
    coefficient = cfg.sparsity_coefficient or DEFAULT_SPARSITY.get(cfg.architecture, 0.0)
    since = torch.zeros(scfg.d_sae, dtype=torch.long, device=device)
    return TrainState(sae, opt, since, coefficient=coefficient)


def steer(coefficient: float, l0: float, target: float) -> float:
    """The sparsity coefficient for the next step: raised where the batch's L0 lay above the
    target, lowered where below, by at most STEER_LIMIT in log space per step."""
    change = STEER_GAIN * math.log(max(l0, 0.1) / target)
    return coefficient * math.exp(min(max(change, -STEER_LIMIT), STEER_LIMIT))


def train_step(
    state: TrainState,
    x: torch.Tensor,
    cfg: TrainConfig,
    dtype: torch.dtype,
    total: int,
    forward: Callable[[Sae, torch.Tensor, StepSettings], ForwardOutput] = train_forward,
) -> ForwardOutput:
    """One optimizer step on a batch of raw activations [tokens, d_in] (`forward`: the
    training pass, the SAE's architecture's unless another is given, as the crosscoder's)."""
    sae = state.sae
    x = x.to(state.since_fired.device, non_blocking=True).float() * sae.cfg.input_scale
    settings = StepSettings(
        dtype=dtype,
        dead=state.since_fired >= cfg.dead_tokens if cfg.auxk_alpha > 0 else None,
        auxk_alpha=cfg.auxk_alpha,
        sparsity_coefficient=state.coefficient,
        target_l0=target_l0(cfg),
    )
    out = forward(sae, x, settings)
    if not torch.isfinite(out.loss):
        raise SamesheepError(
            f"training diverged at step {state.step} (loss {out.loss.item()}): lower train.lr"
        )
    state.opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if sae.unit_decoder:
        sae.remove_parallel_gradient()
    lr = learning_rate(cfg, sae.cfg.d_sae, total)
    for group in state.opt.param_groups:
        group["lr"] = lr * lr_factor(state.step, total, cfg.warmup_fraction, cfg.decay_fraction)
    state.opt.step()
    if sae.unit_decoder:
        sae.normalize_decoder()
    if out.threshold is not None:
        sae.update_batch_threshold(out.threshold)
    if cfg.sparsity_coefficient == 0 and cfg.architecture in STEERED:
        state.coefficient = steer(state.coefficient, out.l0, target_l0(cfg))
    state.since_fired += x.shape[0]
    state.since_fired[out.fired] = 0
    state.step += 1
    return out


def train_sae(
    store: Store,
    cfg: TrainConfig,
    work_dir: Path,
    key: str,
    label: str = "",
) -> tuple[Sae, dict[str, Any]]:
    """Train an SAE on a store's training split, resuming from work_dir's checkpoint when
    it was written with the same key and compute dtype. Returns the SAE and a summary."""
    device = choose_device(cfg.device)
    dtype = choose_dtype(cfg.dtype, device)
    if dtype == torch.float16:
        raise SamesheepError('train.dtype must be "auto", "bfloat16" or "float32"')
    sae_config(cfg, store.d_model)  # a bad architecture, or k past the width, fails here
    tokens = token_filter(store, cfg)
    n_kept, n_outliers = filter_counts(store, tokens)
    if n_kept < cfg.batch_tokens:
        raise SamesheepError(
            f"{store.folder} holds {n_kept:,} training tokens, fewer than one batch "
            f"({cfg.batch_tokens:,}): extract a larger corpus or lower train.batch_tokens"
        )
    total = max(cfg.train_tokens or n_kept, cfg.batch_tokens) // cfg.batch_tokens

    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(work_dir)
    path = work_dir / CHECKPOINT
    # The checkpoint is keyed on the resolved compute dtype and the kind of device too: one
    # made in bfloat16 (or on a GPU) never continues in float32 (or on the CPU), where
    # "auto" resolves otherwise, since it could not continue exactly.
    made_on = {"dtype": dtype_name(dtype), "device": device.type}
    ckpt_key = settings_hash(key, made_on["dtype"], made_on["device"])
    sample = input_sample(store, tokens)
    scale, mean = input_statistics(store, tokens, sample)
    state = new_state(cfg, store.d_model, scale, mean, device, sample)
    del sample
    resumed = load_checkpoint(path, state, ckpt_key, made_on)

    stream = batch_stream(store, cfg, tokens)
    for _ in range(state.step):  # replay the stream up to where the checkpoint left it
        next(stream)
    last_save = time.monotonic()
    fvu_avg = l0_avg = 0.0
    start, done = time.perf_counter(), 0
    with progress() as bar:
        task = bar.add_task(label or "train", total=total, completed=state.step, rate="")
        while state.step < total:
            out = train_step(state, next(stream), cfg, dtype, total)
            done += cfg.batch_tokens
            w = 0.1 if done > cfg.batch_tokens else 1.0
            fvu_avg += w * (out.fvu.item() - fvu_avg)
            l0_avg += w * (out.l0 - l0_avg)
            if state.step < total and time.monotonic() - last_save > cfg.checkpoint_seconds:
                save_checkpoint(path, state, ckpt_key, made_on)
                last_save = time.monotonic()
            rate = done / (time.perf_counter() - start)
            bar.update(
                task,
                completed=state.step,
                rate=f"{rate:,.0f} tok/s  fvu {fvu_avg:.3f}  L0 {l0_avg:.1f}",
            )
    seconds = time.perf_counter() - start
    save_checkpoint(path, state, ckpt_key, made_on)
    summary = {
        "steps": total,
        "tokens": total * cfg.batch_tokens,
        "stored_tokens": n_kept,
        "outlier_tokens": n_outliers,
        "max_norm": tokens.to_dict()["max_norm"],
        "epochs": round(total * cfg.batch_tokens / n_kept, 3),
        "lr": learning_rate(cfg, state.sae.cfg.d_sae, total),
        "input_scale": scale,
        "dtype": dtype_name(dtype),
        "device": device.type,
        "resumed": resumed,
        "dead_at_end": int((state.since_fired >= cfg.dead_tokens).sum()),
        "tokens_per_second": done / seconds if done and seconds > 0 else None,
    }
    return state.sae, summary
