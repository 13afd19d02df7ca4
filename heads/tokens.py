"""Token helpers shared by sampling, decoding and scoring: chat prompts, left-padded batches, positions, EOS ids.

Prompts are plain text everywhere in valuemix; `chat_template=True` is the one switch that wraps each
as a user message under the tokenizer's chat template, and `prompt_texts` is the one place that does it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as one user message under the tokenizer's chat template, with the generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_texts(tokenizer, prompts: Sequence[str], chat_template: bool = False) -> list[str]:
    """The texts the tokenizer sees: the plain prompts, or each under the chat template."""
    return [chat_prompt(tokenizer, p) for p in prompts] if chat_template else list(prompts)


def tokenize_prompts(tokenizer, prompts: Sequence[str], chat_template: bool = False) -> list[list[int]]:
    """Token ids of each prompt, no padding (the chat template writes its own special tokens)."""
    return tokenizer(prompt_texts(tokenizer, prompts, chat_template), add_special_tokens=not chat_template)["input_ids"]


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool = False):
    """(texts fed to the tokenizer, left-padded `input_ids`, `attention_mask`); rejects empty prompts by index."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("No prompts given: pass a list of one or more prompt strings.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"Prompt {i} is empty ({prompt!r}): every prompt needs some text.")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token, needed to batch prompts: "
                         "set tokenizer.pad_token = tokenizer.eos_token.")
    texts = prompt_texts(tokenizer, prompts, chat_template)
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=not chat_template)
    return texts, enc["input_ids"], enc["attention_mask"]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions (batch, seq) that count only real tokens, as `generate` does for left padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)


def real_token_mask(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(batch, seq) 1 for real tokens, 0 for left padding (a leading run of pad tokens)."""
    if pad_token_id is None:
        return torch.ones_like(input_ids)
    return ((input_ids != pad_token_id).long().cumsum(-1) > 0).long()


def eos_ids(base, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any EOS ids in the model's generation_config (chat models often have two)."""
    ids = {tokenizer.eos_token_id}
    model_eos = getattr(base.generation_config, "eos_token_id", None)
    ids.update(model_eos if isinstance(model_eos, (list, tuple)) else [model_eos])
    return sorted(i for i in ids if i is not None)


def retokenize(tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokenizer`'s own tokens of texts decoded from another tokenizer's ids (special tokens and chat markup already
    written out as text), adding none of its special tokens: (ids, attention mask), right padded."""
    if tokenizer.pad_token_id is None:
        raise ValueError("The value backbone's tokenizer has no pad token, needed to batch retokenized texts: "
                         "set bank.tokenizer.pad_token = bank.tokenizer.eos_token.")
    enc = tokenizer(list(texts), add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def retokenize_samples(tokenizer, source_tokenizer, prompt_ids: Sequence[Sequence[int]],
                       completion_ids: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and completions in `source_tokenizer`'s ids as `tokenizer` tokenizes their text (`retokenize`):
    the completion is what follows, in the whole text's tokens, their common prefix with the prompt's own."""
    def lists(texts):
        ids, mask = retokenize(tokenizer, texts)
        return [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    whole = lists(source_tokenizer.batch_decode([list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]))
    prompts = lists(source_tokenizer.batch_decode([list(p) for p in prompt_ids]))
    shared = [common_length(w, p) for w, p in zip(whole, prompts)]
    return [w[:n] for w, n in zip(whole, shared)], [w[n:] for w, n in zip(whole, shared)]


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one (len(rows), longest) left-padded tensor, and its 1/0 mask of real tokens."""
    width = max((len(r) for r in rows), default=0)
    tokens = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long).reshape(len(rows), width)
    real = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long).reshape(tokens.shape)
    return tokens, real
