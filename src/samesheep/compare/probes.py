"""Conditional probes: how much of each latent of one model's SAE the other model's hidden
state predicts beyond what the hidden state of that model's untrained copy predicts
(conditional probing, Hewitt et al. 2021, arXiv 2109.09234).

For every latent, ridge probes predict its value on each aligned unit from three inputs at
the compared layer of the other model (the target): the target's hidden state, its untrained
copy's (the floor) and the two side by side. Each is fitted on the training documents and
scored by R^2 on the held-out documents; the information about the latent in the target is

    conditional R^2 = R^2(target + floor) - R^2(floor).

Everything solves in closed form from second moments accumulated in one pass over the units
(memory independent of their number): per cross-validation fold of the training documents
the moments X'X, X'Y, sums and squares, then one Cholesky factorisation of X'X + lambda I
per fold, input and ridge strength shared by every latent; the strength is chosen per
latent by the folds' summed squared error. Inputs are standardised by their training mean
and deviation, and every fit has an intercept (the fold's own means).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..core.errors import SamesheepError
from .measurement import jackknife

INPUTS = ("target", "floor", "both")
"""The probes' inputs: the target model's hidden state, its untrained copy's, both."""
INTERVALS = ("floor", "both")
"""The inputs whose R^2 is also scored with each document group left out (the conditional
R^2 is both's minus floor's; the plain R^2 from the target has no interval)."""


@dataclass(frozen=True)
class ProbeSettings:
    """How the probes are fitted."""

    folds: int = 3
    """Cross-validation folds of the training documents that choose each ridge strength."""
    alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    """Ridge strengths tried, as multiples of the number of training units (the inputs are
    standardised, so alpha = 1 weighs the penalty like one more copy of the data)."""
    block: int = 4096
    """Latents solved at once (memory: a few [dims, block] float32 matrices)."""
    seed: int = 0


@dataclass
class ProbeData:
    """The units a probe reads: the source latents' values and the target's inputs."""

    y: sp.csr_matrix
    """[units, latents] the source latents' values on the units."""
    x: dict[str, np.ndarray]
    """"target" and "floor": [units, dims] float32 hidden states on the same units."""
    doc: np.ndarray
    """[units] document number; documents from `first_heldout` on are held out."""
    first_heldout: int
    group: np.ndarray
    """[units] document group of the jackknife (0..G-1)."""


@dataclass
class ProbeResult:
    """Held-out R^2 of every latent's probe from each input, with each document group's
    held-out units left out in turn (the probes stay those fitted on the training units)."""

    r2: dict[str, np.ndarray]  # input -> [latents]
    dropped: dict[str, np.ndarray]  # input -> [groups, latents]
    alpha: dict[str, np.ndarray]  # input -> [latents] the chosen ridge strength

    def columns(self, cols: slice, n: int, where: np.ndarray) -> ProbeResult:
        """This result's latents `cols`, placed at the positions `where` of n latents (nan,
        0 or alpha 0 elsewhere): the probed latents among all of an SAE's."""

        def put(v: np.ndarray, fill: float) -> np.ndarray:
            out = np.full((*v.shape[:-1], n), fill, dtype=np.float64)
            out[..., where] = v[..., cols]
            return out

        return ProbeResult(
            {k: put(v, np.nan) for k, v in self.r2.items()},
            {k: put(v, np.nan) for k, v in self.dropped.items()},
            {k: put(v, 0.0) for k, v in self.alpha.items()},
        )

    def conditional(self) -> np.ndarray:
        return self.r2["both"] - self.r2["floor"]

    def conditional_dropped(self) -> np.ndarray:
        return self.dropped["both"] - self.dropped["floor"]


def document_folds(doc: np.ndarray, first_heldout: int, folds: int, seed: int) -> np.ndarray:
    """[units] the cross-validation fold (0..folds-1) of each training unit, whole
    documents dealt at random; -1 on held-out units."""
    train = doc < first_heldout
    docs = np.unique(doc[train])
    k = max(1, min(folds, len(docs)))
    deal = np.random.default_rng(seed).permutation(len(docs)) % k
    out = np.full(len(doc), -1, dtype=np.int64)
    out[train] = deal[np.searchsorted(docs, doc[train])]
    return out


@dataclass
class _Moments:
    """Sums over one set of units: count, X sums, Y sums and squares, X'X, X'Y (float64)."""

    n: float
    sx: torch.Tensor  # [d]
    sy: torch.Tensor  # [L]
    yy: torch.Tensor  # [L]
    xx: torch.Tensor  # [d, d]
    xy: torch.Tensor  # [d, L]

    def __add__(self, o: _Moments) -> _Moments:
        return _Moments(
            self.n + o.n,
            self.sx + o.sx,
            self.sy + o.sy,
            self.yy + o.yy,
            self.xx + o.xx,
            self.xy + o.xy,
        )

    def __sub__(self, o: _Moments) -> _Moments:
        return _Moments(
            self.n - o.n,
            self.sx - o.sx,
            self.sy - o.sy,
            self.yy - o.yy,
            self.xx - o.xx,
            self.xy - o.xy,
        )

    def dims(self, cols: slice) -> _Moments:
        """The moments of the input dimensions `cols` alone."""
        return _Moments(self.n, self.sx[cols], self.sy, self.yy, self.xx[cols, cols], self.xy[cols])

    def centred(self, mx: torch.Tensor, my: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(X'X, X'Y, Y'Y diagonal) of these units with the means mx, my taken off."""
        n = self.n
        xx = self.xx - torch.outer(mx, self.sx) - torch.outer(self.sx, mx) + n * torch.outer(mx, mx)
        xy = self.xy.clone()  # rank-one updates in place: one pass each over [d, L]
        xy.addr_(mx, self.sy, alpha=-1).addr_(self.sx, my, alpha=-1).addr_(mx, my, alpha=n)
        yy = self.yy - 2 * my * self.sy + n * my * my
        return xx, xy, yy


def _moments(x: torch.Tensor, y: sp.csr_matrix, xx: torch.Tensor | None = None) -> _Moments:
    """The moments of the units of x [n, d] (float32, standardised) and y [n, L]; `xx`:
    X'X where it is already known (the same units with other latents' values)."""
    dev = x.device
    yt = y.T.tocsr()
    yt = yt.astype(np.float32) if yt.dtype != np.float32 else yt
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        ys = torch.sparse_csr_tensor(
            torch.from_numpy(yt.indptr.astype(np.int64)),
            torch.from_numpy(yt.indices.astype(np.int64)),
            torch.from_numpy(yt.data),
            size=yt.shape,
            check_invariants=False,
        ).to(dev)
    xy = (ys @ x).T.double() if y.nnz else torch.zeros(x.shape[1], y.shape[1], device=dev)
    yv = torch.from_numpy(np.asarray(y.sum(0, dtype=np.float64)).ravel()).to(dev)
    y2 = torch.from_numpy(np.asarray(y.multiply(y).sum(0, dtype=np.float64)).ravel()).to(dev)
    xx = (x.T @ x).double() if xx is None else xx
    return _Moments(float(x.shape[0]), x.sum(0).double(), yv, y2, xx, xy.contiguous())


def _ridge_inverse(xx: torch.Tensor, n: float, alpha: float) -> torch.Tensor:
    """(X'X + alpha n I)^-1 of a centred X'X, through its Cholesky factor in float64, then
    rounded to float32 for the products over latents (alpha >= 1e-3 keeps its condition
    number low enough for that)."""
    eye = torch.eye(xx.shape[0], dtype=xx.dtype, device=xx.device)
    factor_inverse = torch.linalg.solve_triangular(
        torch.linalg.cholesky(xx + alpha * n * eye), eye, upper=False
    )  # (L L')^-1 = L^-T L^-1 (LAPACK's potri is many times slower here)
    return (factor_inverse.T @ factor_inverse).float()


def _cv_errors(
    folds: list[_Moments], total: _Moments, s: ProbeSettings, inputs: dict[str, slice]
) -> dict[str, torch.Tensor]:
    """Per input (its dimensions), [alphas, L] squared error of every latent's probe summed
    over the held-in folds, each fold predicted by the probe fitted on the others (with
    their own means). One factorisation per fold, input and ridge strength serves every
    latent; the moments are centred once per fold for all inputs."""
    L = total.sy.shape[0]
    dev = total.sy.device
    errors = {k: torch.zeros(len(s.alphas), L, dtype=torch.float64, device=dev) for k in inputs}
    for fold in folds:
        rest = total - fold
        if rest.n < 2 or fold.n < 1:
            continue
        mx, my = rest.sx / rest.n, rest.sy / rest.n
        xx, xy, _ = rest.centred(mx, my)
        fxx, fxy, fyy = fold.centred(mx, my)
        xy, fxy, fxx = xy.float(), fxy.float(), fxx.float()
        for name, c in inputs.items():
            for i, alpha in enumerate(s.alphas):
                inverse = _ridge_inverse(xx[c, c], rest.n, alpha)
                for lo in range(0, L, s.block):
                    cols = slice(lo, lo + s.block)
                    w = inverse @ xy[c, cols]  # [d, block]
                    # sum over the fold of (y - x w)^2 = y'y - 2 w'x'y + w'x'x w
                    fit = torch.addmm(fxy[c, cols], fxx[c, c], w, beta=-2.0)
                    errors[name][i, cols] += fyy[cols] + torch.linalg.vecdot(w, fit, dim=0).double()
    return errors


def _heldout(
    x: torch.Tensor, y: sp.csc_matrix, fit: tuple[torch.Tensor, torch.Tensor], held: _Heldout
) -> np.ndarray:
    """[groups, L] the squared error of the probes `fit` (weights [d, L], intercepts [L]) on
    the held-out units x, y, summed over each document group's units: per group
    sum y^2 - 2 sum y p + sum p^2 of the predictions p, the middle term read only where y
    is not zero (y stays sparse)."""
    w, b = fit
    dev = x.device
    n = x.shape[0]
    onehot = torch.zeros(held.n_groups, n, dtype=torch.float32, device=dev)
    group = torch.from_numpy(held.group).to(dev)
    onehot[group, torch.arange(n, device=dev)] = 1
    sse = torch.tensor(held.sums[1], dtype=torch.float64, device=dev)  # [G, L] sum of y^2
    for lo in range(0, w.shape[1], HELDOUT_BLOCK):
        cols = slice(lo, lo + HELDOUT_BLOCK)
        p = torch.addmm(b[cols], x, w[:, cols])  # [n, block] the predictions
        block = y[:, cols].tocoo()
        r = torch.from_numpy(block.row.astype(np.int64)).to(dev)
        c = torch.from_numpy(block.col.astype(np.int64)).to(dev)
        yp = torch.from_numpy(block.data).to(dev, torch.float64) * p[r, c].double()
        cross = torch.zeros(held.n_groups, p.shape[1], dtype=torch.float64, device=dev)
        cross.index_put_((group[r], c), yp, accumulate=True)
        sse[:, cols] += (onehot @ p.square_()).double() - 2 * cross
    return sse.cpu().numpy()


HELDOUT_BLOCK = 2048
"""Latents whose held-out predictions are made at once ([held-out units, block] float32)."""


def group_sums(y: sp.csr_matrix, group: np.ndarray, n_groups: int, square: bool) -> np.ndarray:
    """[groups, L] per document group, the sum of y (or of y^2) over its units."""
    ind = sp.csr_matrix(
        (np.ones(len(group)), (group, np.arange(len(group)))), shape=(n_groups, len(group))
    )
    v = y.astype(np.float64)
    v = v.multiply(v) if square else v
    return np.asarray((ind @ v).todense(), dtype=np.float64)


def r2_from_sums(sse: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """R^2 = 1 - SSE / SST over the groups summed (sse [G, L], sums [2, G, L] of y and y^2,
    counts [G]); SST around the mean of those units; nan where SST is 0."""
    n = counts.sum()
    sy, syy = sums[0].sum(0), sums[1].sum(0)
    sst = syy - sy * sy / max(n, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 1e-12 * np.maximum(syy, 1e-300), 1 - sse.sum(0) / sst, np.nan)


def _standardised(data: ProbeData, device: torch.device | str) -> torch.Tensor:
    """[units, target dims + floor dims] float32: both inputs side by side, each dimension
    standardised by its mean and deviation over the training units (float32 sums, which
    torch makes pairwise, of a block of units at a time, added in float64)."""
    train = torch.from_numpy(data.doc < data.first_heldout).to(device)
    x = torch.cat([torch.as_tensor(data.x[k], dtype=torch.float32) for k in ("target", "floor")], 1)
    x = x.to(device)
    blocks = [
        (x[lo : lo + UNIT_BLOCK], train[lo : lo + UNIT_BLOCK])
        for lo in range(0, len(x), UNIT_BLOCK)
    ]
    n = max(int(train.sum()), 1)
    mean = sum(xb[tb].sum(0).double() for xb, tb in blocks) / n
    m32 = mean.float()
    var = sum((xb[tb] - m32).square().sum(0).double() for xb, tb in blocks) / n
    std = var.sqrt()
    std = torch.where(std > 0, std, 1.0)
    return x.sub_(m32).div_(std.float())


UNIT_BLOCK = 16384
"""Units standardised at once."""


@dataclass
class _Heldout:
    """The held-out units: inputs, latents (by column), document groups and their sums."""

    z: torch.Tensor
    y: sp.csc_matrix
    group: np.ndarray
    n_groups: int
    counts: np.ndarray  # [groups] units
    sums: np.ndarray  # [2, groups, L] sums of y and y^2

    moments: _Moments  # raw moments of the held-out units

    def score(
        self, fit: tuple[torch.Tensor, torch.Tensor], dims: slice, intervals: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(R^2 [L], R^2 with each group's units left out [groups, L], nan without
        `intervals`) of the probes `fit` from the input dimensions `dims`."""
        n_latents = fit[0].shape[1]
        if not len(self.group):
            return np.full(n_latents, np.nan), np.full((self.n_groups, n_latents), np.nan)
        if not intervals:  # from the moments: no prediction made
            sse = _moment_sse(self.moments.dims(dims), fit)[None]
            nan = np.full((self.n_groups, n_latents), np.nan)
            return r2_from_sums(sse, self.sums, self.counts), nan
        sse = _heldout(self.z[:, dims], self.y, fit, self)
        whole = r2_from_sums(sse, self.sums, self.counts)
        dropped = [
            r2_from_sums(
                np.delete(sse, g, 0), np.delete(self.sums, g, 1), np.delete(self.counts, g)
            )
            for g in range(self.n_groups)
        ]
        return whole, np.stack(dropped) if dropped else np.zeros((0, n_latents))


def _heldout_units(data: ProbeData, z: torch.Tensor) -> _Heldout:
    rows = np.flatnonzero(data.doc >= data.first_heldout)
    n_groups = int(data.group.max()) + 1 if len(data.group) else 0
    y = data.y[rows]
    group = data.group[rows]
    zh = z[torch.from_numpy(rows).to(z.device)]
    return _Heldout(
        zh,
        y.tocsc(),  # read a block of latents at a time
        group,
        n_groups,
        np.bincount(group, minlength=n_groups).astype(np.float64),
        np.stack([group_sums(y, group, n_groups, square=q) for q in (False, True)]),
        _moments(zh, y),
    )


def _moment_sse(m: _Moments, fit: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """[L] the squared error of the probes `fit` over the units of the raw moments m:
    sum (y - b - x w)^2 expanded, so no prediction is made."""
    w, b = fit
    b = b.double()
    gw = (m.xx.float() @ w).double()
    w64 = w.double()
    sse = (
        m.yy
        - 2 * b * m.sy
        - 2 * torch.linalg.vecdot(w64, m.xy, dim=0)
        + m.n * b * b
        + 2 * b * (m.sx @ w64)
        + torch.linalg.vecdot(w64, gw, dim=0)
    )
    return sse.cpu().numpy()


def fit_probes(
    data: ProbeData,
    s: ProbeSettings,
    device: torch.device | str = "cpu",
    null_order: np.ndarray | None = None,
) -> tuple[ProbeResult, ProbeResult | None]:
    """Every latent's probe from each input (INPUTS), its ridge strength chosen per latent by
    cross-validation over the training documents, scored on the held-out documents; and,
    where `null_order` is given, the same probes (same inputs, same ridge strengths) fitted
    and scored with the latents' values taken in that order of the units (the null; no
    left-out-group values)."""
    z = _standardised(data, device)
    data = ProbeData(data.y.astype(np.float32), data.x, data.doc, data.first_heldout, data.group)
    train = data.doc < data.first_heldout
    if not train.any():
        raise SamesheepError("no training units to fit the probes on")
    fold = document_folds(data.doc, data.first_heldout, s.folds, s.seed)
    per_fold = []
    for k in range(int(fold.max()) + 1):
        rows = np.flatnonzero(fold == k)
        per_fold.append(_moments(z[torch.from_numpy(rows).to(z.device)], data.y[rows]))
    total = per_fold[0]
    for m in per_fold[1:]:
        total = total + m
    held = _heldout_units(data, z)
    null_train = null_held = None
    if null_order is not None:
        y_null = data.y[null_order]  # the same units (and X'X), other latents' values
        rows = np.flatnonzero(train)
        null_train = _moments(z[torch.from_numpy(rows).to(z.device)], y_null[rows], total.xx)
        rows = np.flatnonzero(~train)
        null_held = _moments(held.z, y_null[rows], held.moments.xx)
    d_t = data.x["target"].shape[1]
    inputs = {"target": slice(0, d_t), "floor": slice(d_t, None), "both": slice(None)}
    n_latents = data.y.shape[1]
    out = ProbeResult({}, {}, {})
    null = ProbeResult({}, {}, {}) if null_order is not None else None
    errors = _cv_errors(per_fold, total, s, inputs)
    for name, c in inputs.items():
        choice = errors[name].argmin(0).cpu().numpy()
        out.alpha[name] = np.asarray(s.alphas)[choice]
        fit = _final_fit(total, choice, s, c)
        out.r2[name], out.dropped[name] = held.score(fit, c, name in INTERVALS)
        if null is not None:
            null_fit = _final_fit(null_train, choice, s, c)
            sse = _moment_sse(null_held.dims(c), null_fit)[None]
            null.r2[name] = r2_from_sums(sse, held.sums, held.counts)
            null.dropped[name] = np.full((held.n_groups, n_latents), np.nan)
            null.alpha[name] = out.alpha[name]
    return out, null


def _final_fit(
    m: _Moments, choice: np.ndarray, s: ProbeSettings, dims: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [d, L], intercepts [L]) of every latent's probe from the input dimensions
    `dims` on all training units, at its chosen ridge strength."""
    mx, my = m.sx / m.n, m.sy / m.n
    xx, xy, _ = m.centred(mx, my)
    xx, xy, mx = xx[dims, dims], xy[dims].float(), mx[dims]
    w = torch.zeros(xy.shape, dtype=torch.float32, device=xy.device)
    choice_t = torch.from_numpy(choice).to(xy.device)
    for i, alpha in enumerate(s.alphas):
        cols = torch.nonzero(choice_t == i).ravel()
        if len(cols):
            w[:, cols] = _ridge_inverse(xx, m.n, alpha) @ xy[:, cols]
    b = my - mx @ w.double()
    return w, b.float()


# ---------------------------------------------------------------- the three labels

LABELS = {
    "shared": "shared as a latent",
    "spread": "present but spread out",
    "absent": "absent",
}
"""Each probed latent's label in the other model, in the order the report shows them."""


@dataclass(frozen=True)
class LabelRule:
    """When a latent is shared (a partner at r >= partner_r) and when present but spread out
    (its conditional R^2 reaches min_r2 and exceeds its null's by as much)."""

    partner_r: float
    min_r2: float


@dataclass
class DirectionProbes:
    """One direction's probes: the source latents' R^2 from the target's inputs, and the
    same probes on units shifted within documents (the null), over every latent of the
    source (nan where it was not probed)."""

    result: ProbeResult
    null: ProbeResult
    probed: np.ndarray  # [latents] bool: judged, and with held-out variance from every input


def label_latents(
    best_r: np.ndarray, cond: np.ndarray, cond_null: np.ndarray, rule: LabelRule
) -> np.ndarray:
    """[latents] "shared", "spread" or "absent" (see LABELS and LabelRule)."""
    shared = np.nan_to_num(best_r, nan=-np.inf) >= rule.partner_r
    c = np.nan_to_num(cond, nan=-np.inf)
    above_null = c - np.nan_to_num(cond_null, nan=0.0) >= rule.min_r2
    spread = ~shared & (c >= rule.min_r2) & above_null
    return np.where(shared, "shared", np.where(spread, "spread", "absent"))


def label_shares(labels: np.ndarray, probed: np.ndarray) -> dict[str, float]:
    """{label: share of the probed latents}."""
    n = int(probed.sum())
    return {k: float((labels[probed] == k).sum() / n) if n else float("nan") for k in LABELS}


def label_split(
    probes: DirectionProbes, best: tuple[np.ndarray, list[np.ndarray]], rule: LabelRule
) -> tuple[np.ndarray, dict[str, object]]:
    """(each latent's label, the three-way split of the probed latents with delete-one-group
    jackknife intervals). `best`: each latent's best partner r and its values with each
    document group left out in turn; left out with it are the group's held-out units from
    the probes' scores (the probes themselves stay fitted on all training units)."""
    best_r, dropped_best = best
    cond, cond_null = probes.result.conditional(), probes.null.conditional()
    labels = label_latents(best_r, cond, cond_null, rule)
    shares = label_shares(labels, probes.probed)
    left_out = [
        label_shares(label_latents(b, c, cond_null, rule), probes.probed)
        for b, c in zip(dropped_best, probes.result.conditional_dropped(), strict=True)
    ]
    intervals = {}
    for k in LABELS:
        lo, hi, _ = jackknife(shares[k], [x[k] for x in left_out])
        intervals[k] = [max(lo, 0.0), min(hi, 1.0)] if np.isfinite(lo) else [lo, hi]
    null = cond_null[probes.probed]
    null = null[np.isfinite(null)]
    split = {
        "probed": int(probes.probed.sum()),
        "shares": shares,
        "intervals": intervals,
        "counts": {k: int((labels[probes.probed] == k).sum()) for k in LABELS},
        "null_conditional_r2": {
            "median": float(np.median(null)) if len(null) else float("nan"),
            "q99": float(np.quantile(null, 0.99)) if len(null) else float("nan"),
        },
        "rule": {"partner_r": rule.partner_r, "min_r2": rule.min_r2},
    }
    return labels, split
