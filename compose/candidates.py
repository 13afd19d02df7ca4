"""Candidate scoring: V_h(s·a) for the k candidate tokens a of every row s, for every head, fast.

One backbone forward per decoding step. The value backbone keeps a KV cache of the tokens it
has seen, one cache row per (sequence, head) pair (`RowCache`). Each step feeds the tokens that
are new since the last call followed by the k candidates, all at once, with a 4D attention mask
in which:
  - a new token sees the cached prefix and the new tokens up to itself (causal);
  - a candidate sees the prefix, every new token, and itself only — the k candidates sit at the
    same position, so one forward values all k continuations s·a (a "tree" of depth one).
The candidates' keys/values are then cropped off: the token that gets sampled is fed with the next
step's candidates. A candidate may also be a branch of several tokens that follows only the row's first
tokens (a retokenized tail, `compose.cross_tokenizer`); a row's branches are packed one after another, each
token seeing the prefix its branch follows and its own branch up to itself. A cold call (a sequence the cache has not seen) feeds the whole prompt the same
way, so the scorer is a pure function of (input_ids, candidates) whatever its cache holds, up to
`VALUE_ATOL` (cached and cold forwards round differently).
For an architecture that rejects custom masks, candidates are scored by cache expansion instead
(the prefix cache repeated k times, one candidate per row); which way works is checked once per bank.
Rows are left padded; a `RowCache` can drop rows and take in another's, so a server can keep one
cache for requests that come and go (`compose.vllm_processor`). Given each row's sequence, rows of one
sequence share the layers below their heads' LoRA (shared-trunk heads, `ValueBank.trunk_plan`): the cache
then holds, at each layer, one row per distinct computation of that layer (`ValueBank.layer_rows`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from valuemix.heads.bank import ValueBank
from valuemix.heads.tokens import position_ids_from_mask, real_token_mask

logger = logging.getLogger(__name__)

# Values of one prefix computed two ways (cached or cold, tree or brute force, mixed-adapter batch or one head
# at a time) agree within this absolute tolerance, not bit for bit: float32 forwards of different shapes round
# differently, and differently on different CPUs. The candidate set (the top-k of the scores) is always the same.
VALUE_ATOL = 1e-4


class RowCache:
    """The value backbone's KV cache over rows, row i valued by head `row_heads[i]`, each row left padded.

    `real` (rows, length) is 1 where the cached token is real, 0 where it is padding. `row_sequences[i]`
    (any hashable) names row i's sequence: rows of one sequence must be fed the same tokens, and share the
    trunk below their heads' LoRA; None: every row its own sequence.
    """

    def __init__(self, bank: ValueBank, row_heads: Sequence[str], row_sequences: Sequence[Hashable] | None = None):
        self.bank = bank
        self.row_heads = list(row_heads)
        self.row_sequences = [object() for _ in self.row_heads] if row_sequences is None else list(row_sequences)
        self.cache = DynamicCache(config=bank.decoder.config)
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise ValueError(f"{bank.backbone_id} uses sliding-window attention, which valuemix's value cache does "
                             "not support; use a value backbone with full attention (Llama, GPT-2, Qwen2 families).")
        self.real = torch.zeros(len(self.row_heads), 0, dtype=torch.long, device=bank.device)

    def __len__(self) -> int:
        return len(self.row_heads)

    def memory_bytes(self) -> int:
        """Bytes the cached keys and values take."""
        return sum(t.numel() * t.element_size() for layer in self.cache.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t))

    @torch.inference_mode()
    def score(self, new_tokens: torch.Tensor, new_real: torch.Tensor, candidates: torch.Tensor,
              tail_real: torch.Tensor | None = None, tail_start: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `new_tokens` (rows, n; `new_real` 0 on padding) and value the candidates after them: (rows, k).

        candidates: (rows, k) tokens, or (rows, k, L) branches of up to L tokens each (a candidate's tail) whose
        real tokens come first, marked 1 in `tail_real` (rows, k, L); a branch is valued at its last real token.
        tail_start (rows, k): how many of the row's real tokens (cached, then new) a branch follows (default: all),
        for a tail that replaces the row's last tokens. The branches of a row are packed one after another in the
        tree, so a long branch costs its own tokens only.
        """
        if candidates.dim() == 2:
            candidates = candidates[..., None]
        if tail_real is None:
            tail_real = torch.ones_like(candidates)
        if tail_start is None:
            tail_start = (self.real.sum(-1) + new_real.sum(-1))[:, None].expand(candidates.shape[:2])
        branches = (candidates, tail_real.to(candidates.device), tail_start.to(candidates.device))
        if self.bank.tree_masks_ok is None:
            values = self._score_checked(new_tokens, new_real, *branches)
        elif self.bank.tree_masks_ok:
            values = self._score_tree(new_tokens, new_real, *branches)
        else:
            values = self._score_expanded(new_tokens, new_real, *branches)
        self.real = torch.cat([self.real, new_real], dim=1)
        return values

    def truncate(self, keep: torch.Tensor) -> None:
        """Keep only the first `keep[r]` real cached tokens of each row r (rows, long): the later ones become padding,
        masked out and never fed again, so one row can take back its last tokens without touching the others."""
        self.real = self.real * (self.real.cumsum(-1) <= keep.to(self.real.device)[:, None])

    def select(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order), then drop the leading columns that are padding in every row left."""
        before = self._layer_rows()
        index = torch.tensor(list(rows), dtype=torch.long, device=self.real.device)
        self.row_heads = [self.row_heads[i] for i in rows]
        self.row_sequences = [self.row_sequences[i] for i in rows]
        self.real = self.real[index]
        first = int(self.real.any(0).long().argmax()) if self.real.any() else self.real.shape[1]
        self.real = self.real[:, first:]
        self._regather(before, self._layer_rows(), first)

    def extend(self, other: RowCache) -> None:
        """Append the rows of `other` (on the same bank, other sequences), left padding whichever is shorter."""
        if not len(self) or not self._filled_layers():
            self.row_heads, self.row_sequences = other.row_heads, other.row_sequences
            self.cache, self.real = other.cache, other.real
            return
        before = [mine + theirs for mine, theirs in zip(self._layer_rows(), other._layer_rows())]
        width = max(self.real.shape[1], other.real.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                setattr(mine, name, torch.cat([F.pad(a, (0, 0, width - a.shape[2], 0)),
                                               F.pad(b, (0, 0, width - b.shape[2], 0))]))
        self.real = torch.cat([F.pad(self.real, (width - self.real.shape[1], 0)),
                               F.pad(other.real, (width - other.real.shape[1], 0))])
        self.row_heads = self.row_heads + other.row_heads
        self.row_sequences = self.row_sequences + other.row_sequences
        self._regather(before, self._layer_rows(), 0)

    # -------------------------------------------------------------- internals
    def _layer_rows(self) -> list[list[tuple]]:
        return self.bank.layer_rows(self.row_heads, self.row_sequences)

    def _regather(self, before: list[list[tuple]], after: list[list[tuple]], first: int) -> None:
        """Re-index each layer's cached rows from the computations `before` to those `after`, from column `first`."""
        for layer, old, new in zip(self.cache.layers, before, after):
            if torch.is_tensor(getattr(layer, "keys", None)) and layer.keys.dim() == 4:
                position = {key: i for i, key in reversed(list(enumerate(old)))}  # the first of duplicates
                index = torch.tensor([position[key] for key in new], dtype=torch.long, device=layer.keys.device)
                layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]

    def _filled_layers(self) -> list:
        return [layer for layer in self.cache.layers if torch.is_tensor(getattr(layer, "keys", None))
                and layer.keys.dim() == 4]

    def _seen(self, new_real: torch.Tensor, tail_start: torch.Tensor) -> torch.Tensor:
        """(rows, k, n_cached + n_new): which cached and new columns each branch follows: the first tail_start real
        tokens of its row."""
        full = torch.cat([self.real, new_real], dim=1).bool()
        index = full.long().cumsum(-1) - 1  # each real column's index among the row's real tokens
        return full[:, None, :] & (index[:, None, :] < tail_start[..., None])

    def _tree_mask(self, new_real: torch.Tensor, packed: tuple, tail_start: torch.Tensor) -> torch.Tensor:
        """Additive 4D mask (rows, 1, n_new + w, n_cached + n_new + w) for the new tokens, then the packed branches."""
        tokens, branch, offset, _ = packed
        rows, n_new = new_real.shape
        n_cached, width = self.real.shape[1], tokens.shape[1]
        dtype = self.bank.decoder.dtype
        device = new_real.device
        causal = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()
        new_seen = causal[None] & new_real.bool()[:, None, :]  # new tokens: causal over real tokens
        new_seen |= torch.eye(n_new, dtype=torch.bool, device=device)  # pads see themselves
        new_rows = torch.cat([self.real.bool()[:, None, :].expand(rows, n_new, n_cached), new_seen,
                              torch.zeros(rows, n_new, width, dtype=torch.bool, device=device)], dim=2)
        real = branch >= 0
        seen = self._seen(new_real, tail_start)  # (rows, k, n_cached + n_new)
        prefix = seen.gather(1, branch.clamp_min(0)[..., None].expand(-1, -1, seen.shape[-1])) & real[..., None]
        # a branch token sees its own branch's tokens up to itself, and itself
        within = (branch[:, :, None] == branch[:, None, :]) & (offset[:, None, :] <= offset[:, :, None]) \
            & real[:, None, :]
        within |= torch.eye(width, dtype=torch.bool, device=device)
        allowed = torch.cat([new_rows, torch.cat([prefix, within], dim=2)], dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def _positions(self, new_real: torch.Tensor, packed: tuple, tail_start: torch.Tensor) -> torch.Tensor:
        """Positions of the new tokens (count of real tokens before them) and of the branches' tokens after the
        tokens each follows."""
        _, branch, offset, _ = packed
        full = torch.cat([self.real, new_real], dim=1)
        new_pos = position_ids_from_mask(full)[:, self.real.shape[1]:]
        branch_pos = tail_start.gather(1, branch.clamp_min(0)) + offset
        return torch.cat([new_pos, branch_pos], dim=1)

    @staticmethod
    def _pack(candidates: torch.Tensor, tail_real: torch.Tensor) -> tuple:
        """Each row's branches one after another: (tokens, branch index (-1: padding), offset in the branch), each
        (rows, w), w the most real tail tokens of a row, and each branch's last token's column (rows, k)."""
        rows, k, length = candidates.shape
        real = tail_real.reshape(rows, k * length).bool()
        lengths = tail_real.sum(-1)
        width = int(lengths.sum(-1).max())
        column = torch.where(real, real.long().cumsum(-1) - 1, width)  # padding goes to a spare column, dropped
        device = candidates.device

        def placed(values, fill):
            out = torch.full((rows, width + 1), fill, dtype=values.dtype, device=device)
            return out.scatter_(1, column, values.expand(rows, -1))[:, :width]

        tokens = placed(candidates.reshape(rows, k * length), 0)
        branch = placed(torch.arange(k, device=device).repeat_interleave(length)[None], -1)
        offset = placed(torch.arange(length, device=device).repeat(k)[None], 0)
        return tokens, branch, offset, lengths.cumsum(-1) - 1

    def _score_tree(self, new_tokens, new_real, candidates, tail_real, tail_start) -> torch.Tensor:
        n_new = new_tokens.shape[1]
        packed = self._pack(candidates, tail_real)
        tokens, _, _, last = packed
        hidden = self.bank.forward_hidden(torch.cat([new_tokens, tokens], dim=1),
                                          self._tree_mask(new_real, packed, tail_start),
                                          self._positions(new_real, packed, tail_start),
                                          self.row_heads, cache=self.cache, row_sequences=self.row_sequences)
        self.cache.crop(-tokens.shape[1])  # drop the candidates; the sampled one is fed with the next step
        if tokens.shape[1] == candidates.shape[1]:  # one token per branch, in order
            return self.bank.project(hidden[:, n_new:], self.row_heads)
        last = n_new + last.to(hidden.device)  # each branch's last token
        return self.bank.project(hidden.gather(1, last[..., None].expand(-1, -1, hidden.shape[-1])), self.row_heads)

    def _score_expanded(self, new_tokens, new_real, candidates, tail_real, tail_start) -> torch.Tensor:
        """Fallback: feed the new tokens, then one candidate's branch per row on a k-times repeated cache."""
        rows, k, length = candidates.shape
        full = torch.cat([self.real, new_real], dim=1)
        if new_tokens.shape[1]:
            self.bank.forward_hidden(new_tokens, full, position_ids_from_mask(full)[:, self.real.shape[1]:],
                                     self.row_heads, cache=self.cache, row_sequences=self.row_sequences)
        expanded = copy.deepcopy(self.cache)
        expanded.batch_repeat_interleave(k)  # each layer's rows k times: (computation, candidate) in that order
        branch_real = tail_real.reshape(rows * k, length).to(full.dtype)
        seen = self._seen(new_real, tail_start).reshape(rows * k, -1).to(full.dtype)
        mask = torch.cat([seen, branch_real], 1)
        positions = tail_start.reshape(-1, 1) + torch.arange(length, device=full.device)
        row_heads = [h for h in self.row_heads for _ in range(k)]
        row_sequences = [(s, c) for s in self.row_sequences for c in range(k)]
        hidden = self.bank.forward_hidden(candidates.reshape(-1, length), mask, positions, row_heads, cache=expanded,
                                          row_sequences=row_sequences)
        hidden = hidden[torch.arange(rows * k, device=hidden.device), branch_real.sum(-1).to(hidden.device) - 1]
        return self.bank.project(hidden.reshape(rows, k, -1), row_heads[::k])

    def _score_checked(self, new_tokens, new_real, *branches) -> torch.Tensor:
        """First scoring on a bank: use the tree only if it matches cache expansion on this architecture."""
        untouched = copy.deepcopy(self.cache)
        expected = self._score_expanded(new_tokens, new_real, *branches)
        expanded_cache, self.cache = self.cache, untouched
        try:
            got = self._score_tree(new_tokens, new_real, *branches)
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
        self.rows: RowCache | None = None  # one row per (head, sequence), head-major: r = h·batch + b
        self.seen = None  # (batch, seq) token ids the cache holds

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """V_h(s_b · candidates[b, c]) as a tensor (n_heads, batch, k)."""
        input_ids = input_ids.to(self.bank.device)
        batch, k = candidates.shape
        new_tokens = self._new_tokens(input_ids)
        new_real = real_token_mask(input_ids, self.pad_token_id)[:, input_ids.shape[1] - new_tokens.shape[1]:]
        heads = len(self.heads)
        values = self.rows.score(new_tokens.repeat(heads, 1), new_real.repeat(heads, 1),
                                 candidates.to(self.bank.device).repeat(heads, 1))
        self.seen = input_ids
        return values.reshape(heads, batch, k)

    def _new_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens of input_ids the cache does not hold yet; starts a new cache on an unseen sequence."""
        if self.seen is not None and self.seen.shape[0] == input_ids.shape[0]:
            n_seen = self.seen.shape[1]
            if input_ids.shape[1] >= n_seen and torch.equal(input_ids[:, :n_seen], self.seen):
                return input_ids[:, n_seen:]
        batch = input_ids.shape[0]
        self.rows = RowCache(self.bank, [h for h in self.heads for _ in range(batch)],
                             [b for _ in self.heads for b in range(batch)])
        return input_ids
