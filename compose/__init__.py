"""valuemix.compose: the mixer, candidate scoring, the generate loop and KL accounting."""
