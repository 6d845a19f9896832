"""Sparse autoencoders: TopK, BatchTopK, JumpReLU and ReLU + L1, with sparse paths.

Conventions (the same for every architecture):

    x' = x * input_scale                      raw activations scaled to mean squared norm d_in
    pre = (x' - b_dec) @ W_enc.T + b_enc      W_enc is stored [d_sae, d_in], like W_dec
    acts = activation(pre)                    [tokens, d_sae], non-negative
    x_hat = (acts @ W_dec + b_dec) / input_scale

Storing the encoder as [d_sae, d_in] keeps one latent's encoder and decoder vectors each in
one contiguous row, which is what the sparse paths gather. SAELens' layout (W_enc
[d_in, d_sae]) is written by sae_files.py, with input_scale folded into the weights.

Training: each architecture has its own small forward function (`FORWARDS`), all returning a
`ForwardOutput`; the trainer owns every piece of state (BatchTopK's inference threshold is
updated from `ForwardOutput.threshold` after the step, never inside a forward pass).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SamesheepError

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
AUXK_SHARE = 0.25
"""Share of each (shuffled) batch's tokens on which the AuxK loss is computed."""
AUXK_K = 128
"""Dead latents that reconstruct the residual per token; the AuxK loss is scaled by
min(dead / AUXK_K, 1), so a handful of dead latents gets a small weight (as sparsify)."""
ENCODE_CHUNK = 512
"""Tokens encoded at a time: a chunk's pre-activations stay in cache, and no dense
[tokens, d_sae] matrix of a whole batch is ever held."""


@dataclass
class SaeConfig:
    """What defines an SAE's function (saved with its weights)."""

    architecture: str
    d_in: int
    d_sae: int
    k: int = 32
    """Active latents per token (topk), or on average per token (batchtopk)."""
    input_scale: float = 1.0
    """Raw activations are multiplied by this before encoding (1.0 once folded)."""
    bandwidth: float = 0.05
    """Width of the straight-through estimator's rectangle kernel (jumprelu)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SamesheepError(
                f"unknown SAE architecture {self.architecture!r} (use {', '.join(ARCHITECTURES)})"
            )
        if self.d_in < 1 or self.d_sae < 1:
            raise SamesheepError(f"SAE sizes must be positive, got {self.d_in}x{self.d_sae}")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise SamesheepError(f"k = {self.k} must lie between 1 and the width {self.d_sae}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SparseCodes(NamedTuple):
    """The active latents of a batch of tokens, token by token (CSR layout)."""

    values: Tensor  # [nnz] float32, all > 0
    latents: Tensor  # [nnz] int64: the latent of each value
    offsets: Tensor  # [tokens + 1] int64: token i holds entries offsets[i]:offsets[i + 1]

    @property
    def tokens(self) -> int:
        return self.offsets.numel() - 1

    def rows(self) -> Tensor:
        """[nnz] int64: the token (row) of each entry."""
        counts = self.offsets.diff()
        return torch.repeat_interleave(torch.arange(self.tokens, device=counts.device), counts)

    def to_dense(self, d_sae: int) -> Tensor:
        """[tokens, d_sae] float32."""
        out = self.values.new_zeros(self.tokens, d_sae)
        out[self.rows(), self.latents] = self.values
        return out


def sparse_from_dense(acts: Tensor) -> SparseCodes:
    """The nonzero entries of dense activations [tokens, d_sae], token by token."""
    rows, latents = acts.nonzero(as_tuple=True)  # row-major order: sorted by token
    counts = torch.bincount(rows, minlength=acts.shape[0])
    offsets = torch.zeros(acts.shape[0] + 1, dtype=torch.long, device=acts.device)
    offsets[1:] = counts.cumsum(0)
    return SparseCodes(acts[rows, latents].float(), latents, offsets)


def sparse_from_topk(vals: Tensor, idx: Tensor) -> SparseCodes:
    """SparseCodes of [tokens, k] values and indices, zeros dropped."""
    keep = vals > 0
    counts = keep.sum(1)
    offsets = torch.zeros(vals.shape[0] + 1, dtype=torch.long, device=vals.device)
    offsets[1:] = counts.cumsum(0)
    return SparseCodes(vals[keep].float(), idx[keep], offsets)


def gather_decode(W_dec: Tensor, values: Tensor, latents: Tensor, offsets: Tensor | None = None):
    """sum_j values_j * W_dec[latents_j] per token, gathering only the active decoder rows:
    values and latents [tokens, k] (offsets None), or flat [nnz] with CSR offsets
    [tokens + 1]. Differentiable in W_dec and values. Returns [tokens, d_in] (scaled space,
    no bias)."""
    if offsets is None:
        return F.embedding_bag(latents, W_dec, per_sample_weights=values, mode="sum")
    return F.embedding_bag(
        latents, W_dec, offsets, per_sample_weights=values, mode="sum", include_last_offset=True
    )


class Sae(nn.Module):
    """One sparse autoencoder. `forward` maps raw activations to their reconstruction."""

    def __init__(self, cfg: SaeConfig, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        m, d = cfg.d_sae, cfg.d_in
        self.W_enc = nn.Parameter(torch.empty(m, d, device=device))
        self.b_enc = nn.Parameter(torch.zeros(m, device=device))
        self.W_dec = nn.Parameter(torch.empty(m, d, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))
        # jumprelu learns log thresholds; batchtopk keeps one running threshold for inference.
        self.log_threshold = nn.Parameter(
            torch.full((m,), math.log(0.1), device=device),
            requires_grad=cfg.architecture == "jumprelu",
        )
        self.register_buffer("batch_threshold", torch.zeros((), device=device))

    # ---- initialisation and constraints ----

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, data_mean: Tensor | None = None) -> None:
        """Decoder rows random unit vectors, encoder its transpose, b_dec the data mean."""
        w = torch.randn(self.W_dec.shape, generator=generator).to(self.W_dec.device)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        if self.cfg.architecture == "relu":
            self.W_dec.mul_(0.1)  # small decoder norms: the L1 term then starts gentle
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.copy_(data_mean if data_mean is not None else torch.zeros_like(self.b_dec))

    @property
    def unit_decoder(self) -> bool:
        """Whether decoder rows are kept at unit norm (all but ReLU + L1, whose penalty is
        weighted by the decoder norms instead)."""
        return self.cfg.architecture != "relu"

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of W_dec's gradient that would only change the row norms."""
        if self.W_dec.grad is not None:
            # row dot products without a [d_sae, d_in] temporary, then one fused update
            dot = torch.linalg.vecdot(self.W_dec.grad, self.W_dec).unsqueeze(1)
            self.W_dec.grad.addcmul_(dot, self.W_dec, value=-1.0)

    @torch.no_grad()
    def update_batch_threshold(self, smallest_kept: float) -> None:
        """BatchTopK's inference threshold: a running mean (over about the last ten steps)
        of the smallest activation each training batch kept."""
        t = self.batch_threshold
        t.copy_(smallest_kept if float(t) == 0 else 0.9 * float(t) + 0.1 * smallest_kept)

    @property
    def threshold(self) -> Tensor:
        """Per-latent inference threshold (jumprelu; batchtopk's global one repeated)."""
        if self.cfg.architecture == "batchtopk":
            return self.batch_threshold.expand(self.cfg.d_sae)
        return self.log_threshold.exp()

    # ---- inference ----

    def pre_acts(
        self, x_scaled: Tensor, dtype: torch.dtype | None = None, w_enc: Tensor | None = None
    ) -> Tensor:
        """Encoder pre-activations of already scaled inputs, the product run in `dtype`
        (`w_enc`: the encoder already cast to it, where a caller encodes many chunks)."""
        xc = x_scaled - self.b_dec
        if dtype is None or dtype == self.W_enc.dtype:
            return F.linear(xc, self.W_enc, self.b_enc)
        w = self.W_enc.to(dtype) if w_enc is None else w_enc
        return F.linear(xc.to(dtype), w).float().add_(self.b_enc)

    def activate(self, pre: Tensor) -> Tensor:
        """Dense activations [tokens, d_sae] of pre-activations, by the inference rule."""
        arch = self.cfg.architecture
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        if arch == "relu":
            return pre.relu()
        return pre.relu() * (pre > self.threshold)  # jumprelu, and batchtopk at inference

    def scale(self, x: Tensor) -> Tensor:
        """Raw activations as the encoder sees them (float32, times input_scale)."""
        return x.float() * self.cfg.input_scale

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [tokens, d_sae] of raw activations."""
        return self.activate(self.pre_acts(self.scale(x)))

    def encode_sparse(self, x: Tensor, dtype: torch.dtype | None = None) -> SparseCodes:
        """The active latents of raw activations [tokens, d_in], any architecture, a chunk of
        tokens at a time (the encoder product in `dtype`, float32 by default)."""
        parts = []
        cast = dtype is not None and dtype != self.W_enc.dtype
        w_enc = self.W_enc.to(dtype) if cast else None  # cast once, not once per chunk
        for chunk in self.scale(x).split(ENCODE_CHUNK):
            pre = self.pre_acts(chunk, dtype, w_enc)
            if self.cfg.architecture == "topk":
                vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
                parts.append(sparse_from_topk(vals.relu(), idx))
            else:
                parts.append(sparse_from_dense(self.activate(pre)))
        return concat_codes(parts, x.device)

    def decode(self, acts: Tensor) -> Tensor:
        """Raw-space reconstruction of dense latent activations."""
        return (acts @ self.W_dec + self.b_dec) / self.cfg.input_scale

    def decode_sparse(self, codes: SparseCodes) -> Tensor:
        """Raw-space reconstruction [tokens, d_in] from sparse codes: gathers the active
        decoder rows instead of a dense product over all latents."""
        out = gather_decode(self.W_dec, codes.values, codes.latents, codes.offsets)
        return (out + self.b_dec) / self.cfg.input_scale

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of raw activations [tokens, d_in] (float32)."""
        if self.cfg.architecture == "topk":
            return self.decode_sparse(self.encode_sparse(x))
        return self.decode(self.encode(x))


def concat_codes(parts: list[SparseCodes], device: torch.device | str = "cpu") -> SparseCodes:
    """One SparseCodes of consecutive batches of tokens."""
    if not parts:
        empty = torch.zeros(0, device=device)
        return SparseCodes(empty, empty.long(), torch.zeros(1, dtype=torch.long, device=device))
    shifts = torch.tensor([0] + [int(p.offsets[-1]) for p in parts]).cumsum(0).tolist()
    offsets = [parts[0].offsets[:1]] + [
        p.offsets[1:] + s for p, s in zip(parts, shifts, strict=False)
    ]
    return SparseCodes(
        torch.cat([p.values for p in parts]),
        torch.cat([p.latents for p in parts]),
        torch.cat(offsets),
    )


# ---- training ----


class ForwardOutput(NamedTuple):
    """One training forward pass over a batch of scaled inputs, as the trainer needs it."""

    loss: Tensor
    """What is minimised: fvu + auxk_alpha * auxk (topk, batchtopk), or fvu +
    coefficient * sparsity (jumprelu, relu)."""
    fvu: Tensor
    """The batch's fraction of variance unexplained (scaled space), detached."""
    fired: Tensor
    """[d_sae] bool: latents active on some token of the batch."""
    l0: float
    """Mean active latents per token."""
    auxk: float
    """AuxK loss (topk, batchtopk; 0 where no latent is dead, or for the others)."""
    sparsity: float
    """Sparsity penalty before its coefficient: expected L0 (jumprelu), decoder-norm-weighted
    L1 (relu); 0 for topk and batchtopk."""
    threshold: float | None
    """BatchTopK: the smallest activation the batch kept (for the inference threshold)."""


def fvu_of(err: Tensor, x: Tensor) -> Tensor:
    """Squared error over the batch's total variance."""
    return err.pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


class TopKEncode(torch.autograd.Function):
    """TopK selection whose backward pass touches only the k selected latents per token:
    the encoder's weight gradient is a sparse [d_sae, tokens] x dense [tokens, d_in] product
    instead of a dense one over all latents, and b_dec's gradient a product with the bias
    gradient. The forward pass runs in chunks of tokens, so each chunk's pre-activations are
    still in cache when top-k reads them, and the dense [tokens, d_sae] matrix never exists."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k: int, dtype: torch.dtype, chunk=ENCODE_CHUNK):
        xc = x - b_dec
        w, b = W_enc.to(dtype), b_enc.to(dtype)
        parts = [F.linear(c.to(dtype), w, b).topk(k, dim=-1, sorted=False) for c in xc.split(chunk)]
        vals = torch.cat([p.values for p in parts]).float().relu()
        idx = torch.cat([p.indices for p in parts])
        ctx.save_for_backward(xc, W_enc, idx, vals)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals: Tensor, _grad_idx: Tensor):
        xc, W_enc, idx, vals = ctx.saved_tensors
        g = torch.where(vals > 0, grad_vals, 0.0).contiguous()  # the ReLU after selection
        n, k = idx.shape
        m = W_enc.shape[0]
        # g as a [d_sae, tokens] CSR matrix (rows sorted by latent): its product with xc is
        # the weight gradient, on the CPU (MKL) and on CUDA (cuSPARSE) alike.
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        crow = torch.zeros(m + 1, dtype=torch.long, device=idx.device)
        crow[1:] = torch.bincount(flat, minlength=m).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it is tested here
            warnings.simplefilter("ignore", UserWarning)
            sparse = torch.sparse_csr_tensor(crow, order // k, g.reshape(-1)[order], (m, n))
        grad_w = sparse @ xc
        grad_b = torch.zeros_like(W_enc[:, 0]).index_add_(0, idx.reshape(-1), g.reshape(-1))
        grad_b_dec = -(grad_b @ W_enc)  # every pre-activation holds -b_dec . W_enc[j]
        return None, grad_b_dec, grad_w, grad_b, None, None, None


@dataclass
class StepSettings:
    """What a training forward pass needs besides the SAE and the batch."""

    dtype: torch.dtype = torch.float32
    """Dtype of the encoder's matrix products."""
    dead: Tensor | None = None
    """[d_sae] bool: latents counted as dead (for AuxK); None turns AuxK off."""
    auxk_alpha: float = 0.0
    sparsity_coefficient: float = 0.0


def _fired(d_sae: int, latents: Tensor, device: torch.device) -> Tensor:
    fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
    fired[latents] = True
    return fired


def topk_forward(sae: Sae, x: Tensor, s: StepSettings) -> ForwardOutput:
    """TopK: k latents per token, encoder and decoder both sparse in the backward pass."""
    vals, idx = TopKEncode.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.cfg.k, s.dtype)
    err = gather_decode(sae.W_dec, vals, idx) + sae.b_dec - x
    fvu = fvu_of(err, x)
    aux = auxk_loss(sae, x, err, s.dead, s.dtype)
    active = vals > 0
    return ForwardOutput(
        fvu + s.auxk_alpha * aux,
        fvu.detach(),
        _fired(sae.cfg.d_sae, idx[active], x.device),
        float(active.sum()) / x.shape[0],
        float(aux.detach()),
        0.0,
        None,
    )


def batchtopk_forward(sae: Sae, x: Tensor, s: StepSettings) -> ForwardOutput:
    """BatchTopK: the k * tokens largest activations of the whole batch, decoded sparsely."""
    pre = sae.pre_acts(x, s.dtype)  # [tokens, d_sae]
    top = pre.relu().flatten().topk(sae.cfg.k * x.shape[0], sorted=False)
    keep = top.values > 0
    flat_idx, values = top.indices[keep], top.values[keep]
    order = flat_idx.argsort()  # by token, so the entries form CSR rows
    flat_idx, values = flat_idx[order], values[order]
    rows, latents = flat_idx // sae.cfg.d_sae, flat_idx % sae.cfg.d_sae
    offsets = torch.zeros(x.shape[0] + 1, dtype=torch.long, device=x.device)
    offsets[1:] = torch.bincount(rows, minlength=x.shape[0]).cumsum(0)
    err = gather_decode(sae.W_dec, values, latents, offsets) + sae.b_dec - x
    fvu = fvu_of(err, x)
    aux = auxk_loss(sae, x, err, s.dead, s.dtype)
    return ForwardOutput(
        fvu + s.auxk_alpha * aux,
        fvu.detach(),
        _fired(sae.cfg.d_sae, latents, x.device),
        values.numel() / x.shape[0],
        float(aux.detach()),
        0.0,
        float(values.detach().min()) if values.numel() else None,
    )


def _dense_output(
    sae: Sae, x: Tensor, acts: Tensor, penalty: Tensor, s: StepSettings
) -> ForwardOutput:
    fvu = fvu_of(acts @ sae.W_dec + sae.b_dec - x, x)
    active = acts > 0
    return ForwardOutput(
        fvu + s.sparsity_coefficient * penalty,
        fvu.detach(),
        active.any(0),
        float(active.sum()) / x.shape[0],
        0.0,
        float(penalty.detach()),
        None,
    )


def jumprelu_forward(sae: Sae, x: Tensor, s: StepSettings) -> ForwardOutput:
    """JumpReLU: learned per-latent thresholds, an L0 penalty through a straight-through
    estimator (Rajamanoharan et al. 2024)."""
    pre = sae.pre_acts(x, s.dtype)
    theta = sae.log_threshold.exp()
    acts = JumpReLU.apply(pre, theta, sae.cfg.bandwidth)
    penalty = Step.apply(pre, theta, sae.cfg.bandwidth).sum(-1).mean()
    return _dense_output(sae, x, acts, penalty, s)


def relu_forward(sae: Sae, x: Tensor, s: StepSettings) -> ForwardOutput:
    """ReLU with an L1 penalty weighted by the decoder row norms."""
    acts = sae.pre_acts(x, s.dtype).relu()
    penalty = (acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
    return _dense_output(sae, x, acts, penalty, s)


FORWARDS: dict[str, Callable[[Sae, Tensor, StepSettings], ForwardOutput]] = {
    "topk": topk_forward,
    "batchtopk": batchtopk_forward,
    "jumprelu": jumprelu_forward,
    "relu": relu_forward,
}


def train_forward(sae: Sae, x: Tensor, s: StepSettings) -> ForwardOutput:
    """The training forward pass of the SAE's architecture on scaled inputs [tokens, d_in]."""
    return FORWARDS[sae.cfg.architecture](sae, x, s)


def auxk_scale(n_dead: int) -> float:
    """Weight of the AuxK loss for n_dead dead latents: their share of AUXK_K, at most 1."""
    return min(n_dead / AUXK_K, 1.0)


def auxk_loss(sae: Sae, x: Tensor, err: Tensor, dead: Tensor | None, dtype: torch.dtype):
    """AuxK (Gao et al. 2024): the top k_aux dead latents reconstruct the main
    reconstruction's error, the loss scaled by auxk_scale. Only the dead latents'
    pre-activations are computed (and differentiated), on a share of the batch, so it costs
    little while few are dead."""
    n_dead = int(dead.sum()) if dead is not None else 0
    if n_dead == 0:
        return err.new_zeros(())
    rows = max(1, math.ceil(x.shape[0] * AUXK_SHARE))
    err, x = err[:rows], x[:rows]
    dead_idx = dead.nonzero().squeeze(1)
    w, b = sae.W_enc[dead_idx], sae.b_enc[dead_idx]
    pre_dead = F.linear((x - sae.b_dec).to(dtype), w.to(dtype), b.to(dtype)).float()
    vals, pos = pre_dead.topk(min(AUXK_K, n_dead), dim=-1, sorted=False)
    e_hat = gather_decode(sae.W_dec, vals.relu(), dead_idx[pos])
    return auxk_scale(n_dead) * fvu_of(e_hat + err.detach(), x)


class JumpReLU(torch.autograd.Function):
    """z * H(z - theta); the threshold's gradient by a rectangle-kernel straight-through
    estimator (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = (-(theta / eps) * near * grad).sum(0)
        return grad * (pre > theta), grad_theta, None


class Step(torch.autograd.Function):
    """H(z - theta), with the same estimator for the threshold's gradient (for the L0
    penalty); no gradient to z."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        return None, (-(1.0 / eps) * near * grad).sum(0), None
