"""SAE evaluation: reconstruction metrics on held-out activations, and language-model metrics
with the SAE's reconstruction spliced into the residual stream.

Positions: the SAE replaces exactly the rows it was trained on, by the same TokenFilter (by
default real tokens that are neither special, nor at position 0, the attention sink, nor
outliers by norm). A next-token prediction from position p is
scored where its target p + 1 is a real token of the same window and some position at or
before p is spliced: predictions no intervention can reach (from the sink, from a BOS-only
prefix) would add the same loss to every run and dilute the KL means.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.errors import SamesheepError
from ..data.corpus import Document
from ..data.store import Store, TokenFilter
from ..lm.extraction import Window, length_batches, pad_id, windows_of
from ..lm.models import LoadedModel, decoder_blocks, hidden_state
from .model import Sae, SparseCodes

DENSE_FRACTION = 0.1
"""A latent active on more than this fraction of tokens counts as dense."""
LOGIT_CHUNK = 1 << 19
"""Logit elements (rows x vocabulary) turned into log-probabilities at once: 2 MiB of
float32, so each pass over them stays in cache (much faster than larger chunks)."""
DOC_CHUNK = 64
"""Documents tokenized at a time."""


class ReconstructionStats:
    """Reconstruction metrics streamed over batches: memory is O(d_in + d_sae), whatever the
    number of tokens. Sums are kept in float64 (Python floats, CPU tensors); the per-dimension
    variance is merged batch by batch (Chan et al.), so large means do not cancel."""

    def __init__(self, d_in: int, d_sae: int):
        self.d_in, self.d_sae = d_in, d_sae
        self.tokens = 0
        self.mean = torch.zeros(d_in, dtype=torch.float64)  # per-dimension mean of x
        self.m2 = torch.zeros(d_in, dtype=torch.float64)  # squared deviations from it
        self.fires = torch.zeros(d_sae, dtype=torch.int64)  # tokens each latent is active on
        self.sse = self.cosine = self.ratio = self.hat_sq = self.dot = self.active = 0.0
        self.relative_errors: list[Tensor] = []  # [tokens] ||x_hat - x|| / ||x||, float32
        self.outliers = 0  # tokens left out for their norm (counted by the caller)

    def update(self, x: Tensor, x_hat: Tensor, acts: Tensor | SparseCodes) -> None:
        """Add a batch: inputs and reconstructions [tokens, d_in], latents [tokens, d_sae]
        (dense, or the SparseCodes of the same tokens)."""
        n = x.shape[0]
        if n == 0:
            return
        where = "cpu" if x.device.type == "mps" else x.device  # MPS has no float64
        x = x.to(where, torch.float64)
        x_hat = x_hat.to(where, torch.float64)
        tiny = torch.finfo(torch.float64).tiny
        norm_x, norm_hat = x.norm(dim=1), x_hat.norm(dim=1)
        dot = (x * x_hat).sum(1)
        rel = (x_hat - x).norm(dim=1) / norm_x.clamp_min(tiny)
        self.relative_errors.append(rel.float().cpu())
        if isinstance(acts, SparseCodes):
            on = acts.latents[acts.values > 0]
            n_active = torch.tensor(float(on.numel()), dtype=torch.float64, device=x.device)
            fires = torch.bincount(on, minlength=self.d_sae)
        else:
            active = acts > 0
            n_active = active.sum().to(torch.float64)
            fires = active.sum(0)
        sums = torch.stack(
            [
                (x_hat - x).square().sum(),
                (dot / (norm_x * norm_hat).clamp_min(tiny)).sum(),  # 0 where x_hat = 0
                (norm_hat / norm_x.clamp_min(tiny)).sum(),
                norm_hat.square().sum(),
                dot.sum(),
                n_active.to(x.device),
            ]
        ).tolist()
        for name, value in zip(
            ("sse", "cosine", "ratio", "hat_sq", "dot", "active"), sums, strict=True
        ):
            setattr(self, name, getattr(self, name) + value)
        self.fires += fires.cpu()
        mean = x.mean(0)
        m2 = (x - mean).square().sum(0).cpu()
        delta = mean.cpu() - self.mean
        total = self.tokens + n
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.square() * (self.tokens * n / total)
        self.tokens = total

    def result(self) -> dict[str, Any]:
        """The metrics (plain floats and ints).

        fvu: squared error over squared deviations from the evaluation set's per-dimension
        mean. cosine, shrinkage: per-token means of cos(x, x_hat) and ||x_hat|| / ||x||
        (SAELens' l2_ratio). relative_reconstruction_bias: E[||x_hat||^2] / E[<x_hat, x>]
        over all tokens (Gated SAE paper, eq. 10): 1 / the gain g minimising
        E||g x_hat - x||^2, so below 1 means shrinkage. median_relative_error: the median
        over tokens of ||x_hat - x|| / ||x||, which a few huge tokens cannot move. Dead: never
        active; dense: active on more than 10% of tokens. outlier_tokens: tokens left out
        for their norm."""
        n = self.tokens
        if n == 0:
            raise SamesheepError("no tokens to evaluate the SAE on")
        variance = float(self.m2.sum())
        fvu = self.sse / variance if variance > 0 else math.nan
        dead = int((self.fires == 0).sum())
        dense = int((self.fires > DENSE_FRACTION * n).sum())
        return {
            "tokens": n,
            "mse": self.sse / (n * self.d_in),
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "l0": self.active / n,
            "dead_latents": dead,
            "dead_fraction": dead / self.d_sae,
            "dense_latents": dense,
            "dense_fraction": dense / self.d_sae,
            "cosine": self.cosine / n,
            "shrinkage": self.ratio / n,
            "relative_reconstruction_bias": self.hat_sq / self.dot if self.dot else math.nan,
            "median_relative_error": float(np.median(torch.cat(self.relative_errors).numpy())),
            "outlier_tokens": self.outliers,
        }


def reconstruction_metrics(
    sae: Sae,
    store: Store,
    batch_tokens: int = 4096,
    device: torch.device | str = "cpu",
    token_filter: TokenFilter | None = None,
) -> dict[str, Any]:
    """Reconstruction metrics of `sae` (already on `device`) over the store's held-out shards,
    on the tokens `token_filter` keeps (by default neither special tokens nor position 0);
    float32 batches."""
    return reconstruction_stats(sae, store, batch_tokens, device, token_filter).result()


@torch.inference_mode()
def reconstruction_stats(
    sae: Sae,
    store: Store,
    batch_tokens: int = 4096,
    device: torch.device | str = "cpu",
    token_filter: TokenFilter | None = None,
) -> ReconstructionStats:
    """The accumulated ReconstructionStats behind reconstruction_metrics (which also hold
    each latent's firing count, `fires`)."""
    if store.d_model != sae.cfg.d_in:
        raise SamesheepError(f"the SAE reads {sae.cfg.d_in} dims, the store holds {store.d_model}")
    token_filter = token_filter or TokenFilter()
    ordinary = TokenFilter(token_filter.skip_special, token_filter.skip_first)
    stats = ReconstructionStats(sae.cfg.d_in, sae.cfg.d_sae)
    for shard in store.shards("heldout"):
        stats.outliers += int(
            (ordinary.keep(shard.tokens) & token_filter.outliers(shard.tokens)).sum()
        )
        for x in shard.acts[shard.mask(token_filter)].split(batch_tokens):
            x = x.to(device, torch.float32)
            codes = sae.encode_sparse(x)
            stats.update(x, sae.decode_sparse(codes), codes)
    return stats


# ---- spliced language-model metrics ----


def batch_tensors(
    windows: list[Window], batch: list[int], pad: int, token_filter: TokenFilter | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, real, splice) [rows, longest] of a batch of windows, right-padded.

    real: not padding. splice: the positions the SAE may replace by token_filter's special
    and position rules (its norm rule needs the hidden states: see spliced_metrics)."""
    token_filter = token_filter or TokenFilter()
    longest = max(len(windows[i].ids) for i in batch)
    ids = torch.full((len(batch), longest), pad, dtype=torch.long)
    real = torch.zeros((len(batch), longest), dtype=torch.bool)
    splice = torch.zeros_like(real)
    for row, i in enumerate(batch):
        w = windows[i]
        n = len(w.ids)
        ids[row, :n] = torch.from_numpy(w.ids)
        real[row, :n] = True
        keep = np.ones(n, dtype=bool)
        if token_filter.skip_special:
            keep &= ~w.special
        if token_filter.skip_first:
            keep[0] = False
        splice[row, :n] = torch.from_numpy(keep)
    return ids, real, splice


def scored_positions(real: Tensor, splice: Tensor) -> Tensor:
    """[rows, longest] bool: positions whose next-token prediction counts: the target is a
    real token and some position at or before this one is spliced (see the module doc)."""
    score = splice.to(torch.int8).cummax(dim=1).values.bool()
    score[:, :-1] &= real[:, 1:]
    score[:, -1] = False
    return score


def with_hidden(output: Any, h: Tensor) -> Any:
    """A block's output with its hidden state replaced, keeping a tuple a tuple."""
    if isinstance(output, tuple):
        return (h, *output[1:])
    if isinstance(output, list):
        return [h, *output[1:]]
    return h


@contextlib.contextmanager
def splice_block(block: nn.Module, where: Tensor, replace: Callable[[Tensor], Tensor]) -> Iterator:
    """Within the block, the block's output at `where` [batch, seq] is replace(rows)."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        h = hidden_state(output)
        new = h.clone()
        new[where] = replace(h[where])
        return with_hidden(output, new)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def keep_output(block: nn.Module, out: list[Any]) -> Any:
    """A hook on `block` that appends its output (as the block returned it) to `out`."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        out.append(output)

    return block.register_forward_hook(hook)


@contextlib.contextmanager
def replay(blocks: list[nn.Module], outputs: list[Any]) -> Iterator:
    """Within the block, `blocks` skip their computation and return the outputs they gave in
    the clean run (their inputs are the same in every run up to the spliced layer), so the
    interventions compute only the layers after it. Forward hooks still run on them."""

    def returning(output: Any) -> Callable[..., Any]:
        return lambda *_args, **_kwargs: output

    for b, output in zip(blocks, outputs, strict=True):
        b.forward = returning(output)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward  # back to the class's own forward


HEAD_ONLY_TYPES = {
    *("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
    *("gpt2", "opt", "gpt_neox", "phi3"),
}
"""Model types whose causal-LM logits are the output embedding of the base model's last
hidden state (then soft-capped where the config says so): for them the head is applied at
the scored positions only. Others run their whole forward."""


def scored_logits(model: nn.Module, ids: Tensor, mask: Tensor | None, score: Tensor) -> Tensor:
    """Logits [scored positions, vocab] of one forward pass: the LM head at the scored
    positions only, where the model type allows (HEAD_ONLY_TYPES), else the full logits
    indexed (and freed)."""
    if model.config.model_type not in HEAD_ONLY_TYPES:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[score]
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    return head_logits(model, hidden.last_hidden_state[score])


def head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """The LM head's logits [rows, vocab] of final hidden states [rows, d] (the base model's
    output, final norm applied), soft-capped where the config says so; for the model types
    of HEAD_ONLY_TYPES."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _sums(clean: Tensor, others: list[Tensor], targets: Tensor) -> list[float]:
    """[CE(clean), CE(other), KL(clean || other) for each other] summed over the rows, in
    float32 on a chunk of rows at a time. With lse the log-sum-exp of a row's logits and p
    the clean probabilities, CE = lse - logit[target] and
    KL = sum p (clean - other) - lse(clean) + lse(other): one exponential per row and logit
    for the clean run and one per intervention, the clean one computed once for both."""
    rows = max(1, LOGIT_CHUNK // clean.shape[1])
    total = torch.zeros(1 + 2 * len(others), device=clean.device)  # float32 (MPS: no float64)
    for lo in range(0, clean.shape[0], rows):
        t = targets[lo : lo + rows, None]
        c = clean[lo : lo + rows].float()
        lse_c = c.logsumexp(-1)
        p = (c - lse_c[:, None]).exp_()
        pc = (p * c).sum(-1)
        sums = [(lse_c - c.gather(1, t)[:, 0]).sum()]
        for other in others:
            o = other[lo : lo + rows].float()
            lse_o = o.logsumexp(-1)
            sums.append((lse_o - o.gather(1, t)[:, 0]).sum())
            sums.append((pc - (p * o).sum(-1) - lse_c + lse_o).sum())
        total += torch.stack(sums)
    return total.tolist()


def _given(values: Tensor, where: Tensor) -> Callable[[Tensor], Tensor]:
    """A replacement that puts the given vectors [rows, longest, d] at `where`."""
    return lambda h: values.to(h.device)[where].to(h.dtype)


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _norms_at(block: nn.Module, out: list[Tensor], dtype: torch.dtype | None) -> Any:
    """A hook on `block` that appends its output's per-position norms [batch, seq] to `out`,
    computed from the hidden states rounded to `dtype` (the store's), as the store has them."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        h = hidden_state(output)
        out.append((h.to(dtype) if dtype is not None else h).float().norm(dim=-1))

    return block.register_forward_hook(hook)


@dataclass(frozen=True)
class SpliceSettings:
    """Where the spliced metrics read and splice: documents cut into windows as extraction
    cut them (`prefix` from bos_prefix, then up to `context_length` tokens), run
    `batch_tokens` padded tokens at a time, with the SAE spliced in at the positions
    `token_filter` keeps (None: the default filter), norms compared after rounding to
    `norm_dtype` (the store's dtype; None: as the model computes them); `at` restricts the
    splice to chosen positions (and may give the vectors put there)."""

    prefix: list[int]
    context_length: int
    batch_tokens: int = 1024
    token_filter: TokenFilter | None = None
    norm_dtype: torch.dtype | None = None
    at: SpliceAt | None = None


@dataclass(frozen=True)
class SpliceAt:
    """Splicing at chosen positions only: (document index, window, position) -> a row of
    `values` [rows, d], the vector put there (None: the SAE's reconstruction of the hidden
    state there). A crosscoder's reconstruction of one model needs the other model's
    activations at the same text, so it is computed beforehand, per aligned unit."""

    rows: dict[tuple[int, int, int], int]
    values: Tensor | None = None

    def batch(self, windows: list[Window], batch: list[int], longest: int) -> tuple:
        """([rows, longest] bool: the chosen positions of a batch of windows, [rows, longest,
        d] their vectors or None)."""
        mask = torch.zeros(len(batch), longest, dtype=torch.bool)
        index = torch.zeros(len(batch), longest, dtype=torch.long)
        for r, i in enumerate(batch):
            w = windows[i]
            for p in range(len(w.ids)):
                j = self.rows.get((w.doc_index, w.window, p))
                if j is not None:
                    mask[r, p] = True
                    index[r, p] = j
        return mask, None if self.values is None else self.values[index]


SUM_NAMES = ("ce_clean", "ce_spliced", "kl_spliced", "ce_zero", "kl_zero")
"""The sums _sums returns for the spliced and zero-ablated runs, in its order."""


@torch.inference_mode()
def spliced_metrics(
    lm: LoadedModel,
    layer: int,
    sae: Sae | Callable[[Tensor], Tensor],
    documents: Iterable[Document],
    settings: SpliceSettings,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Next-token cross-entropy and KL(clean || intervened) with block `layer`'s output
    replaced by sae(h) (float32, cast back) or by zeros at the positions the token filter
    keeps, the same rule that chose the SAE's training and evaluation tokens.

    Windows as in extraction. Each batch runs the model three times (clean, spliced,
    zero-ablated); only the scored logits are kept, and only until the batch is done, so
    memory grows with batch_tokens x vocabulary: with a 262k vocabulary, batch_tokens = 1024
    holds about 1 GiB of logits per copy in float32. `sae` must live on the model's device.
    Scores are NaN where their denominator is 0."""
    device = torch.device(device) if device is not None else next(lm.model.parameters()).device
    token_filter = settings.token_filter or TokenFilter()
    blocks = decoder_blocks(lm.model)
    block = blocks[layer]
    prefix_blocks = list(blocks[: layer + 1])  # the same in every run: computed once
    pad = pad_id(lm.tokenizer)

    def reconstruct(h: Tensor) -> Tensor:
        return sae(h.float()).to(h.dtype)

    sums = dict.fromkeys(("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero"), 0.0)
    tokens = 0
    numbered = enumerate(documents)
    while chunk := list(itertools.islice(numbered, DOC_CHUNK)):
        windows = windows_of(chunk, lm.tokenizer, settings.prefix, settings.context_length)
        for batch in length_batches(windows, settings.batch_tokens):
            ids, real, splice = (
                t.to(device) for t in batch_tensors(windows, batch, pad, token_filter)
            )
            chosen = None
            if settings.at is not None:
                only, chosen = settings.at.batch(windows, batch, ids.shape[1])
                splice &= only.to(device)
            maybe = scored_positions(real, splice)  # before the norm rule: a superset
            if not bool(maybe.any()):
                continue
            mask = None if bool(real.all()) else real.long()
            norms: list[Tensor] = []
            replayed: list[Any] = []  # the clean outputs of blocks 0..layer, replayed after
            handles = [_norms_at(block, norms, settings.norm_dtype)]
            handles += [keep_output(b, replayed) for b in prefix_blocks]
            try:
                clean = scored_logits(lm.model, ids, mask, maybe)
            finally:
                for h in handles:
                    h.remove()
            splice &= norms[0] <= token_filter.max_norm
            score = scored_positions(real, splice)
            clean = clean[score[maybe]]
            if not bool(score.any()):
                continue
            targets = ids[:, 1:][score[:, :-1]]  # the last column is never scored
            others = []
            spliced = reconstruct if chosen is None else _given(chosen, splice)
            for replace in (spliced, torch.zeros_like):
                with replay(prefix_blocks, replayed), splice_block(block, splice, replace):
                    others.append(scored_logits(lm.model, ids, mask, score))
            for name, value in zip(SUM_NAMES, _sums(clean, others, targets), strict=True):
                sums[name] += value
            tokens += len(targets)
            del clean, others
    if tokens == 0:
        raise SamesheepError("no positions to score: the documents are too short")
    m = {key: value / tokens for key, value in sums.items()}
    return {
        **m,
        "ce_loss_score": _ratio(m["ce_zero"] - m["ce_spliced"], m["ce_zero"] - m["ce_clean"]),
        "kl_div_score": _ratio(m["kl_zero"] - m["kl_spliced"], m["kl_zero"]),
        "tokens": tokens,
    }
