"""What each latent responds to: statistics, exemplars, logit lens, labels, embeddings
and the features stage."""
