"""Value mixing inside vLLM: a V1 logits processor that steers each request by its own coefficients.

    VALUEMIX_BACKBONE=HuggingFaceTB/SmolLM2-135M-Instruct VALUEMIX_HEADS=runs/heads/concise,alice/vm-polite \\
        vllm serve HuggingFaceTB/SmolLM2-135M-Instruct \\
        --logits-processors valuemix.compose.vllm_processor:ValuemixLogitsProcessor

    client.chat.completions.create(model=..., messages=[...],
                                   extra_body={"vllm_xargs": {"valuemix": json.dumps({"concise": 2.0})}})

The engine loads the value bank once, from environment variables (vLLM builds its processors itself,
in its engine process, with no arguments of ours):

    VALUEMIX_BACKBONE    the value backbone: a folder or Hub id (required)
    VALUEMIX_HEADS       head folders or Hub ids, separated by commas (required)
    VALUEMIX_NUM_LAYERS  use only the backbone's first N decoder layers (as the heads' cards say)
    VALUEMIX_TOP_K       candidates valued per step unless a request asks otherwise (default 20)

A request asks for a mix under the key "valuemix" of its `SamplingParams.extra_args`: a mapping
{head: β} or the same as a JSON string (the OpenAI API's `vllm_xargs` values are flat), plus
optionally "valuemix_top_k". Requests without a mix, or whose every β is 0, are not touched.
A bad mix is refused in `validate_params` with the Mixer's own message, which the server returns
as HTTP 400. Each step, the candidates of every mixed request and all their heads are valued in one
backbone forward (the Mixer's `CandidateScorer`); its cache lives while the batch keeps the same
requests in the same rows, and is rebuilt from the prompts when it changes.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from valuemix.compose.candidates import CandidateScorer
from valuemix.compose.mixer import contributions, read_mix
from valuemix.heads.bank import ValueBank
from valuemix.heads.files import read_head_config

MIX_KEY, TOP_K_KEY = "valuemix", "valuemix_top_k"
ENV_BACKBONE, ENV_HEADS = "VALUEMIX_BACKBONE", "VALUEMIX_HEADS"
ENV_NUM_LAYERS, ENV_TOP_K = "VALUEMIX_NUM_LAYERS", "VALUEMIX_TOP_K"


@dataclass
class RequestMix:
    """One request's mix: its non-zero coefficients, its candidate count and its tokens (a live list)."""

    weights: dict[str, float]
    top_k: int
    prompt_ids: list[int]
    output_ids: list[int]


def engine_settings() -> tuple[str, list[str], int | None, int]:
    """(backbone, head sources, num_layers, default top-k) from the environment; a ValueError says what is missing."""
    backbone, heads = os.environ.get(ENV_BACKBONE, "").strip(), os.environ.get(ENV_HEADS, "").strip()
    if not backbone or not heads:
        raise ValueError(f"The valuemix logits processor needs {ENV_BACKBONE} (the value backbone) and {ENV_HEADS} "
                         "(head folders or Hub ids, comma-separated) in the environment of the vLLM server.")
    layers = os.environ.get(ENV_NUM_LAYERS, "").strip()
    return backbone, [h.strip() for h in heads.split(",") if h.strip()], int(layers) if layers else None, \
        int(os.environ.get(ENV_TOP_K, "20"))


@functools.cache
def head_configs(sources: tuple[str, ...]) -> dict:
    """{head name: HeadConfig} of the engine's heads, read from their head_config.json only (no weights)."""
    configs = {}
    for source in sources:
        config = read_head_config(source)
        configs[config.name] = config
    return configs


def parse_mix(params: SamplingParams, configs: Mapping, default_top_k: int) -> RequestMix | None:
    """The request's mix from `params.extra_args` (None when it asks for none, or every β is 0).

    Raises ValueError naming the problem and the fix: not a mapping, unknown head, a β that is not a finite
    number or is outside the head's range, a top-k that is not a positive whole number.
    """
    extra = params.extra_args or {}
    if MIX_KEY not in extra:
        return None
    weights = read_mix(extra[MIX_KEY], configs, f'"{MIX_KEY}"', "on this server")
    top_k = extra.get(TOP_K_KEY, default_top_k)
    if isinstance(top_k, str) and top_k.strip().isdigit():
        top_k = int(top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f'"{TOP_K_KEY}" must be a positive whole number (got {top_k!r}); 20 is the usual choice.')
    weights = {h: b for h, b in weights.items() if b != 0.0}
    return RequestMix(weights, top_k, [], []) if weights else None


class ValuemixLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor: VAS with each request's own coefficients (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        _, heads, _, top_k = engine_settings()
        parse_mix(sampling_params, head_configs(tuple(heads)), top_k)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        backbone, heads, num_layers, self.default_top_k = engine_settings()
        self.bank = ValueBank(backbone, num_layers=num_layers, device=device)
        self.bank.load_head(heads)
        self.requests: dict[int, RequestMix] = {}  # batch row -> its mix
        self.scorers: dict[tuple, CandidateScorer] = {}  # (top_k, heads) -> the scorer of those rows

    def is_argmax_invariant(self) -> bool:
        return False  # values can change the most likely token

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            mix = parse_mix(params, self.bank.configs, self.default_top_k)
            if mix is None:
                self.requests.pop(index, None)
            else:
                mix.prompt_ids, mix.output_ids = list(prompt_ids or []), output_ids
                self.requests[index] = mix
        for a, b, direction in batch_update.moved:
            moved, other = self.requests.pop(a, None), self.requests.pop(b, None)
            if moved is not None:
                self.requests[b] = moved
            if other is not None and direction == MoveDirectionality.SWAP:
                self.requests[a] = other

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        groups: dict[tuple, list[int]] = {}
        for row, mix in sorted(self.requests.items()):
            groups.setdefault((mix.top_k, tuple(h for h in self.bank.heads if h in mix.weights)), []).append(row)
        for key, rows in groups.items():
            logits[rows] = self._mixed(key, rows, logits[rows])
        self.scorers = {key: scorer for key, scorer in self.scorers.items() if key in groups}
        return logits

    def _mixed(self, key: tuple, rows: list[int], scores: torch.Tensor) -> torch.Tensor:
        """The rows' scores with VAS applied: top-k kept and shifted by Σ_h β_h (V_h − mean V_h), the rest -inf."""
        top_k, heads = key
        scorer = self.scorers.get(key)
        if scorer is None:
            scorer = self.scorers[key] = CandidateScorer(self.bank, list(heads))
        sequences = [self.requests[r].prompt_ids + list(self.requests[r].output_ids) for r in rows]
        width = max(len(s) for s in sequences)
        pad = scorer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences])
        top_scores, candidates = scores.float().topk(min(top_k, scores.shape[-1]), dim=-1)
        values = scorer(input_ids, candidates).to(scores.device)  # (heads, rows, k)
        beta = torch.tensor([[self.requests[r].weights[h] for r in rows] for h in heads], device=scores.device)
        shift = contributions(values, beta).sum(0)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(-1, candidates, (top_scores + shift).to(scores.dtype))
