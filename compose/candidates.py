"""Candidate scoring: V_h(s·a) for the k candidate tokens a of every row s, for every head, fast.

One backbone forward per decoding step. The value backbone keeps a KV cache of the tokens it
has seen (one cache row per (head, row) pair: rows are head-major, r = h·B + b). Each step feeds
the tokens that are new since the last call followed by the k candidates, all at once, with a 4D
attention mask in which:
  - a new token sees the cached prefix and the new tokens up to itself (causal);
  - a candidate sees the prefix, every new token, and itself only — the k candidates sit at the
    same position, so one forward values all k continuations s·a (a "tree" of depth one).
The candidates' keys/values are then cropped off: the token that gets sampled is fed with the next
step's candidates. A cold call (a sequence the cache has not seen) feeds the whole prompt the same
way, so the scorer is a pure function of (input_ids, candidates) whatever its cache holds, up to
`VALUE_ATOL` (cached and cold forwards round differently).
For an architecture that rejects custom masks, candidates are scored by cache expansion instead
(the prefix cache repeated k times, one candidate per row); which way works is checked once per bank.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from valuemix.heads.bank import ValueBank
from valuemix.heads.tokens import position_ids_from_mask, real_token_mask

logger = logging.getLogger(__name__)

# Values of one prefix computed two ways (cached or cold, tree or brute force, mixed-adapter batch or one head
# at a time) agree within this absolute tolerance, not bit for bit: float32 forwards of different shapes round
# differently, and differently on different CPUs. The candidate set (the top-k of the scores) is always the same.
VALUE_ATOL = 1e-4


class CandidateScorer:
    """Values of candidate next tokens under several heads, with a KV cache on the value backbone.

    Args:
        bank: the value bank holding the heads.
        heads: the heads to score with (their order is the order of the returned values).
        pad_token_id: the id used for left padding (default: the bank tokenizer's pad token).
    """

    def __init__(self, bank: ValueBank, heads: Sequence[str], pad_token_id: int | None = None):
        self.bank = bank
        self.heads = bank.check_heads(heads)
        self.pad_token_id = bank.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        self.reset()

    def reset(self) -> None:
        """Forget the cache; the next call starts over from the prompt."""
        self.cache = None
        self.seen = None  # (batch, seq) token ids the cache holds
        self.real = None  # (batch, seq) 1 where the cached token is real (not left padding)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """V_h(s_b · candidates[b, c]) as a tensor (n_heads, batch, k)."""
        input_ids = input_ids.to(self.bank.device)
        candidates = candidates.to(self.bank.device)
        new_tokens = self._new_tokens(input_ids)
        new_real = real_token_mask(input_ids, self.pad_token_id)[:, input_ids.shape[1] - new_tokens.shape[1]:]
        if self.bank.tree_masks_ok is None:
            values = self._score_checked(new_tokens, new_real, candidates)
        elif self.bank.tree_masks_ok:
            values = self._score_tree(new_tokens, new_real, candidates)
        else:
            values = self._score_expanded(new_tokens, new_real, candidates)
        self.seen, self.real = input_ids, torch.cat([self.real, new_real], dim=1)
        return values

    # -------------------------------------------------------------- internals
    def _new_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens of input_ids the cache does not hold yet; resets the cache on an unseen sequence."""
        if self.seen is not None and self.seen.shape[0] == input_ids.shape[0]:
            n_seen = self.seen.shape[1]
            if input_ids.shape[1] >= n_seen and torch.equal(input_ids[:, :n_seen], self.seen):
                return input_ids[:, n_seen:]
        self.cache = DynamicCache(config=self.bank.decoder.config)
        self.seen = input_ids[:, :0]
        self.real = torch.zeros_like(self.seen)
        return input_ids

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Repeat a (batch, ...) tensor for every head: (n_heads·batch, ...), head-major."""
        return tensor.repeat(len(self.heads), *([1] * (tensor.dim() - 1)))

    def _row_heads(self, batch: int, per_row: int = 1) -> list[str]:
        return [h for h in self.heads for _ in range(batch * per_row)]

    def _tree_mask(self, new_real: torch.Tensor, k: int) -> torch.Tensor:
        """Additive 4D mask (batch, 1, n_new + k, n_cached + n_new + k) for new tokens then candidates."""
        batch, n_new = new_real.shape
        n_cached = self.real.shape[1]
        dtype = self.bank.decoder.dtype
        prefix = self.real.bool()[:, None, :].expand(batch, n_new + k, n_cached)
        causal = torch.ones(n_new, n_new, dtype=torch.bool, device=new_real.device).tril()
        new_seen = torch.cat([causal[None] & new_real.bool()[:, None, :],  # new tokens: causal over real tokens
                              new_real.bool()[:, None, :].expand(batch, k, n_new)], dim=1)
        new_seen[:, :n_new] |= torch.eye(n_new, dtype=torch.bool, device=new_real.device)  # pads see themselves
        cands = torch.cat([torch.zeros(batch, n_new, k, dtype=torch.bool, device=new_real.device),
                           torch.eye(k, dtype=torch.bool, device=new_real.device).expand(batch, k, k)], dim=1)
        allowed = torch.cat([prefix, new_seen, cands], dim=2)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def _positions(self, new_real: torch.Tensor, k: int) -> torch.Tensor:
        """Positions of the new tokens (count of real tokens before them) and of the k candidates."""
        full = torch.cat([self.real, new_real], dim=1)
        new_pos = position_ids_from_mask(full)[:, self.real.shape[1]:]
        cand_pos = full.sum(-1, keepdim=True).expand(-1, k)
        return torch.cat([new_pos, cand_pos], dim=1)

    def _score_tree(self, new_tokens, new_real, candidates) -> torch.Tensor:
        batch, k = candidates.shape
        n_new = new_tokens.shape[1]
        hidden = self.bank.forward_hidden(
            self._rows(torch.cat([new_tokens, candidates], dim=1)), self._rows(self._tree_mask(new_real, k)),
            self._rows(self._positions(new_real, k)), self._row_heads(batch), cache=self.cache)
        self.cache.crop(-k)  # drop the candidates; the sampled one is fed with the next step
        return self.bank.project(hidden[:, n_new:].reshape(len(self.heads), batch, k, -1), self.heads)

    def _score_expanded(self, new_tokens, new_real, candidates) -> torch.Tensor:
        """Fallback: feed the new tokens, then one candidate per row on a k-times repeated cache."""
        batch, k = candidates.shape
        if new_tokens.shape[1]:
            mask = torch.cat([self.real, new_real], dim=1)
            self.bank.forward_hidden(self._rows(new_tokens), self._rows(mask),
                                     self._rows(position_ids_from_mask(mask)[:, self.real.shape[1]:]),
                                     self._row_heads(batch), cache=self.cache)
        full = torch.cat([self.real, new_real], dim=1)
        expanded = copy.deepcopy(self.cache)
        expanded.batch_repeat_interleave(k)
        mask = torch.cat([full.repeat_interleave(k, 0), torch.ones_like(full[:, :1]).repeat_interleave(k, 0)], 1)
        positions = full.sum(-1).repeat_interleave(k)[:, None]
        hidden = self.bank.forward_hidden(self._rows(candidates.reshape(-1, 1)), self._rows(mask),
                                          self._rows(positions), self._row_heads(batch, k), cache=expanded)
        return self.bank.project(hidden.reshape(len(self.heads), batch, k, -1), self.heads)

    def _score_checked(self, new_tokens, new_real, candidates) -> torch.Tensor:
        """First scoring on a bank: use the tree only if it matches cache expansion on this architecture."""
        untouched = copy.deepcopy(self.cache)
        expected = self._score_expanded(new_tokens, new_real, candidates)
        expanded_cache, self.cache = self.cache, untouched
        try:
            got = self._score_tree(new_tokens, new_real, candidates)
            self.bank.tree_masks_ok = torch.allclose(got, expected, atol=VALUE_ATOL, rtol=1e-3)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            logger.warning("Tree scoring raised %r", err)
            self.bank.tree_masks_ok = False
        if self.bank.tree_masks_ok:
            return got
        logger.warning("%s does not honour custom 4D attention masks: scoring candidates by cache expansion "
                       "(slower).", self.bank.backbone_id)
        self.cache = expanded_cache
        return expected
