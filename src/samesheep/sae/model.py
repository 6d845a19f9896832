"""Sparse autoencoders: TopK, BatchTopK, JumpReLU and ReLU + L1, with sparse paths.

Conventions (the same for every architecture):

    x' = x * input_scale                      raw activations scaled to mean squared norm d_in
    pre = (x' - b_dec) @ W_enc.T + b_enc      W_enc is stored [d_sae, d_in], like W_dec
    acts = activation(pre)                    [tokens, d_sae], non-negative
    x_hat = (acts @ W_dec + b_dec) / input_scale

Storing the encoder as [d_sae, d_in] keeps one latent's encoder and decoder vectors each in
one contiguous row, which is what the sparse paths gather. SAELens' layout (W_enc
[d_in, d_sae]) is written by sae/saelens.py, with input_scale folded into the weights.

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.constants import ARCHITECTURES
from ..core.errors import SamesheepError

AUXK_SHARE = 0.25
"""Share of each (shuffled) batch's tokens on which the AuxK loss is computed."""
AUXK_K = 128
"""Dead latents that reconstruct the residual per token; the AuxK loss is scaled by
min(dead / AUXK_K, 1), so a handful of dead latents gets a small weight (as sparsify)."""
MIN_THRESHOLD = 1e-3
"""The smallest threshold calibrate() gives a jumprelu latent."""
BATCHTOPK_CAP = 4
"""BatchTopK keeps at most this many times k latents on one token in training (where a token
would hold more of the batch's largest activations, its largest are kept)."""
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

    values: Tensor  # [nnz] float32, all > 0 (in training, jumprelu's also 0 in the band)
    latents: Tensor  # [nnz] int64: the latent of each value
    offsets: Tensor  # [tokens + 1] int64: token i holds entries offsets[i]:offsets[i + 1]

    @property
    def tokens(self) -> int:
        return self.offsets.numel() - 1

    def rows(self) -> Tensor:
        """[nnz] int64: the token (row) of each entry."""
        return csr_rows(self.offsets)

    def take(self, rows: np.ndarray | Tensor) -> SparseCodes:
        """The codes of the tokens `rows`, in that order."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.offsets.device)
        lo = self.offsets[rows]
        counts = self.offsets[rows + 1] - lo
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long, device=lo.device)
        offsets[1:] = counts.cumsum(0)
        flat = torch.repeat_interleave(lo - offsets[:-1], counts)
        flat += torch.arange(int(offsets[-1]), device=lo.device)
        return SparseCodes(self.values[flat], self.latents[flat], offsets)

    def to_dense(self, d_sae: int) -> Tensor:
        """[tokens, d_sae] float32."""
        out = self.values.new_zeros(self.tokens, d_sae)
        out[self.rows(), self.latents] = self.values
        return out


def csr_rows(offsets: Tensor) -> Tensor:
    """[nnz] int64: the row of each entry of a CSR layout with these offsets [rows + 1]."""
    counts = offsets.diff()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)


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
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.copy_(data_mean if data_mean is not None else torch.zeros_like(self.b_dec))

    @torch.no_grad()
    def calibrate(self, x_scaled: Tensor, target_l0: float) -> None:
        """Start a jumprelu or relu SAE firing about `target_l0` latents per token: each
        latent's threshold (jumprelu) or bias (relu) is set at the quantile of its
        pre-activations on a sample of scaled inputs that leaves target_l0 / d_sae of the
        tokens above it. Every latent then fires at first, and about equally often (from a
        fixed threshold, many never would)."""
        arch = self.cfg.architecture
        if arch not in ("jumprelu", "relu"):
            return
        xc = x_scaled.float() - self.b_dec
        pre = F.linear(xc, self.W_enc)  # b_enc is still zero
        n = pre.shape[0]
        above = min(max(1, round(n * target_l0 / self.cfg.d_sae)), n - 1)
        q = pre.kthvalue(n - above, dim=0).values  # `above` tokens lie above it
        acts = torch.where(pre > q, pre if arch == "jumprelu" else pre - q, 0.0)
        # The encoder scaled so the first reconstruction has its least-squares size: from
        # unit rows the active latents overshoot (FVU above 1), and the first steps then push
        # every pre-activation below its threshold (measured: see benchmarks/RESULTS.md,
        # 'Four SAE architectures').
        recon = acts @ self.W_dec
        alpha = float((recon * xc).sum() / recon.pow(2).sum().clamp_min(1e-12))
        alpha = min(max(alpha, 1e-3), 1e3)
        self.W_enc.mul_(alpha)
        if arch == "jumprelu":
            self.log_threshold.copy_((q * alpha).clamp_min(MIN_THRESHOLD).log())
        else:
            self.b_enc.copy_(-q * alpha)

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
        if self.cfg.architecture == "batchtopk" and not cast and not torch.is_grad_enabled():
            return self._encode_above_threshold(self.scale(x))
        for chunk in self.scale(x).split(ENCODE_CHUNK):
            pre = self.pre_acts(chunk, dtype, w_enc)
            if self.cfg.architecture == "topk":
                vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
                parts.append(sparse_from_topk(vals.relu(), idx))
            else:
                parts.append(sparse_from_dense(self.activate(pre)))
        return concat_codes(parts, x.device)

    def _encode_above_threshold(self, x_scaled: Tensor) -> SparseCodes:
        """BatchTopK's inference codes in float32, every chunk's pre-activations written into
        one reused buffer and thresholded in place: fresh [chunk, d_sae] temporaries for each
        chunk, between the small kept codes, fragment the heap (measured: 9 GB peak for the
        codes of 138k units of a 9,728-latent crosscoder, 2 GB this way)."""
        parts = []
        buf = x_scaled.new_empty(min(ENCODE_CHUNK, x_scaled.shape[0]), self.cfg.d_sae)
        theta = float(self.batch_threshold)
        for chunk in x_scaled.split(ENCODE_CHUNK):
            pre = buf[: chunk.shape[0]]
            torch.addmm(self.b_enc, chunk - self.b_dec, self.W_enc.T, out=pre)
            parts.append(sparse_from_dense(torch.threshold_(pre, max(theta, 0.0), 0.0)))
        return concat_codes(parts, x_scaled.device)

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
    """What is minimised: fvu + auxk_alpha * auxk, plus coefficient * sparsity (jumprelu,
    relu)."""
    fvu: Tensor
    """The batch's fraction of variance unexplained (scaled space), detached."""
    fired: Tensor
    """[d_sae] bool: latents active on some token of the batch."""
    l0: float
    """Mean active latents per token."""
    auxk: float
    """AuxK loss (0 where no latent is dead)."""
    sparsity: float
    """Sparsity penalty before its coefficient: expected L0 (jumprelu), decoder-norm-weighted
    L1 (relu); 0 for topk and batchtopk."""
    threshold: float | None
    """BatchTopK: the smallest activation the batch kept (for the inference threshold)."""


def fvu_of(err: Tensor, x: Tensor) -> Tensor:
    """Squared error over the batch's total variance."""
    return err.pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


@dataclass(frozen=True)
class EncodeSettings:
    """How a training encoder selects its latents, besides the SAE's tensors: the dtype of
    its matrix products, the latents per token (topk; on average, batchtopk), the width of
    the threshold's straight-through kernel (jumprelu; 0 for relu) and the tokens encoded at
    a time."""

    dtype: torch.dtype = torch.float32
    k: int = 32
    bandwidth: float = 0.0
    chunk: int = ENCODE_CHUNK


class TopKEncode(torch.autograd.Function):
    """TopK selection whose backward pass touches only the k selected latents per token:
    the encoder's weight gradient is a sparse [d_sae, tokens] x dense [tokens, d_in] product
    instead of a dense one over all latents, and b_dec's gradient a product with the bias
    gradient. The forward pass runs in chunks of tokens, so each chunk's pre-activations are
    still in cache when top-k reads them, and the dense [tokens, d_sae] matrix never exists."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, s: EncodeSettings):
        xc = x - b_dec
        dtype, k = s.dtype, s.k
        w, b = W_enc.to(dtype), b_enc.to(dtype)
        parts = [
            F.linear(c.to(dtype), w, b).topk(k, dim=-1, sorted=False) for c in xc.split(s.chunk)
        ]
        vals = torch.cat([p.values for p in parts]).float().relu()
        idx = torch.cat([p.indices for p in parts])
        ctx.save_for_backward(xc, W_enc, idx, vals)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals: Tensor, _grad_idx: Tensor):
        xc, W_enc, idx, vals = ctx.saved_tensors
        g = torch.where(vals > 0, grad_vals, 0.0)  # the ReLU after selection
        n, k = idx.shape
        rows = torch.arange(n, device=idx.device).repeat_interleave(k)
        grad_w, grad_b, grad_b_dec = sparse_encoder_grads(
            xc, W_enc, rows, idx.reshape(-1), g.reshape(-1)
        )
        return None, grad_b_dec, grad_w, grad_b, None


def sparse_encoder_grads(
    xc: Tensor, W_enc: Tensor, rows: Tensor, latents: Tensor, g: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of W_enc, b_enc and b_dec from the gradient `g` [nnz] of the pre-activations
    at the entries (rows[j], latents[j]) only (elsewhere it is zero). g as a [d_sae, tokens]
    CSR matrix (rows sorted by latent): its product with xc is the weight gradient, on the
    CPU (MKL) and on CUDA (cuSPARSE) alike."""
    m, n = W_enc.shape[0], xc.shape[0]
    order = latents.argsort(stable=True)
    crow = torch.zeros(m + 1, dtype=torch.long, device=latents.device)
    crow[1:] = torch.bincount(latents, minlength=m).cumsum(0)
    g = g.contiguous()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is tested here
        warnings.simplefilter("ignore", UserWarning)
        sparse = torch.sparse_csr_tensor(crow, rows[order], g[order], (m, n))
    grad_w = sparse @ xc
    grad_b = torch.zeros_like(W_enc[:, 0]).index_add_(0, latents, g)
    grad_b_dec = -(grad_b @ W_enc)  # every pre-activation holds -b_dec . W_enc[j]
    return grad_w, grad_b, grad_b_dec


class ThresholdEncode(torch.autograd.Function):
    """The entries of pre-activations above a per-latent threshold (jumprelu; 0 for relu),
    and for jumprelu those within half a bandwidth of it, without a dense [tokens, d_sae]
    matrix or gradient: the forward pass runs in chunks of tokens and keeps only those
    entries (CSR, by token); the backward pass is the sparse product of TopKEncode.

    Returns values [nnz] (the activation: the pre-activation above the threshold, else 0),
    latents [nnz], offsets [tokens + 1] and in_band [nnz] bool. The threshold's gradient is
    the straight-through estimator of Rajamanoharan et al. (2024) with a rectangle kernel:
    d value / d theta = -(theta / bandwidth) on the entries in the band.

    The forward pass takes no context (setup_context saves what the backward pass needs), so
    it also returns what the backward pass reads besides the outputs: the centred inputs
    x - b_dec [tokens, d_in] (callers ignore them). Gradients are not materialised: the
    backward pass reads only that of the values, which the loss always has, and no zeros are
    made for the other outputs."""

    @staticmethod
    def forward(x, b_dec, W_enc, b_enc, theta, s: EncodeSettings):
        xc = x - b_dec
        dtype = s.dtype
        w, b = W_enc.to(dtype), b_enc.to(dtype)
        half = s.bandwidth / 2
        vals, lats, counts, band = [], [], [], []
        for c in xc.split(s.chunk):
            pre = F.linear(c.to(dtype), w, b).float()
            keep = pre > theta
            near = (pre - theta).abs_() < half if half > 0 else None
            take = keep | near if near is not None else keep
            r, j = take.nonzero(as_tuple=True)
            v = pre[r, j]
            on = keep[r, j]
            vals.append(torch.where(on, v, 0.0))
            lats.append(j)
            counts.append(torch.bincount(r, minlength=c.shape[0]))
            band.append(near[r, j] if near is not None else torch.zeros_like(on))
        values, latents, in_band = torch.cat(vals), torch.cat(lats), torch.cat(band)
        offsets = torch.zeros(x.shape[0] + 1, dtype=torch.long, device=x.device)
        offsets[1:] = torch.cat(counts).cumsum(0)
        return values, latents, offsets, in_band, xc

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, W_enc, _, theta, s = inputs
        values, latents, offsets, in_band, xc = output
        ctx.bandwidth = s.bandwidth
        ctx.save_for_backward(xc, W_enc, theta, values, latents, offsets, in_band)
        ctx.mark_non_differentiable(latents, offsets, in_band, xc)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_values: Tensor, *_):
        xc, W_enc, theta, values, latents, offsets, in_band = ctx.saved_tensors
        rows = csr_rows(offsets)
        g = torch.where(values > 0, grad_values, 0.0)  # d value / d pre: 1 above, else 0
        grad_w, grad_b, grad_b_dec = sparse_encoder_grads(xc, W_enc, rows, latents, g)
        grad_theta = None
        if ctx.needs_input_grad[4]:
            lat = latents[in_band]
            ste = -(theta[lat] / ctx.bandwidth) * grad_values[in_band]
            grad_theta = torch.zeros_like(theta).index_add_(0, lat, ste)
        return None, grad_b_dec, grad_w, grad_b, grad_theta, None


class BandL0(torch.autograd.Function):
    """The batch's L0 (active entries per token) as a function of the thresholds, whose
    gradient is the straight-through estimator of the step function: -(1 / bandwidth) times
    each latent's entries in the band, per token."""

    @staticmethod
    def forward(ctx, theta: Tensor, in_band_per_latent: Tensor, l0: float, bandwidth: float):
        ctx.save_for_backward(in_band_per_latent)
        ctx.bandwidth = bandwidth
        return theta.new_tensor(l0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (band,) = ctx.saved_tensors
        return -(grad / ctx.bandwidth) * band, None, None, None


@dataclass
class StepSettings:
    """What a training forward pass needs besides the SAE and the batch."""

    dtype: torch.dtype = torch.float32
    """Dtype of the encoder's matrix products."""
    dead: Tensor | None = None
    """[d_sae] bool: latents counted as dead (for AuxK); None turns AuxK off."""
    auxk_alpha: float = 0.0
    sparsity_coefficient: float = 0.0
    target_l0: float = 32.0
    """JumpReLU's L0 penalty is (L0 / target_l0 - 1)^2 (the L0 through the estimator)."""
    blocks: tuple[slice, ...] | None = None
    """Column blocks (a crosscoder's models) whose FVUs the loss sums, the output reporting
    their mean; None: one FVU over every column."""


def _fired(d_sae: int, latents: Tensor, device: torch.device) -> Tensor:
    fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
    fired[latents] = True
    return fired


def topk_forward(sae: Sae, x: Tensor, s: StepSettings) -> ForwardOutput:
    """TopK: k latents per token, encoder and decoder both sparse in the backward pass."""
    how = EncodeSettings(s.dtype, sae.cfg.k)
    vals, idx = TopKEncode.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, how)
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
    """BatchTopK: the k * tokens largest activations of the whole batch (among each token's
    BATCHTOPK_CAP * k largest), encoded and decoded sparsely, as TopK's."""
    how = EncodeSettings(s.dtype, sae.cfg.k)
    codes = SparseCodes(*BatchTopKEncode.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, how))
    smallest = float(codes.values.detach().min()) if codes.values.numel() else None
    return _sparse_output(sae, x, codes, s, threshold=smallest)


class BatchTopKEncode(torch.autograd.Function):
    """BatchTopK's selection without a dense [tokens, d_sae] matrix or gradient: each chunk
    of tokens keeps its BATCHTOPK_CAP * k largest pre-activations per token, the batch's
    k * tokens largest positive ones among those are kept, and only they enter the backward
    pass (the sparse product of TopKEncode). Returns values [nnz], latents [nnz] and offsets
    [tokens + 1] (CSR, by token)."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, s: EncodeSettings):
        xc = x - b_dec
        dtype, k = s.dtype, s.k
        n, cap = x.shape[0], min(W_enc.shape[0], BATCHTOPK_CAP * k)
        w, b = W_enc.to(dtype), b_enc.to(dtype)
        parts = [
            F.linear(c.to(dtype), w, b).topk(cap, dim=-1, sorted=False) for c in xc.split(s.chunk)
        ]
        vals = torch.cat([p.values for p in parts]).float()  # [n, cap]
        idx = torch.cat([p.indices for p in parts])
        flat = vals.flatten()
        top = flat.topk(min(k * n, flat.numel()), sorted=False).indices
        keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, top, True)
        keep = (keep & (flat > 0)).view(n, cap)
        values, latents = vals[keep], idx[keep]  # row-major: sorted by token
        offsets = torch.zeros(n + 1, dtype=torch.long, device=x.device)
        offsets[1:] = keep.sum(1).cumsum(0)
        ctx.save_for_backward(xc, W_enc, latents, offsets)
        ctx.mark_non_differentiable(latents, offsets)
        return values, latents, offsets

    @staticmethod
    def backward(ctx, grad_values: Tensor, *_):
        xc, W_enc, latents, offsets = ctx.saved_tensors
        rows = csr_rows(offsets)
        grad_w, grad_b, grad_b_dec = sparse_encoder_grads(xc, W_enc, rows, latents, grad_values)
        return None, grad_b_dec, grad_w, grad_b, None


def _sparse_output(
    sae: Sae,
    x: Tensor,
    codes: SparseCodes,
    s: StepSettings,
    penalty: Tensor | None = None,
    threshold: float | None = None,
) -> ForwardOutput:
    """The training output of sparse codes (CSR, by token; values carry their gradient):
    decoded, with the AuxK loss and, where given, the sparsity penalty (jumprelu, relu) or
    the smallest kept value (batchtopk); the FVU per column block where s.blocks says."""
    values, latents, offsets = codes
    err = gather_decode(sae.W_dec, values, latents, offsets) + sae.b_dec - x
    if s.blocks is None:
        fvu = summed = fvu_of(err, x)
    else:
        each = torch.stack([fvu_of(err[:, b], x[:, b]) for b in s.blocks])
        fvu, summed = each.mean(), each.sum()
    aux = auxk_loss(sae, x, err, s.dead, s.dtype)
    loss = summed + s.auxk_alpha * aux
    if penalty is not None:
        loss = loss + s.sparsity_coefficient * penalty
    active = values.detach() > 0
    return ForwardOutput(
        loss,
        fvu.detach(),
        _fired(sae.cfg.d_sae, latents[active], x.device),
        float(active.sum()) / x.shape[0],
        float(aux.detach()),
        float(penalty.detach()) if penalty is not None else 0.0,
        threshold,
    )


def jumprelu_forward(sae: Sae, x: Tensor, s: StepSettings) -> ForwardOutput:
    """JumpReLU: learned per-latent thresholds, an L0 penalty, both through a
    straight-through estimator (Rajamanoharan et al. 2024); sparse entries only."""
    theta = sae.log_threshold.exp()
    eps = sae.cfg.bandwidth
    how = EncodeSettings(s.dtype, bandwidth=eps)
    values, latents, offsets, in_band, _ = ThresholdEncode.apply(
        x, sae.b_dec, sae.W_enc, sae.b_enc, theta, how
    )
    band = torch.bincount(latents[in_band], minlength=sae.cfg.d_sae).float() / x.shape[0]
    l0 = float((values.detach() > 0).sum()) / x.shape[0]
    penalty = (BandL0.apply(theta, band, l0, eps) / s.target_l0 - 1).pow(2)
    return _sparse_output(sae, x, SparseCodes(values, latents, offsets), s, penalty)


def relu_forward(sae: Sae, x: Tensor, s: StepSettings) -> ForwardOutput:
    """ReLU with an L1 penalty weighted by the decoder row norms; sparse entries only."""
    zero = sae.b_enc.new_zeros(()).detach()
    how = EncodeSettings(s.dtype, bandwidth=0.0)
    values, latents, offsets, _, _ = ThresholdEncode.apply(
        x, sae.b_dec, sae.W_enc, sae.b_enc, zero, how
    )
    norms = torch.linalg.vector_norm(sae.W_dec, dim=1)
    penalty = (values * norms[latents]).sum() / x.shape[0]
    return _sparse_output(sae, x, SparseCodes(values, latents, offsets), s, penalty)


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
