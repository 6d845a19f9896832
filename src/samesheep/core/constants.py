"""Names every package agrees on: model-source prefixes, architectures, units, file names."""

from __future__ import annotations

RANDOM_PREFIX = "random:"
"""A model source with this prefix is the model's untrained copy (same architecture and
tokenizer, freshly initialised weights)."""

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
"""The SAE architectures train.architecture accepts."""

UNITS = ("token", "text-last", "text-mean")
"""What one row of a comparison is: a token (aligned across tokenizers), or one vector per
text (its last real token, or the mean over its real tokens)."""

SPLITS = ("train", "heldout")
"""The corpus splits, in the order documents are numbered across them."""

SUMMARY = "summary.json"
"""The file a stage writes last in a folder: its presence (with the right key) marks the
folder done."""

DICTIONARY_METHODS = ("pca", "ica", "nmf")
"""The dictionaries that are not SAEs (`samesheep dictionaries`)."""

DICTIONARIES = "dictionaries.json"
"""Beside a comparison's summary: the same comparison of PCA, ICA and NMF dictionaries
(`samesheep dictionaries`; its done marker)."""

CROSSCODER = "crosscoder.json"
"""Beside a comparison's summary: the crosscoder's shared and model-specific latents against
their floor and ceiling (`samesheep crosscode`; its done marker)."""
