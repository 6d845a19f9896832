"""What the explainer and the scorer are asked, in the manner of OpenAI's automated
interpretability and EleutherAI's delphi: exemplar windows with the firing tokens marked
<<like this>> (and, for the explainer, their activations on a 0-10 scale), one question
per judgement."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends import Message

MARK_OPEN, MARK_CLOSE = "<<", ">>"
FIRING = 0.25
"""A token counts as firing in a window when its activation reaches this share of the
window's largest (the tokens the explainer sees marked, and fuzzing's true marks)."""


@dataclass
class Example:
    """One exemplar window: its text, each token's span in it and activation."""

    text: str
    starts: np.ndarray  # [tokens] int
    ends: np.ndarray  # [tokens] int
    acts: np.ndarray  # [tokens] float
    value: float  # the latent's activation at the window's centre token (0: not firing)

    def firing(self, share: float = FIRING) -> np.ndarray:
        """[tokens] bool: the tokens whose activation reaches `share` of the window's peak."""
        peak = float(self.acts.max()) if len(self.acts) else 0.0
        if peak <= 0:
            return np.zeros(len(self.acts), dtype=bool)
        return self.acts >= share * peak

    def clipped(self, max_chars: int = 600) -> Example:
        """The window cut to about max_chars characters around its strongest token (a
        per-text exemplar is a whole document; a prompt must stay short)."""
        if len(self.text) <= max_chars:
            return self
        peak = int(np.argmax(self.acts)) if len(self.acts) else 0
        mid = (int(self.starts[peak]) + int(self.ends[peak])) // 2 if len(self.starts) else 0
        lo = max(0, min(mid - max_chars // 2, len(self.text) - max_chars))
        hi = lo + max_chars
        inside = (self.starts >= lo) & (self.ends <= hi)
        starts, ends = self.starts[inside] - lo, self.ends[inside] - lo
        return Example(self.text[lo:hi], starts, ends, self.acts[inside], self.value)

    def marked(self, which: np.ndarray, scale: float | None = None) -> str:
        """The text with the tokens `which` marked (and, given `scale`, each marked token's
        activation as an integer 0-10 of scale); overlapping byte pieces are marked once."""
        out, at = [], 0
        for i in np.flatnonzero(which):
            lo, hi = int(self.starts[i]), int(self.ends[i])
            if lo < at or hi <= lo:
                continue
            out.append(self.text[at:lo])
            tag = f" ({round(10 * float(self.acts[i]) / scale)})" if scale else ""
            out.append(f"{MARK_OPEN}{self.text[lo:hi]}{MARK_CLOSE}{tag}")
            at = hi
        out.append(self.text[at:])
        return "".join(out)


EXPLAIN_SYSTEM = (
    "You are studying one feature of a language model's internal activations. Below are text "
    f"excerpts; the tokens where the feature fires are marked {MARK_OPEN}like this{MARK_CLOSE}, "
    "with the strength of firing from 0 to 10. Say in one short phrase (at most 12 words) what "
    "the feature responds to. Answer with the phrase only."
)


def explain_messages(examples: list[Example]) -> list[Message]:
    """The explainer's question: the windows, firing tokens marked with their strength."""
    scale = max((float(e.acts.max()) for e in examples if len(e.acts)), default=1.0) or 1.0
    lines = [
        f"Excerpt {n}: {' '.join(e.marked(e.firing(), scale).split())}"
        for n, e in enumerate(examples, start=1)
    ]
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": "\n".join(lines) + "\n\nThe feature responds to:"},
    ]


def clean_explanation(text: str, limit: int = 200) -> str:
    """The first non-empty line of a reply, without quotes, list marks or a lead-in."""
    for line in text.splitlines():
        line = line.strip().strip("\"'`*-• ").strip()
        for lead in ("The feature responds to:", "The feature responds to", "Answer:"):
            if line.lower().startswith(lead.lower()):
                line = line[len(lead) :].strip(" :")
        if line:
            return line[:limit]
    return ""


DETECT_SYSTEM = (
    "You check whether a description of a language-model feature applies to a text excerpt. "
    "Answer yes or no."
)
FUZZ_SYSTEM = (
    "You check whether the marked tokens in a text excerpt are what a description of a "
    "language-model feature is about. Answer yes or no."
)


def detection_messages(label: str, example: Example) -> list[Message]:
    """Does the label apply to this (unmarked) window? (detection)"""
    text = " ".join(example.text.split())
    question = "Does the description apply to the excerpt? Answer yes or no."
    return [
        {"role": "system", "content": DETECT_SYSTEM},
        {"role": "user", "content": f"Description: {label}\nExcerpt: {text}\n{question}"},
    ]


def fuzzing_messages(label: str, marked_text: str) -> list[Message]:
    """Are the marked tokens what the label is about? (fuzzing)"""
    text = " ".join(marked_text.split())
    question = (
        f"Are the tokens marked {MARK_OPEN}like this{MARK_CLOSE} what the description is "
        "about? Answer yes or no."
    )
    return [
        {"role": "system", "content": FUZZ_SYSTEM},
        {"role": "user", "content": f"Description: {label}\nExcerpt: {text}\n{question}"},
    ]
