"""valuemix.heads (folder heads/), the bottom layer: the value bank, head files and the Hub, TD(λ) training,
base sampling and rewards, with the loading, tokens, fingerprint, process and atomic-write helpers they share."""
