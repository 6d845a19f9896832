"""The causal check of matched pairs: each latent's decoder contribution removed (or
amplified) where it fires, in its own model's forward pass, and the effects on the text that
follows compared across the two models."""
