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
    VALUEMIX_TOP_P       the nucleus inside the top-k unless a request asks otherwise (default 1: all k)

A request asks for a mix under the key "valuemix" of its `SamplingParams.extra_args`: a mapping
{head: β} or the same as a JSON string (the OpenAI API's `vllm_xargs` values are flat), plus
optionally "valuemix_top_k" and "valuemix_top_p" (as `Mixer`'s top_k and top_p: a step whose every
mixed request has a one-token set runs no value forward). Requests without a mix, or whose every β
is 0, are not touched.
A bad mix is refused in `validate_params` with the Mixer's own message, which the server returns
as HTTP 400.

A backbone with another tokenizer than the served model's takes cross-tokenizer heads (trained with
`train_head(..., base_tokenizer=...)` or `valuemix train`): each request's text and candidates are valued
as the backbone tokenizes them, as `Mixer(bank, weights, tokenizer=base_tokenizer)` does
(`compose.cross_tokenizer`); a request's cache rows hold its text's backbone tokens and take back those a
new token retokenizes. The engine refuses to start with heads made for the backbone's own tokenizer.

Speed and memory. Each engine step values the candidates of every mixed request under all its heads
in one value-backbone forward (requests with other heads or another top-k included; a step where
requests join adds one forward that reads their prompts). The processor keeps one KV cache on the
value backbone (`compose.candidates.RowCache`) with a row per (request, head): a request's rows stay
with it when vLLM moves it to another batch slot, are dropped when it finishes or is aborted, and a
request that joins is read once and appended. Rows are left padded to the longest live request, and
padding columns no live row needs are dropped, so the cache holds at most
    (mixed requests × their heads) × (longest live request) × 2 × layers × kv_heads × head_dim × bytes
of the value backbone: for SmolLM2-135M in float32, 45 KiB per row and token; the engine logs the
bound for its `max_num_seqs` and `max_model_len` at start. Shared-trunk heads of one request share
their lower layers' rows (`ValueBank.trunk_plan`), so they take less, and their trunk runs once.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from valuemix.compose.candidates import RowCache
from valuemix.compose.cross_tokenizer import candidate_texts, text_branches
from valuemix.compose.mixer import DEFAULT_TOP_P, check_cross_tokenizer_heads, check_top_p, contributions, read_mix
from valuemix.heads.bank import ValueBank
from valuemix.heads.files import read_head_config
from valuemix.heads.tokens import common_length, left_padded

MIX_KEY, TOP_K_KEY, TOP_P_KEY = "valuemix", "valuemix_top_k", "valuemix_top_p"
ENV_BACKBONE, ENV_HEADS = "VALUEMIX_BACKBONE", "VALUEMIX_HEADS"
ENV_NUM_LAYERS, ENV_TOP_K, ENV_TOP_P = "VALUEMIX_NUM_LAYERS", "VALUEMIX_TOP_K", "VALUEMIX_TOP_P"

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class RequestMix:
    """One request's mix: its non-zero coefficients, its candidate count, its tokens (output_ids is vLLM's live
    list) and how many of them its cache rows hold (with a backbone of another tokenizer: which backbone tokens)."""

    weights: dict[str, float]
    top_k: int
    top_p: float = DEFAULT_TOP_P
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    fed: int = 0
    held: list[int] = field(default_factory=list)

    def tokens(self) -> list[int]:
        return self.prompt_ids + list(self.output_ids)


def engine_settings() -> tuple[str, list[str], int | None, int, float]:
    """(backbone, head sources, num_layers, default top-k, default top-p) from the environment; a ValueError says
    what is missing."""
    backbone, heads = os.environ.get(ENV_BACKBONE, "").strip(), os.environ.get(ENV_HEADS, "").strip()
    if not backbone or not heads:
        raise ValueError(f"The valuemix logits processor needs {ENV_BACKBONE} (the value backbone) and {ENV_HEADS} "
                         "(head folders or Hub ids, comma-separated) in the environment of the vLLM server.")
    layers = os.environ.get(ENV_NUM_LAYERS, "").strip()
    return backbone, [h.strip() for h in heads.split(",") if h.strip()], int(layers) if layers else None, \
        int(os.environ.get(ENV_TOP_K, "20")), float(os.environ.get(ENV_TOP_P, str(DEFAULT_TOP_P)))


@functools.cache
def head_configs(sources: tuple[str, ...]) -> dict:
    """{head name: HeadConfig} of the engine's heads, read from their head_config.json only (no weights)."""
    configs = {}
    for source in sources:
        config = read_head_config(source)
        configs[config.name] = config
    return configs


def parse_mix(params: SamplingParams, configs: Mapping, default_top_k: int,
              default_top_p: float = DEFAULT_TOP_P) -> RequestMix | None:
    """The request's mix from `params.extra_args` (None when it asks for none, or every β is 0).

    Raises ValueError naming the problem and the fix: not a mapping, unknown head, a β that is not a finite
    number or is outside the head's range, a top-k that is not a positive whole number, a top-p outside (0, 1].
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
    top_p = extra.get(TOP_P_KEY, default_top_p)
    try:
        check_top_p(float(top_p) if isinstance(top_p, str) else top_p)
    except ValueError as err:
        raise ValueError(f'"{TOP_P_KEY}": {err}') from None
    weights = {h: b for h, b in weights.items() if b != 0.0}
    return RequestMix(weights, top_k, float(top_p)) if weights else None


class ValuemixLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor: VAS with each request's own coefficients (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        _, heads, _, top_k, top_p = engine_settings()
        parse_mix(sampling_params, head_configs(tuple(heads)), top_k, top_p)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        backbone, heads, num_layers, self.default_top_k, self.default_top_p = engine_settings()
        self.bank = ValueBank(backbone, num_layers=num_layers, device=device)
        self.bank.load_head(heads)
        served = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
        self.base_tokenizer = None if self.bank.same_tokenizer(served) else served  # candidates valued as text
        if self.base_tokenizer is not None:
            check_cross_tokenizer_heads(self.bank.configs.values(), served)
        self.requests: dict[int, RequestMix] = {}  # batch slot -> its mix
        self.rows = RowCache(self.bank, [])
        self.owners: list[RequestMix] = []  # cache row -> the request it belongs to
        logger.info("valuemix: %d heads (%s); value caches take at most %.2f GiB", len(self.bank.heads),
                    ", ".join(self.bank.heads), self.cache_bound(vllm_config) / 2**30)

    def cache_bound(self, vllm_config) -> int:
        """Bytes of the value cache when every slot is mixed with every head and as long as the model allows."""
        config = self.bank.decoder.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * self.bank.decoder.dtype.itemsize
        return (vllm_config.scheduler_config.max_num_seqs * len(self.bank.heads)
                * vllm_config.model_config.max_model_len * per_token)

    def is_argmax_invariant(self) -> bool:
        return False  # values can change the most likely token

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            mix = parse_mix(params, self.bank.configs, self.default_top_k, self.default_top_p)
            if mix is None:
                self.requests.pop(index, None)
            else:
                mix.prompt_ids, mix.output_ids = list(prompt_ids or []), output_ids
                self.requests[index] = mix
        for a, b, direction in batch_update.moved:  # the cache rows belong to the request, not to its slot
            moved, other = self.requests.pop(a, None), self.requests.pop(b, None)
            if moved is not None:
                self.requests[b] = moved
            if other is not None and direction == MoveDirectionality.SWAP:
                self.requests[a] = other

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        live = set(self.requests.values())
        if not set(self.owners) <= live:  # finished, aborted or preempted requests free their rows
            self.rows.select([i for i, owner in enumerate(self.owners) if owner in live])
            self.owners = [owner for owner in self.owners if owner in live]
        if not self.requests:
            return logits
        slots, mixes = zip(*sorted(self.requests.items()))
        position = {mix: i for i, mix in enumerate(mixes)}
        top_k = torch.tensor([mix.top_k for mix in mixes], device=logits.device)
        top_p = torch.tensor([mix.top_p for mix in mixes], device=logits.device)
        # every request's candidates at the largest top-k asked; a request's own are a leading part of them: its
        # top_k, and of those the smallest set whose base probability reaches its top_p (as `mixer.nucleus`)
        scores = logits[list(slots)].float()
        top_scores, candidates = scores.topk(min(int(top_k.max()), logits.shape[-1]), dim=-1)
        own = torch.arange(candidates.shape[1], device=logits.device) < top_k[:, None]
        probs = (top_scores - torch.logsumexp(scores, dim=-1, keepdim=True)).exp()
        own &= (probs.cumsum(-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1)
        mixed = top_scores
        if int(own.sum(-1).max()) > 1:  # else every set is one token: nothing to value (fed with the next forward)
            values = self._values(candidates, position).to(logits.device)  # (cache rows, k), rows as self.owners
            row_request = torch.tensor([position[owner] for owner in self.owners], device=logits.device)
            row_beta = torch.tensor([owner.weights[h] for owner, h in zip(self.owners, self.rows.row_heads)],
                                    device=logits.device)
            shift = torch.zeros_like(top_scores).index_add_(0, row_request, contributions(
                values[None], row_beta[None], own[row_request])[0])
            mixed = top_scores + shift
        mixed = mixed.masked_fill(~own, -math.inf)
        out = torch.full((len(slots), logits.shape[-1]), -math.inf, device=logits.device)
        logits[list(slots)] = out.scatter_(-1, candidates, mixed).to(logits.dtype)
        return logits

    # -------------------------------------------------------------- internals
    def _values(self, candidates: torch.Tensor, position: dict) -> torch.Tensor:
        """Values of each cache row's candidates (its request's row of `candidates`), rows in the order of
        `self.owners` once this step's joiners are appended: the cached rows in one forward, joiners in another."""
        wanted, branches, branch_real, branch_start = self._branches(candidates, list(position))
        values = []
        if self.owners:
            fresh = {mix: self._fresh(mix, wanted) for mix in self.owners}  # each request's tokens since last step
            if any(kept < mix.fed for mix, (kept, _) in fresh.items()):  # retokenized: take back from where they differ
                self.rows.truncate(torch.tensor([fresh[owner][0] for owner in self.owners]))
            tokens, real = self._left_padded([fresh[owner][1] for owner in self.owners])
            rows = torch.tensor([position[owner] for owner in self.owners], device=candidates.device)
            values.append(self.rows.score(tokens, real, *self._rows_of(rows, branches, branch_real, branch_start)))
            for mix, (kept, new_tokens) in fresh.items():
                self._held(mix, kept + len(new_tokens), wanted)
        joiners = {mix: self._fresh(mix, wanted)[1] for mix in position if mix not in set(self.owners)}
        if joiners:
            owners = [(mix, h) for mix in joiners for h in self.bank.heads if h in mix.weights]
            joined = RowCache(self.bank, [h for _, h in owners], [mix for mix, _ in owners])  # heads share trunks
            tokens, real = self._left_padded([joiners[mix] for mix, _ in owners])
            rows = torch.tensor([position[mix] for mix, _ in owners], device=candidates.device)
            values.append(joined.score(tokens, real, *self._rows_of(rows, branches, branch_real, branch_start)))
            for mix, new_tokens in joiners.items():
                self._held(mix, len(new_tokens), wanted)
            self.rows.extend(joined)
            self.owners += [mix for mix, _ in owners]
        return torch.cat(values)

    def _branches(self, candidates: torch.Tensor, mixes: list[RequestMix]):
        """(per request the backbone tokens to hold, or None when they are its own tokens; the branches valued after
        them: `candidates` or (requests, k, w) retokenized tails; their real mask and how many held tokens each
        follows, or None)."""
        if self.base_tokenizer is None:
            return None, candidates, None, None
        texts = candidate_texts(self.bank.tokenizer, self.base_tokenizer, [mix.tokens() for mix in mixes],
                                candidates.cpu())
        prefixes, *branches = text_branches(*texts, self.bank.tokenizer.pad_token_id or 0)
        return dict(zip(mixes, prefixes)), *(b.to(candidates.device) for b in branches)

    @staticmethod
    def _rows_of(rows: torch.Tensor, *branches) -> list:
        """The branches of the requests of some cache rows (None stays None)."""
        return [None if b is None else b[rows] for b in branches]

    def _fresh(self, mix: RequestMix, wanted: dict | None) -> tuple[int, list[int]]:
        """(how many tokens the request's rows keep, the tokens to feed them next)."""
        if wanted is None:
            return mix.fed, mix.tokens()[mix.fed:]
        kept = common_length(mix.held, wanted[mix])
        return kept, wanted[mix][kept:]

    @staticmethod
    def _held(mix: RequestMix, fed: int, wanted: dict | None) -> None:
        mix.fed = fed
        if wanted is not None:
            mix.held = wanted[mix]

    def _left_padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, real) of ragged sequences, left padded to the longest, on the bank's device."""
        tokens, real = left_padded(sequences, self.bank.tokenizer.pad_token_id or 0)
        return tokens.to(self.bank.device), real.to(self.bank.device)
