"""Shared fixtures: a byte-level BPE tokenizer trained on the spot and tiny causal LMs of three families."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CORPUS = [
    "the cat sat on the mat and the dog ran in the park",
    "a happy day is a good day, a sad day is a bad day",
    "please write a short answer. yes no maybe always never",
    "hello world! how are you? i am fine, thank you very much.",
    "one two three four five six seven eight nine ten",
    "red green blue yellow black white orange purple",
] * 4
FAMILIES = ["llama", "gpt2", "qwen2"]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on CORPUS, with <s>, </s> and <pad> special tokens."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    return tok


def build_model(family: str, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A tiny randomly initialised causal LM of one family, in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(config)
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(family)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def base_model(tokenizer):
    return build_model("llama", len(tokenizer), seed=0)


def randomize_heads(bank, scale: float = 0.5, seed: int = 0) -> None:
    """Give every head non-zero LoRA and value weights, so values differ between heads and tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in bank.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
        for layer in bank.value_layers.values():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))


def make_bank(tokenizer, family: str = "llama", heads=("helpful", "concise"), seed: int = 1):
    """A ValueBank on a tiny backbone with randomised heads."""
    from valuemix.heads.bank import ValueBank

    bank = ValueBank(build_model(family, len(tokenizer), seed=seed), tokenizer)
    for head in heads:
        bank.add_head(head)
    randomize_heads(bank, seed=seed)
    return bank


def brute_force_values(bank, input_ids, attention_mask, candidates, heads):
    """V_h(s·a) for every candidate by a separate full forward of s·a: (n_heads, batch, k)."""
    batch, k = candidates.shape
    out = torch.zeros(len(heads), batch, k)
    for c in range(k):
        ids = torch.cat([input_ids, candidates[:, c:c + 1]], dim=1)
        mask = torch.cat([attention_mask, torch.ones(batch, 1, dtype=attention_mask.dtype)], dim=1)
        out[:, :, c] = bank.values(ids, mask, heads=heads)[:, :, -1]
    return out
