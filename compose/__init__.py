"""valuemix.compose (folder compose/), on top of heads/: the mixer, candidate scoring, the generate loop with KL,
evaluation against Best-of-N and its report, the sample→score→train→eval→push pipeline, and serving: the vLLM
logits processor and a client for a served model."""
