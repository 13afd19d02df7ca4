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
from valuemix.compose.cross_tokenizer import CrossTokenizerScorer
from valuemix.heads.fingerprint import describe_tokenizer, tokenizer_fingerprint


# The nucleus inside the top-k by default. On the demo world (python -m valuemix.bench --demo; valuemix eval
# --top-p P) 0.99 kept every head's reward at its working β within one standard error of the full top-k,
# 0.95 and below lost reward (concise most), and 0.99 decodes one head at batch 1 faster than the full top-k.
DEFAULT_TOP_P = 0.99


def check_top_p(top_p) -> None:
    """Refuse a top_p outside (0, 1]."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (got {top_p!r}): 1.0 values all top_k candidates, 0.9 "
                         "only the smallest leading set of them that holds 90% of the base probability.")


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


def contributions(values: torch.Tensor, beta: torch.Tensor, in_set: torch.Tensor | None = None) -> torch.Tensor:
    """Each head's addition to its candidates' scores, β_h·(V_h(s·a) − mean_a' V_h(s·a')).

    values: (heads, batch, k); beta: (heads,), or (heads, batch) when rows have their own coefficients.
    in_set: (batch, k), True for the candidates of each row's set (the mean runs over them; the others get 0).
    Returns the shape of `values`; its sum over heads is what VAS adds to the candidates' scores.
    """
    beta = beta.to(values.dtype).reshape(*beta.shape, *([1] * (values.dim() - beta.dim())))
    if in_set is None:
        return beta * (values - values.mean(dim=-1, keepdim=True))
    weight = in_set.to(values.dtype)
    mean = (values * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True)
    return beta * (values - mean) * weight


def nucleus(scores: torch.Tensor, top_scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """(batch, k) bool over the sorted top-k: the smallest leading set whose base probability (softmax of
    `scores` over the whole vocabulary) reaches `top_p`, capped at the k; all k for top_p = 1."""
    if top_p >= 1.0:
        return torch.ones_like(top_scores, dtype=torch.bool)
    probs = (top_scores.float() - torch.logsumexp(scores.float(), dim=-1, keepdim=True)).exp()
    return probs.cumsum(-1) - probs < top_p  # the mass before a candidate is still short of top_p


def cross_tokenizer_problem(config, base_tokenizer) -> str | None:
    """Why a head (its `HeadConfig`) cannot value text for a base of another tokenizer than the backbone's; None if
    it can (it was trained on a base's samples retokenized as text)."""
    if config.base_tokenizer is None:
        return (f"Head '{config.name}' was made for bases with the backbone's own tokenizer, not for "
                f"{describe_tokenizer(base_tokenizer)}: train a cross-tokenizer head on this base's samples with "
                "train_head(bank, name, samples, reward, base_tokenizer=base_tokenizer) or `valuemix train`.")
    return None


def check_cross_tokenizer_heads(configs, base_tokenizer) -> None:
    """Refuse, naming every one, heads (`HeadConfig`s) that cannot value text for a base of another tokenizer."""
    problems = [problem for config in configs if (problem := cross_tokenizer_problem(config, base_tokenizer))]
    if problems:
        raise ValueError(" ".join(problems))


class Mixer(LogitsProcessor):
    r"""Steer next-token scores with a weighted mix of value heads (VAS).

    For each row s, take the k highest-scoring tokens a (the candidates), value every candidate with
    every head h that has a non-zero coefficient β_h, centre each head's k values, and add them:

        scores[a] += Σ_h β_h · (V_h(s·a) − mean_{a'} V_h(s·a'))      for a in top-k(scores)

    With `top_p` < 1 the candidates of a row are only the smallest leading part of its top-k whose base
    probability reaches top_p (a nucleus inside the top-k), so a confident step has few candidates, and a
    row whose set is a single token is not valued at all; when every row of a step is such a row, the value
    backbone does not run (the tokens are fed with the next step that values something). Rows of a batch
    may have sets of different sizes; the mean is over each row's own set.

    Tokens outside the set are masked to -inf (sampling stays among the valued candidates), or left
    unchanged with `mask_outside_top_k=False`, as in the reference VAS code. With every β_h = 0 the
    output is exactly the base scores truncated to the set (`reference`). β_h < 0 pushes away from reward h.

    The mixer is a pure function of (input_ids, scores, weights) up to a float tolerance: called cold
    on any input it gives the same candidates, and added values within `compose.candidates.VALUE_ATOL`
    (1e-4) of a warm call inside `generate`. Its KV cache on the value backbone only saves work, and a
    sequence it has not seen starts a new cache; but cached and uncached forwards round differently, so
    the two agree to that tolerance, not bit for bit. It composes with any other
    processor (temperature, top-p, repetition penalty) in `generate`.

    Args:
        bank: the value bank holding the heads.
        weights: head name -> coefficient β (heads left out are 0).
        top_k: the most candidates valued per step.
        top_p: keep, of the top-k, the smallest set whose base probability reaches top_p (1.0: all k). The
            default, 0.99, was chosen on the demo world: it kept the heads' rewards and decoded faster (README).
        mask_outside_top_k: mask tokens outside the top-k (default) or leave them unchanged.
        tokenizer: the base model's tokenizer. If it differs from the backbone's, candidates are valued as text:
            V_h of the text so far plus the candidate's, as the backbone tokenizes it (`compose.cross_tokenizer`).
        pad_token_id: the id used for left padding (default: the base tokenizer's, or the bank tokenizer's).

    Example:
        >>> mixer = vm.Mixer(bank, {"helpful": 1.5, "concise": -0.5}, top_k=20)
        >>> out = base.generate(**enc, logits_processor=[mixer], do_sample=True, max_new_tokens=64)
        >>> mixer.set_weights({"helpful": 0.0})   # cheap: no reload
    """

    def __init__(self, bank: ValueBank, weights: Mapping[str, float] | None = None, top_k: int = 20,
                 mask_outside_top_k: bool = True, tokenizer=None, pad_token_id: int | None = None,
                 top_p: float = DEFAULT_TOP_P):
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer (got {top_k!r}); 20 is the usual choice.")
        check_top_p(top_p)
        self.bank = bank
        self.base_tokenizer = None if tokenizer is None or bank.same_tokenizer(tokenizer) else tokenizer
        self.top_k = top_k
        self.top_p = float(top_p)
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
            problem = self.cross_tokenizer and cross_tokenizer_problem(self.bank.configs[name], self.base_tokenizer)
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

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the base's tokenizer differs from the backbone's (candidates are valued as text)."""
        return self.base_tokenizer is not None

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a base tokenizer other than the one this mixer reads ids with (the backbone's unless given)."""
        if self.cross_tokenizer:
            if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(self.base_tokenizer):
                raise ValueError(f"Tokenizer mismatch: the base model uses {describe_tokenizer(tokenizer)} but this "
                                 f"mixer was made for {describe_tokenizer(self.base_tokenizer)}: "
                                 "Mixer(bank, weights, tokenizer=the base's tokenizer).")
        else:
            self.bank.check_tokenizer(tokenizer)

    def _scorer(self, heads: list[str]) -> CandidateScorer | CrossTokenizerScorer:
        if self.scorer is None or self.scorer.heads != heads:
            self.scorer = CrossTokenizerScorer(self.bank, heads, self.base_tokenizer, self.pad_token_id) \
                if self.cross_tokenizer else CandidateScorer(self.bank, heads, self.pad_token_id)
        return self.scorer

    def candidate_sets(self, scores: torch.FloatTensor):
        """(candidates (batch, w), their base scores (batch, w), in_set (batch, w)) for each row's set of candidates.

        w is the largest set of the batch (at most top_k); `in_set` marks each row's own, a leading part.
        """
        top_scores, candidates = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)
        in_set = nucleus(scores, top_scores, self.top_p)
        width = int(in_set.sum(-1).max())
        return candidates[:, :width], top_scores[:, :width], in_set[:, :width]

    def candidate_values(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        """`candidate_sets` and the values (n_active, batch, w), None when no head is active or every set has one
        token (nothing to value)."""
        candidates, top_scores, in_set = self.candidate_sets(scores)
        heads = self.active_heads
        values = None
        if heads and candidates.shape[1] > 1:
            values = self._scorer(heads)(input_ids, candidates).to(scores.device)
        return candidates, top_scores, in_set, values

    def contributions(self, values: torch.Tensor, in_set: torch.Tensor) -> torch.Tensor:
        """Each active head's addition to its candidates' scores, β_h·(V_h(s·a) − mean_a' V_h(s·a')) in each set.

        values, in_set: from `candidate_values`; returns the shape of `values` (sum over heads: the shift).
        """
        beta = torch.tensor([self.weights[h] for h in self.active_heads], device=values.device)
        return contributions(values, beta, in_set)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        candidates, top_scores, in_set, values = self.candidate_values(input_ids, scores)
        mixed = top_scores
        if values is not None:
            mixed = top_scores + self.contributions(values, in_set).sum(0).to(scores.dtype)
        return self._place(scores, candidates, top_scores, mixed, in_set)

    def reference(self, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The mixer's output with every β = 0: the base scores truncated to each row's set (π_ref)."""
        candidates, top_scores, in_set = self.candidate_sets(scores)
        return self._place(scores, candidates, top_scores, top_scores, in_set)

    def _place(self, scores, candidates, top_scores, mixed, in_set):
        if self.mask_outside_top_k:
            return torch.full_like(scores, -math.inf).scatter_(-1, candidates, mixed.masked_fill(~in_set, -math.inf))
        return scores.clone().scatter_(-1, candidates, torch.where(in_set, mixed, top_scores))
