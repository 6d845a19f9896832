"""Text and tokens: the corpus, the activation store, per-text units, and the alignment
of two tokenizations on the characters they share."""
