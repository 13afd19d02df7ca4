"""Mixer: Value Augmented Sampling as a `transformers.LogitsProcessor`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch
from transformers import LogitsProcessor

from valuemix.heads.bank import ValueBank
from valuemix.heads.head_config import HeadConfig
from valuemix.compose.candidates import CandidateScorer


def coefficient_problem(configs: Mapping[str, HeadConfig], head: str, beta) -> str | None:
    """Why `beta` is not a valid coefficient for `head` (one of `configs`, e.g. `bank.configs`), in words; None if it
    is valid."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        return f"Coefficient for head '{head}' must be a finite number, got {beta!r}."
    low, high = configs[head].beta_range
    if not low <= beta <= high:
        return (f"Coefficient {beta} for head '{head}' is outside its range [{low}, {high}] (its head_config "
                f"beta_range); pick a value inside it, or widen the range: beta_range in the head's head_config.json "
                f"(for a server or app, before it starts), or bank.configs['{head}'].beta_range = (low, high).")
    return None


def read_mix(mix, configs: Mapping[str, HeadConfig], name: str = "weights", where: str = "on this bank") -> dict:
    """{head: β} from a mapping or a JSON object string: every head known, every β valid (numbers as text are read).

    `name` and `where` word the errors ("weights", "in this app"). Raises ValueError naming every problem.
    """
    if isinstance(mix, str):
        try:
            mix = json.loads(mix)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} is not valid JSON ({err.msg}): write an object such as "
                             '{"helpful": 1.5, "concise": -0.5}.') from None
    if not isinstance(mix, Mapping):
        raise ValueError(f"{name} must be an object of head -> coefficient, got {type(mix).__name__}: "
                         'write e.g. {"helpful": 1.5}.')
    problems, weights = [], {}
    for head, beta in mix.items():
        if head not in configs:
            problems.append(f"Unknown head '{head}'. Heads {where}: {', '.join(configs) or 'none'}.")
            continue
        if isinstance(beta, str):
            try:
                beta = float(beta)
            except ValueError:
                pass
        problem = coefficient_problem(configs, head, beta)
        if problem:
            problems.append(problem)
        else:
            weights[head] = float(beta)
    if problems:
        raise ValueError("\n".join(problems))
    return weights


def contributions(values: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Each head's addition to its candidates' scores, β_h·(V_h(s·a) − mean_a' V_h(s·a')).

    values: (heads, batch, k); beta: (heads,), or (heads, batch) when rows have their own coefficients.
    Returns the shape of `values`; its sum over heads is what VAS adds to the candidates' scores.
    """
    beta = beta.to(values.dtype).reshape(*beta.shape, *([1] * (values.dim() - beta.dim())))
    return beta * (values - values.mean(dim=-1, keepdim=True))


class Mixer(LogitsProcessor):
    r"""Steer next-token scores with a weighted mix of value heads (VAS).

    For each row s, take the k highest-scoring tokens a (the candidates), value every candidate with
    every head h that has a non-zero coefficient β_h, centre each head's k values, and add them:

        scores[a] += Σ_h β_h · (V_h(s·a) − mean_{a'} V_h(s·a'))      for a in top-k(scores)

    Tokens outside the top-k are masked to -inf (sampling stays among the valued candidates), or left
    unchanged with `mask_outside_top_k=False`, as in the reference VAS code. With every β_h = 0 the
    output is exactly the base top-k scores. β_h < 0 pushes away from reward h.

    The mixer is a pure function of (input_ids, scores, weights) up to a float tolerance: called cold
    on any input it gives the same candidates, and added values within `compose.candidates.VALUE_ATOL`
    (1e-4) of a warm call inside `generate`. Its KV cache on the value backbone only saves work, and a
    sequence it has not seen starts a new cache; but cached and uncached forwards round differently, so
    the two agree to that tolerance, not bit for bit. It composes with any other
    processor (temperature, top-p, repetition penalty) in `generate`.

    Args:
        bank: the value bank holding the heads.
        weights: head name -> coefficient β (heads left out are 0).
        top_k: number of candidates valued per step.
        mask_outside_top_k: mask tokens outside the top-k (default) or leave them unchanged.
        tokenizer: the base model's tokenizer; if given, it must match the backbone's.
        pad_token_id: the id used for left padding (default: the bank tokenizer's).

    Example:
        >>> mixer = vm.Mixer(bank, {"helpful": 1.5, "concise": -0.5}, top_k=20)
        >>> out = base.generate(**enc, logits_processor=[mixer], do_sample=True, max_new_tokens=64)
        >>> mixer.set_weights({"helpful": 0.0})   # cheap: no reload
    """

    def __init__(self, bank: ValueBank, weights: Mapping[str, float] | None = None, top_k: int = 20,
                 mask_outside_top_k: bool = True, tokenizer=None, pad_token_id: int | None = None):
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer (got {top_k!r}); 20 is the usual choice.")
        bank.check_tokenizer(tokenizer)
        self.bank = bank
        self.top_k = top_k
        self.mask_outside_top_k = mask_outside_top_k
        self.pad_token_id = pad_token_id
        self.weights: dict[str, float] = {}
        self.scorer: CandidateScorer | None = None
        self.set_weights(weights or {})

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Change some heads' coefficients (others keep theirs). Cheap: nothing is reloaded."""
        self.bank.check_heads(list(weights))
        for name, beta in weights.items():
            problem = coefficient_problem(self.bank.configs, name, beta)
            if problem:
                raise ValueError(problem)
        self.weights.update({name: float(beta) for name, beta in weights.items()})

    @property
    def active_heads(self) -> list[str]:
        """Heads with a non-zero coefficient: the only ones the backbone runs."""
        return [h for h in self.bank.heads if self.weights.get(h, 0.0) != 0.0]

    def reset(self) -> None:
        """Forget cached prefixes (never needed for correctness; frees memory between generations)."""
        self.scorer = None

    def _scorer(self, heads: list[str]) -> CandidateScorer:
        if self.scorer is None or self.scorer.heads != heads:
            self.scorer = CandidateScorer(self.bank, heads, self.pad_token_id)
        return self.scorer

    def candidate_values(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        """(candidates (batch, k), their base scores (batch, k), values (n_active, batch, k)) for inspection."""
        top_scores, candidates = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)
        heads = self.active_heads
        values = self._scorer(heads)(input_ids, candidates).to(scores.device) if heads else None
        return candidates, top_scores, values

    def contributions(self, values: torch.Tensor) -> torch.Tensor:
        """Each active head's addition to its candidates' scores, β_h·(V_h(s·a) − mean_a' V_h(s·a')).

        values: (n_active, batch, k) from `candidate_values`; returns the same shape (sum over heads: the shift).
        """
        return contributions(values, torch.tensor([self.weights[h] for h in self.active_heads], device=values.device))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        candidates, top_scores, values = self.candidate_values(input_ids, scores)
        if values is not None:
            top_scores = top_scores + self.contributions(values).sum(0).to(scores.dtype)
        return self._place(scores, candidates, top_scores)

    def reference(self, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The mixer's output with every β = 0: the base scores truncated to the top-k (π_ref)."""
        top_scores, candidates = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)
        return self._place(scores, candidates, top_scores)

    def _place(self, scores, candidates, top_scores):
        out = torch.full_like(scores, -math.inf) if self.mask_outside_top_k else scores.clone()
        return out.scatter_(-1, candidates, top_scores)
