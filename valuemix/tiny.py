"""Tiny models built on the spot: tokenizers (byte-level BPE, word-level, SentencePiece-style unigram) and small
causal LMs of three families.

Used by the quick-start example, the tests and the benchmark, so nothing needs a download.
"""

from __future__ import annotations

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
FAMILIES = ("llama", "gpt2", "qwen2")
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


TOKENIZER_KINDS = ("bpe", "word", "unigram")


def build_tokenizer(vocab_size: int = 320, corpus=CORPUS, kind: str = "bpe") -> PreTrainedTokenizerFast:
    """A tokenizer trained on `corpus`: <pad>=0, <s>=1, </s>=2, left padding, a chat template. `kind`: "bpe" a
    byte-level BPE (GPT-2/Llama 3 style), "word" whole words and punctuation (<unk> for others), "unigram" a
    SentencePiece-style unigram model with "▁" marking spaces (Llama 2/T5 style)."""
    special = ["<pad>", "<s>", "</s>"]
    if kind == "bpe":
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "word":
        raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
        raw.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special + ["<unk>"],
                                            show_progress=False)
    elif kind == "unigram":
        raw = Tokenizer(models.Unigram())
        raw.pre_tokenizer = pre_tokenizers.Metaspace()
        raw.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special + ["<unk>"],
                                          unk_token="<unk>", show_progress=False)
    else:
        raise ValueError(f"Unknown tokenizer kind {kind!r}: pick one of {TOKENIZER_KINDS}.")
    raw.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", padding_side="left",
                                        unk_token=None if kind == "bpe" else "<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(family: str, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, **shape):
    """A small randomly initialised causal LM of one family ('llama', 'gpt2', 'qwen2'), in eval mode.

    shape: config values that replace the defaults of a Llama/Qwen2 decoder (e.g. num_attention_heads=9).
    """
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    decoder = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common) | shape
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**decoder))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**decoder))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common))
    else:
        raise ValueError(f"Unknown family {family!r}: pick one of {FAMILIES}.")
    return model.eval()


def pretrain(model, tokenizer, corpus=CORPUS, steps: int = 200, lr: float = 3e-3, seed: int = 0):
    """Teach a tiny model the corpus (next-token loss, `steps` AdamW steps) so its samples read as words."""
    torch.manual_seed(seed)
    texts = [f"{tokenizer.bos_token}{line}{tokenizer.eos_token}" for line in dict.fromkeys(corpus)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
