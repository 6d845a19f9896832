"""Sparse autoencoders: the architectures, training, evaluation (CE/KL with the SAE
spliced in), SAELens files, sparse codes and the train stage."""
