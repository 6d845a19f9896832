"""Explanations of latents by language models, and scores for every label."""

from .backends import Calls, LocalChat, OpenAIChat, make_backend, parse_judgement
from .scoring import balanced_accuracy
from .stage import interpret_stage

__all__ = [
    "Calls",
    "LocalChat",
    "OpenAIChat",
    "balanced_accuracy",
    "interpret_stage",
    "make_backend",
    "parse_judgement",
]
