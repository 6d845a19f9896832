"""Layer by layer, on raw hidden states: similarity metrics (CKA, input-debiased CKA,
kNN, SVCCA) and the layers stage."""
