"""Offline statistical labels: the terms that set a latent's firing apart from the corpus,
by log-odds with an informative Dirichlet prior (Monroe, Colaresi and Quinn 2008, "Fightin'
Words"), with its dominant topic and titles."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PRIOR_STRENGTH = 1000.0
"""alpha_0: pseudo-counts of the prior, spread over terms by their corpus frequency."""
MIN_Z = 3.0
"""Terms whose z-score is below this are not distinctive enough for a label."""
MIN_COUNT = 2
"""Terms seen fewer times where the latent fires are not used (one firing proves little)."""
MIN_TOPIC_LIFT = 1.5
"""A topic joins the label when the latent's share of mass in it is at least this many
times the topic's share of the corpus."""


def log_odds_z(
    fore: np.ndarray,
    back: np.ndarray,
    fore_total: float,
    back_total: float,
    prior_strength: float = PRIOR_STRENGTH,
) -> np.ndarray:
    """z-scores of the log-odds ratio of each term between a foreground (counts `fore`,
    `fore_total` in all) and a background (`back`, `back_total`; the rest of the corpus),
    with the informative Dirichlet prior alpha_w = prior_strength * (fore_w + back_w) /
    (fore_total + back_total) (Monroe et al. 2008, eq. 16-22). Positive: more frequent where
    the latent fires."""
    fore = np.asarray(fore, dtype=np.float64)
    back = np.asarray(back, dtype=np.float64)
    total = fore_total + back_total
    alpha = prior_strength * (fore + back) / max(total, 1.0)
    a0 = prior_strength
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.log((fore + alpha) / (fore_total + a0 - fore - alpha)) - np.log(
            (back + alpha) / (back_total + a0 - back - alpha)
        )
        var = 1.0 / (fore + alpha) + 1.0 / (back + alpha)
        z = delta / np.sqrt(var)
    return np.where(np.isfinite(z), z, 0.0)


@dataclass(frozen=True)
class TermLimits:
    """Which of a latent's terms a label may use: at most `n`, each seen at least
    `min_count` times where the latent fires, with a z-score of at least `min_z`."""

    n: int = 5
    min_count: int = MIN_COUNT
    min_z: float = MIN_Z


def top_terms(
    keys: np.ndarray,
    fore: np.ndarray,
    corpus: np.ndarray,
    fore_total: float,
    corpus_total: float,
    limits: TermLimits = TermLimits(),
) -> list[tuple[int, float]]:
    """The limits.n most distinctive (key, z) of a latent's terms, most distinctive first:
    keys [terms] with the latent's counts `fore` and the corpus counts `corpus` of the same
    terms (the corpus includes the foreground; it is subtracted here)."""
    fore = np.asarray(fore, dtype=np.float64)
    back = np.maximum(np.asarray(corpus, dtype=np.float64) - fore, 0.0)
    z = log_odds_z(fore, back, fore_total, max(corpus_total - fore_total, 0.0))
    ok = (fore >= limits.min_count) & (z >= limits.min_z)
    order = np.argsort(-z[ok], kind="stable")[: limits.n]
    return [(int(k), float(v)) for k, v in zip(keys[ok][order], z[ok][order], strict=True)]


def term_text(text: str) -> str:
    """A token or n-gram as a label shows it: outer whitespace dropped, invisible ones named."""
    stripped = text.strip()
    if stripped:
        return stripped
    return {"\n": "\\n", "\t": "\\t", " ": "␠"}.get(text[:1], repr(text))


def format_label(terms: list[str], topic: str | None, titles: list[str]) -> str:
    """'"Paris" · "French" | Geography | France, Paris, Lyon': distinctive terms, the topic
    (where associated), the titles it fires on most. Parts with nothing to say are left out."""
    parts = []
    if terms:
        parts.append(" · ".join(f'"{t}"' for t in terms))
    if topic:
        parts.append(topic)
    if titles:
        parts.append(", ".join(titles))
    return " | ".join(parts)


def lift(share: float, base_share: float) -> float:
    """How many times more of a latent's mass falls in a group than the group's share of the
    corpus (nan where the group is absent from the corpus)."""
    return share / base_share if base_share > 0 else math.nan
