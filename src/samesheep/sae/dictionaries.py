"""Dictionaries that are not sparse autoencoders: PCA, FastICA and NMF, fitted with
scikit-learn on a model's hidden states. The comparison runs them through exactly the code
it runs the SAEs through, so a reader sees what the sparse dictionary adds on the same scale.

Width: the hidden width for PCA and ICA (they allow no more); NMF could go wider, but is
given the same width so the three differ by method only. PCA and ICA directions have no
sign of their own: each is turned so that its codes are right-skewed on the fitting units
(the convention for ICA; a feature that fires rarely and strongly then reads positive), so
two fits of one direction agree in sign. NMF reads the hidden states shifted by their
minimum over the fitting units (NMF needs non-negative input; lower values are clipped).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA, FastICA, MiniBatchNMF
from sklearn.exceptions import ConvergenceWarning

from ..core.constants import DICTIONARY_METHODS
from ..core.errors import SamesheepError


@dataclass(frozen=True)
class DictionarySettings:
    """How one dictionary is fitted."""

    method: str
    width: int = 0
    """Components; 0: the hidden width (PCA and ICA allow no more)."""
    max_iter: int = 100
    """ICA's iterations, or NMF's passes over the fitting units (and its iterations when it
    encodes), at most."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in DICTIONARY_METHODS:
            raise SamesheepError(
                f"unknown dictionary {self.method!r}: choose from {', '.join(DICTIONARY_METHODS)}"
            )
        if self.width < 0 or self.max_iter < 1:
            raise SamesheepError("a dictionary's width must be >= 0 and max_iter >= 1")


@dataclass
class Dictionary:
    """A fitted dictionary: its estimator, how inputs are shifted first, and the sign of
    each component."""

    settings: DictionarySettings
    estimator: object
    shift: np.ndarray  # [d] subtracted from the inputs before the estimator reads them
    sign: np.ndarray  # [width] +1 or -1
    converged: bool

    @property
    def width(self) -> int:
        return len(self.sign)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """[units, width] float32 codes of the hidden states x [units, d]."""
        z = self._input(x)
        if self.settings.method == "nmf":
            return nmf_codes(self.estimator, z)
        return (self.estimator.transform(z) * self.sign).astype(np.float32)  # type: ignore[attr-defined]

    def _input(self, x: np.ndarray) -> np.ndarray:
        z = np.asarray(x, dtype=np.float32) - self.shift
        return np.clip(z, 0.0, None) if self.settings.method == "nmf" else z


@torch.no_grad()
def nmf_codes(est: MiniBatchNMF, z: np.ndarray) -> np.ndarray:
    """What MiniBatchNMF.transform computes (its multiplicative updates of W with the
    components H fixed, from the same start, to the same stopping rule; squared loss, no
    regularisation), with X H^T and H H^T computed once instead of at every iteration, in
    torch: 48 s to 33 s on the default run's 138k units at width 640."""
    if est.alpha_W or est._beta_loss != 2:
        return est.transform(z).astype(np.float32)  # what the shortcut does not cover
    x = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    h = torch.from_numpy(est.components_.astype(np.float32))
    avg = float(np.sqrt(z.mean(dtype=np.float32) / h.shape[0]))
    w = torch.full((x.shape[0], h.shape[0]), avg)
    numerator, hht = x @ h.T, h @ h.T
    eps = float(np.finfo(np.float32).eps)
    for _ in range(est._transform_max_iter):
        denominator = w @ hht
        denominator[denominator == 0] = eps
        updated = w * (numerator / denominator)
        change = float(torch.linalg.vector_norm(updated - w))
        w = updated
        if est.tol > 0 and change / float(torch.linalg.vector_norm(w)) <= est.tol:
            break
    return w.numpy()


def fit_dictionary(x: np.ndarray, s: DictionarySettings) -> Dictionary:
    """The dictionary `s.method` fitted on the hidden states x [units, d]."""
    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    width = s.width or d
    if s.method in ("pca", "ica"):
        width = min(width, d)
    if n < max(2, width if s.method == "pca" else 2):
        raise SamesheepError(
            f"{n} units are too few to fit a {s.method.upper()} dictionary of width {width}"
        )
    shift = x.min(0) if s.method == "nmf" else np.zeros(d, dtype=np.float32)
    if s.method == "pca":
        # the covariance's eigenvectors: one [d, d] matrix, whatever the number of units
        est = PCA(n_components=width, svd_solver="covariance_eigh")
    elif s.method == "ica":
        est = FastICA(
            n_components=width,
            whiten="unit-variance",
            whiten_solver="eigh",
            max_iter=s.max_iter,
            tol=1e-3,
            random_state=s.seed,
        )
    else:
        est = MiniBatchNMF(
            n_components=width,
            batch_size=2048,
            max_iter=s.max_iter,
            transform_max_iter=s.max_iter,
            random_state=s.seed,
        )
    out = Dictionary(s, est, shift.astype(np.float32), np.ones(width, dtype=np.float32), True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        est.fit(out._input(x))
    out.converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if s.method != "nmf":
        codes = out.encode(x)
        centred = codes - codes.mean(0)
        skew = (centred**3).mean(0)
        out.sign = np.where(skew < 0, -1.0, 1.0).astype(np.float32)
    return out
