"""Sparse autoencoders: TopK, BatchTopK, JumpReLU and ReLU + L1, with a sparse TopK path.

Conventions (the same for every architecture):

    x' = x * input_scale                      raw activations scaled to mean squared norm d_in
    pre = (x' - b_dec) @ W_enc.T + b_enc      W_enc is stored [d_sae, d_in], like W_dec
    acts = activation(pre)                    [tokens, d_sae], non-negative
    x_hat = (acts @ W_dec + b_dec) / input_scale

Storing the encoder as [d_sae, d_in] keeps one latent's encoder and decoder vectors each in
one contiguous row, which is what the sparse paths gather. SAELens' layout (W_enc
[d_in, d_sae]) is written by sae_files.py, with input_scale folded into the weights.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SamesheepError

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
AUXK_SHARE = 0.25
AUXK_K = 128
"""Share of each batch's tokens on which the AuxK loss is computed."""


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
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of W_dec's gradient that would only change the row norms."""
        if self.W_dec.grad is not None:
            dot = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad.sub_(dot * self.W_dec)

    @property
    def threshold(self) -> Tensor:
        """Per-latent inference threshold (jumprelu; batchtopk's global one repeated)."""
        if self.cfg.architecture == "batchtopk":
            return self.batch_threshold.expand(self.cfg.d_sae)
        return self.log_threshold.exp()

    # ---- inference ----

    def pre_acts(self, x_scaled: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Encoder pre-activations of already scaled inputs, the product run in `dtype`."""
        xc = x_scaled - self.b_dec
        if dtype is None or dtype == self.W_enc.dtype:
            return F.linear(xc, self.W_enc, self.b_enc)
        return F.linear(xc.to(dtype), self.W_enc.to(dtype)).float() + self.b_enc

    def encode_scaled(self, x_scaled: Tensor) -> Tensor:
        """Dense latent activations [tokens, d_sae] of scaled inputs (inference rules)."""
        pre = self.pre_acts(x_scaled)
        arch = self.cfg.architecture
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        if arch == "relu":
            return pre.relu()
        return pre.relu() * (pre > self.threshold)  # jumprelu, and batchtopk at inference

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [tokens, d_sae] of raw activations."""
        return self.encode_scaled(x.float() * self.cfg.input_scale)

    def decode_scaled(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def decode(self, acts: Tensor) -> Tensor:
        """Raw-space reconstruction of dense latent activations."""
        return self.decode_scaled(acts) / self.cfg.input_scale

    def topk_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) [tokens, k] of a TopK SAE's active latents for raw inputs."""
        pre = self.pre_acts(x.float() * self.cfg.input_scale)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return vals.relu(), idx

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        """Raw-space reconstruction from k active latents per token: gathers k decoder rows
        per token instead of a dense product over all latents."""
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
        return (out + self.b_dec) / self.cfg.input_scale

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of raw activations [tokens, d_in] (float32)."""
        if self.cfg.architecture == "topk":
            return self.decode_sparse(*self.topk_sparse(x))
        return self.decode(self.encode(x))


# ---- training forward passes ----


class TopKEncode(torch.autograd.Function):
    """TopK selection whose backward pass touches only the k selected latents per token:
    the encoder's weight gradient is a sparse [d_sae, tokens] x dense [tokens, d_in] product
    instead of a dense one over all latents, and b_dec's gradient a product with the bias
    gradient. The forward pass runs in chunks of tokens, so each chunk's pre-activations are
    still in cache when top-k reads them, and the dense [tokens, d_sae] matrix never exists."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k: int, dtype: torch.dtype, chunk: int = 512):
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
class StepOutput:
    """What one training forward pass gives the trainer."""

    loss: Tensor
    fvu: Tensor  # of this batch, in scaled space
    fired: Tensor  # [d_sae] bool: latents active on some token of the batch
    l0: float
    aux: float  # AuxK loss (topk), sparsity penalty (others)


def fvu_of(err: Tensor, x: Tensor) -> Tensor:
    """Squared error over the batch's total variance."""
    return err.pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def train_step_forward(
    sae: Sae,
    x: Tensor,
    dtype: torch.dtype,
    dead: Tensor | None,
    auxk_alpha: float,
    sparsity_coefficient: float,
) -> StepOutput:
    """Loss of one batch of scaled inputs [tokens, d_in] (float32)."""
    arch = sae.cfg.architecture
    if arch == "topk":
        vals, idx = TopKEncode.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.cfg.k, dtype)
        recon = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
        err = recon - x
        fvu = fvu_of(err, x)
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
        fired[idx[vals > 0]] = True
        aux = _auxk_loss(sae, None, err, x, dead, dtype)
        l0 = float((vals > 0).sum()) / x.shape[0]
        return StepOutput(fvu + auxk_alpha * aux, fvu.detach(), fired, l0, float(aux.detach()))

    pre = sae.pre_acts(x, dtype)
    if arch == "batchtopk":
        flat = pre.relu().flatten()
        top = flat.topk(sae.cfg.k * x.shape[0], sorted=False)
        acts = torch.zeros_like(flat).scatter_(0, top.indices, top.values).view_as(pre)
        with torch.no_grad():  # inference threshold: recent mean of the smallest kept value
            kept = top.values[top.values > 0]
            if kept.numel():
                t = sae.batch_threshold
                t.copy_(kept.min() if t == 0 else 0.9 * t + 0.1 * kept.min())
        penalty = pre.new_zeros(())
    elif arch == "jumprelu":
        theta = sae.log_threshold.exp()
        acts = JumpReLU.apply(pre, theta, sae.cfg.bandwidth)
        penalty = Step.apply(pre, theta, sae.cfg.bandwidth).sum(-1).mean()
    else:  # relu + L1 weighted by decoder norms
        acts = pre.relu()
        penalty = (acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
    recon = acts @ sae.W_dec + sae.b_dec
    err = recon - x
    fvu = fvu_of(err, x)
    active = acts > 0
    aux = penalty
    if arch == "batchtopk":
        aux = _auxk_loss(sae, pre, err, x, dead, dtype)
        loss = fvu + auxk_alpha * aux
    else:
        loss = fvu + sparsity_coefficient * penalty
    return StepOutput(
        loss, fvu.detach(), active.any(0), float(active.sum()) / x.shape[0], float(aux.detach())
    )


def _auxk_loss(
    sae: Sae,
    pre: Tensor | None,
    err: Tensor,
    x: Tensor,
    dead: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """AuxK (Gao et al. 2024): the top k_aux dead latents reconstruct the main
    reconstruction's error, the loss scaled down where few latents are dead. Only the dead
    latents' pre-activations are computed (and differentiated), so it costs little while
    few are dead."""
    n_dead = int(dead.sum()) if dead is not None else 0
    if n_dead == 0:
        return err.new_zeros(())
    # A share of the (shuffled) batch is enough signal, at a fraction of the cost.
    rows = max(1, math.ceil(x.shape[0] * AUXK_SHARE))
    err, x = err[:rows], x[:rows]
    k_aux = min(AUXK_K, n_dead)
    dead_idx = dead.nonzero().squeeze(1)
    if pre is None:
        w, b = sae.W_enc[dead_idx], sae.b_enc[dead_idx]
        pre_dead = F.linear((x - sae.b_dec).to(dtype), w.to(dtype), b.to(dtype)).float()
    else:
        pre_dead = pre[:rows, dead_idx].float()
    vals, pos = pre_dead.topk(k_aux, dim=-1, sorted=False)
    e_hat = F.embedding_bag(dead_idx[pos], sae.W_dec, per_sample_weights=vals.relu(), mode="sum")
    scale = min(n_dead / k_aux, 1.0)
    return scale * fvu_of(e_hat + err.detach(), x)


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
