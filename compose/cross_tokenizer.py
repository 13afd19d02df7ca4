"""Values of a base model's candidate tokens by a value backbone with another tokenizer.

The base proposes tokens of its own vocabulary; a head values text. Each row's text so far (the base's ids
decoded, special tokens written out) plus a candidate's token is what gets valued: V_h of that text as the
backbone's tokenizer tokenizes it (`heads.tokens.retokenize`). One backbone forward per step, as on the
same-tokenizer path (`compose.candidates`): the backbone tokens of a row's text so far are fed to the value
cache; each candidate's backbone tokens after those its text shares with them (its tail, which may replace
the last backbone token or two of the text) are one branch of the tree, following only the shared ones;
branches of different lengths are packed in the same forward. When the text's tokens no longer start with
what the cache holds (the taken token retokenized a boundary), the row takes back its cached tokens from
where they differ (`RowCache.truncate`) and feeds the new ones; the other rows keep theirs.

`candidate_texts` and `text_branches` are those two steps on their own, for the vLLM processor, whose
rows come and go with requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from valuemix.compose.candidates import RowCache
from valuemix.heads.bank import ValueBank
from valuemix.heads.tokens import common_length, left_padded, real_token_mask, retokenize


def candidate_texts(tokenizer, base_tokenizer, prefixes: Sequence[Sequence[int]], candidates: torch.Tensor):
    """`tokenizer`'s tokens of each base prefix's text (base ids, no padding), alone and with each of its candidates
    appended: (prefix ids, prefix real) each (rows, L) and (ids, real) each (rows, k, L), the real tokens first."""
    rows, k = candidates.shape
    texts = base_tokenizer.batch_decode([list(p) for p in prefixes]
                                        + [list(p) + [c] for p, row in zip(prefixes, candidates.tolist()) for c in row])
    ids, mask = retokenize(tokenizer, texts)
    return ids[:rows], mask[:rows], ids[rows:].reshape(rows, k, -1), mask[rows:].reshape(rows, k, -1)


def text_branches(prefix_ids: torch.Tensor, prefix_real: torch.Tensor, ids: torch.Tensor, real: torch.Tensor,
                  pad: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split `candidate_texts` into (each row's prefix tokens, to hold in the cache; each candidate's tail: its
    tokens after those it shares with the prefix, at least its last one (rows, k, w), right padded with `pad`; their
    real mask; how many prefix tokens each tail follows (rows, k))."""
    rows, k, length = ids.shape
    lengths = real.sum(-1)  # (rows, k)
    same = (ids == prefix_ids[:, None, :]) & real.bool() & prefix_real.bool()[:, None, :]
    start = torch.minimum(same.long().cumprod(-1).sum(-1), lengths - 1).clamp_min(0)
    width = int((lengths - start).max())
    columns = start[..., None] + torch.arange(width)
    tail_real = (columns < lengths[..., None]).long()
    tails = ids.gather(-1, columns.clamp_max(length - 1)) * tail_real + pad * (1 - tail_real)
    prefixes = [row[:n] for row, n in zip(prefix_ids.tolist(), prefix_real.sum(-1).tolist())]
    return prefixes, tails, tail_real, start


class CrossTokenizerScorer:
    """Values V_h(text(s·a)) of base candidate tokens a after base rows s, for every head: (n_heads, batch, k).

    Args:
        bank: the value bank holding the heads (its tokenizer is the backbone's).
        heads: the heads to score with (their order is the order of the returned values).
        base_tokenizer: the base model's tokenizer, whose ids `input_ids` and the candidates are.
        pad_token_id: the base id used for left padding (default: the base tokenizer's pad token).
    """

    def __init__(self, bank: ValueBank, heads: Sequence[str], base_tokenizer, pad_token_id: int | None = None):
        self.bank = bank
        self.heads = bank.check_heads(heads)
        self.base_tokenizer = base_tokenizer
        self.pad_token_id = base_tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        backbone_pad = bank.tokenizer.pad_token_id
        self.backbone_pad = 0 if backbone_pad is None else backbone_pad
        self.reset()

    def reset(self) -> None:
        """Forget the cache; the next call starts over from the prompt."""
        self.rows: RowCache | None = None  # one row per (head, sequence), head-major: r = h·batch + b
        self.seen = None  # (batch, seq) base ids of the last call
        self.cached: list[list[int]] = []  # per sequence: the backbone tokens its cache rows hold (real ones)
        self.taken_back = 0  # rows whose cached tokens were retokenized (for the benchmark and tests)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        batch, k = candidates.shape
        input_ids, candidates = input_ids.cpu(), candidates.cpu()
        real = real_token_mask(input_ids, self.pad_token_id).sum(-1).tolist()
        texts = candidate_texts(self.bank.tokenizer, self.base_tokenizer,
                                [row[len(row) - n:] for row, n in zip(input_ids.tolist(), real)], candidates)
        prefixes, tails, tail_real, tail_start = text_branches(*texts, self.backbone_pad)
        self._start_if_new(input_ids)
        keep = [common_length(cached, prefix) for cached, prefix in zip(self.cached, prefixes)]
        heads = len(self.heads)
        retokenized = sum(kept < len(cached) for kept, cached in zip(keep, self.cached))
        if retokenized:  # take back those rows' cached tokens from where they differ
            self.rows.truncate(torch.tensor(keep).repeat(heads))
            self.taken_back += retokenized
        new_tokens, new_real = left_padded([p[kept:] for p, kept in zip(prefixes, keep)], self.backbone_pad)
        self.cached, self.seen = prefixes, input_ids
        device = self.bank.device
        values = self.rows.score(new_tokens.to(device).repeat(heads, 1), new_real.to(device).repeat(heads, 1),
                                 tails.to(device).repeat(heads, 1, 1), tail_real.to(device).repeat(heads, 1, 1),
                                 tail_start.to(device).repeat(heads, 1))
        return values.reshape(heads, batch, k)

    def _start_if_new(self, input_ids: torch.Tensor) -> None:
        """A new value cache unless `input_ids` continues the last call's rows."""
        if self.seen is not None and self.seen.shape[0] == input_ids.shape[0] \
                and input_ids.shape[1] >= self.seen.shape[1] \
                and torch.equal(input_ids[:, :self.seen.shape[1]].to(self.seen.device), self.seen):
            return
        batch = input_ids.shape[0]
        self.rows = RowCache(self.bank, [h for h in self.heads for _ in range(batch)],
                             [b for _ in self.heads for b in range(batch)])
        self.cached = [[] for _ in range(batch)]
