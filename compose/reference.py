"""The SLOW reference: VAS decoding as the paper's released code does it. A baseline for benchmarks only.

At every step, for the base model's top-k candidates a of each row s, the value model is run once
PER CANDIDATE, one candidate at a time, on a deep copy of its prefix KV cache:

    for a in top-k:   cache_a = deepcopy(prefix_cache);  V(s·a) = value(a | cache_a)

then `logits[a] += β · (V(s·a) − mean_a' V(s·a'))` for a in top-k (tokens outside the top-k are
left unchanged, as in the reference code) and the next token is sampled. The value model's prefix
cache is then extended by the chosen token in one more forward. That is k + 1 value forwards and
k cache copies per step, where `valuemix.compose.candidates.CandidateScorer` does one forward.

Use `valuemix.compose.generate.generate` with a `Mixer` for real work; this module exists so that
`valuemix.bench` can measure what the fast path saves on the same models.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from valuemix.compose.generate import Generation, step_kl
from valuemix.heads.bank import ValueBank
from valuemix.heads.compat import with_cache
from valuemix.heads.tokens import encode_prompts, eos_ids, position_ids_from_mask


@torch.inference_mode()
def reference_generate(base, tokenizer, bank: ValueBank, head: str, beta: float, prompts: Sequence[str],
                       top_k: int = 20, max_new_tokens: int = 64, seed: int = 0, *,
                       logits_processors: Sequence = (), step_logits: list | None = None) -> Generation:
    """Sample with reference VAS decoding (one value forward per candidate); returns a `Generation`.

    `kl` holds KL(π_mix‖π_base) per completion (tokens outside the top-k keep their base scores).
    `seconds` is the wall time of the decoding loop, prefill included. A `step_logits` list receives each
    step's mixed logits (batch, vocab), to check this decoder against the `Mixer` on the same prefixes.
    """
    bank.check_heads([head])
    bank.check_tokenizer(tokenizer)
    prompts, input_ids, attention_mask = encode_prompts(tokenizer, prompts)
    start = time.perf_counter()
    device = base.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch = input_ids.shape[0]
    eos = torch.tensor(eos_ids(base, tokenizer), device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    row_heads = [head] * batch

    base_cache = DynamicCache(config=base.config)
    positions = position_ids_from_mask(attention_mask)
    logits = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **with_cache(base_cache),
                  use_cache=True, logits_to_keep=1).logits[:, -1]
    value_cache = DynamicCache(config=bank.decoder.config)  # the value model's prefix cache
    bank.forward_hidden(input_ids.to(bank.device), attention_mask.to(bank.device), positions.to(bank.device),
                        row_heads, cache=value_cache)

    tokens = [[] for _ in range(batch)]
    kl = torch.zeros(batch)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        scores = logits.float()
        for processor in logits_processors:
            scores = processor(input_ids, scores)
        top_scores, candidates = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
        cand_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1).to(bank.device)
        cand_pos = (positions[:, -1:] + 1).to(bank.device)
        values = []
        for j in range(candidates.shape[1]):  # one candidate at a time, each on its own copy of the cache
            cache_j = copy.deepcopy(value_cache)
            hidden = bank.forward_hidden(candidates[:, j:j + 1].to(bank.device), cand_mask, cand_pos, row_heads,
                                         cache=cache_j)
            values.append(bank.project(hidden[None, :, -1], [head])[0])  # (batch,)
        values = torch.stack(values, dim=1).to(scores.device)  # (batch, k)
        mixed = scores.scatter_add(-1, candidates, beta * (values - values.mean(-1, keepdim=True)))
        if step_logits is not None:
            step_logits.append(mixed.cpu())
        kl += torch.where(alive, step_kl(mixed, scores), 0.0).cpu()
        next_tokens = torch.multinomial(torch.softmax(mixed, dim=-1), 1, generator=generator).squeeze(1)
        next_tokens = torch.where(alive, next_tokens, torch.full_like(next_tokens, tokenizer.pad_token_id))
        for row in alive.nonzero().flatten().tolist():
            tokens[row].append(int(next_tokens[row]))
        alive = alive & ~torch.isin(next_tokens, eos)
        if not alive.any():
            break
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
        attention_mask = cand_mask.to(device)
        positions = positions[:, -1:] + 1
        logits = base(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=positions,
                      **with_cache(base_cache), use_cache=True).logits[:, -1]
        bank.forward_hidden(next_tokens[:, None].to(bank.device), attention_mask.to(bank.device),
                            positions.to(bank.device), row_heads, cache=value_cache)  # extend the prefix cache
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return Generation(list(prompts), texts, tokens, kl.tolist(), time.perf_counter() - start)
