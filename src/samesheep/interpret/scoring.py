"""Scores of a label on examples the explainer never saw, as delphi scores explanations:

    detection   given the label, can a scorer tell windows where the latent fires from
                windows where it does not? (balanced accuracy over both kinds)
    fuzzing     given the label, can it tell windows whose marked tokens are the ones that
                fire from the same windows with as many other tokens marked?

Balanced accuracy is 0.5 for a scorer that cannot tell (or always says yes), 1 for one that
always can. The same questions score every label (a language model's, the statistical one,
a user's, and another latent's as the baseline), so the scores compare labels, not
labellers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .backends import Request
from .prompts import Example, detection_messages, fuzzing_messages


def balanced_accuracy(truth: Sequence[bool], said: Sequence[bool]) -> float:
    """The mean of the true-positive and true-negative rates; nan without both kinds."""
    t = np.asarray(truth, dtype=bool)
    s = np.asarray(said, dtype=bool)
    if not t.any() or t.all():
        return math.nan
    return 0.5 * (float(s[t].mean()) + float((~s[~t]).mean()))


@dataclass
class ScoreSet:
    """The windows a latent's labels are scored on: where it fires (never shown to the
    explainer) and where it does not."""

    active: list[Example]
    inactive: list[Example]


@dataclass
class Questions:
    """The judgements one score needs, and the right answer to each."""

    requests: list[Request]
    truth: list[bool]

    def score(self, answers: Sequence[bool]) -> float:
        return balanced_accuracy(self.truth, answers)


def detection(label: str, s: ScoreSet) -> Questions:
    """Each active and inactive window, unmarked: does the label apply?"""
    windows = [(e, True) for e in s.active] + [(e, False) for e in s.inactive]
    return Questions(
        [Request.of(detection_messages(label, e)) for e, _ in windows], [t for _, t in windows]
    )


def fuzzing(label: str, s: ScoreSet, rng: np.random.Generator) -> Questions:
    """Each active window twice: its firing tokens marked (right), and as many tokens drawn
    from the others marked (wrong): are the marked tokens what the label is about?"""
    requests, truth = [], []
    for e in s.active:
        right = e.firing()
        n, others = int(right.sum()), np.flatnonzero(~right)
        if n == 0 or len(others) < n:
            continue
        wrong = np.zeros_like(right)
        wrong[rng.choice(others, n, replace=False)] = True
        requests += [Request.of(fuzzing_messages(label, e.marked(m))) for m in (right, wrong)]
        truth += [True, False]
    return Questions(requests, truth)
