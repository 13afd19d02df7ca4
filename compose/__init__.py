"""valuemix.compose (folder compose/), on top of heads/: the mixer, candidate scoring, the generate loop with KL,
evaluation against Best-of-N and its report, and the sample→score→train→eval→push pipeline."""
