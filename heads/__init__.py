"""valuemix.heads: the value bank, head files, TD(λ) training, base sampling and rewards."""
