"""PCA, ICA and NMF dictionaries of both models, run through exactly the comparison the SAEs
go through (measure_pair, headline_table), with the same fixed-source floors and ceilings:

- the number: A's dictionary against B's, on the aligned units;
- the floor: against the same dictionary fitted on B's untrained copy;
- the ceiling: against A's dictionary fitted again: ICA with another seed (its unmixing
  starts at random); PCA (which has no seed) and NMF (whose start is the data's SVD, so
  another seed finds the same factors: a ceiling of 1.00 on the default run) on the other
  half of the training documents, where the main fit reads the first half.

Every dictionary is fitted on the training units (at most `fit_units` of them, drawn at
random) at the unit's last token, where the SAE comparison reads its codes, and encodes
every unit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.config import CompareConfig
from ..core.progress import step
from ..data.alignment import Units
from ..sae.dictionaries import DictionarySettings, fit_dictionary
from .pair import headline_table, measure_pair

HALVED = ("pca", "nmf")
"""Methods whose ceiling is a fit on the other half of the training documents (their fit
does not depend on a seed); the others' is a fit with another seed."""


@dataclass(frozen=True)
class FitPlan:
    """Which units the dictionaries are fitted on."""

    fit_units: int
    seed: int


def fit_rows(
    units: Units, n_train_docs: int, plan: FitPlan
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """(the training units, the training units split by document into two halves at random:
    the main fit and the ceiling of the HALVED methods), each at most plan.fit_units, drawn
    at random."""
    rng = np.random.default_rng(plan.seed)
    train = np.flatnonzero(units.doc < n_train_docs)
    docs = np.unique(units.doc[train])
    half = np.zeros(int(docs.max()) + 1 if len(docs) else 0, dtype=bool)
    half[docs[rng.permutation(len(docs))[: len(docs) // 2]]] = True
    second = train[half[units.doc[train]]]
    first = train[~half[units.doc[train]]]

    def cap(rows: np.ndarray) -> np.ndarray:
        if len(rows) <= plan.fit_units:
            return rows
        return np.sort(rng.choice(rows, plan.fit_units, replace=False))

    return cap(train), (cap(first), cap(second))


def dictionary_matrices(
    hidden: dict[str, np.ndarray],
    units: Units,
    n_train_docs: int,
    s: DictionarySettings,
    plan: FitPlan,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """({"a", "b", "fa", "fb", "ca", "cb"}: [units, width] codes of every unit, fit
    details): each role's dictionary fitted on its hidden states `hidden[role]`
    [units, d] and encoding every unit; "ca", "cb" are the ceilings (another seed, or for
    HALVED methods the other half of the training documents, where the main fit reads the
    first)."""
    everything, halves = fit_rows(units, n_train_docs, plan)
    if s.method in HALVED:
        main_rows, ceiling_rows = halves
        ceiling = s
    else:
        main_rows = ceiling_rows = everything
        ceiling = DictionarySettings(s.method, s.width, s.max_iter, s.seed + 1)
    mats: dict[str, np.ndarray] = {}
    details: dict[str, Any] = {"fit_units": len(main_rows), "converged": {}, "width": {}}
    for role in ("a", "b", "fa", "fb", "ca", "cb"):
        source = role[-1] if role.startswith("c") else role
        rows, settings = (ceiling_rows, ceiling) if role.startswith("c") else (main_rows, s)
        with step(f"{s.method.upper()} dictionary of {role}"):
            x = hidden[source]
            d = fit_dictionary(x[rows], settings)
            mats[role] = d.encode(x)  # dense: the comparison takes dense products
        details["converged"][role] = d.converged
        details["width"][role] = d.width
    return mats, details


def compare_dictionary(
    hidden: dict[str, np.ndarray],
    units: Units,
    corpus: tuple[list[str], int],
    cfg: CompareConfig,
    s: DictionarySettings,
    plan: FitPlan,
) -> dict[str, Any]:
    """One method's comparison: the headline table (the answer with its floor, ceiling and
    intervals, as the SAE comparison gives it) and the fit details."""
    start = time.perf_counter()
    mats, details = dictionary_matrices(hidden, units, corpus[1], s, plan)
    fitted = time.perf_counter() - start
    label = f"{s.method.upper()} dictionaries"
    result = measure_pair(mats, units, corpus, cfg, label)
    n_docs = len(np.unique(units.doc))
    numbers = headline_table(result["runs"], result["settings"], n_docs)
    return {
        "method": s.method,
        **details,
        "headline": numbers,
        "seconds": {"fit": fitted, "total": time.perf_counter() - start},
    }
