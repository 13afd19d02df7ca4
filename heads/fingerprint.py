"""Fingerprints: short hashes and probes that tell tokenizers, models and backbones apart (cheap, not full hashes)."""

from __future__ import annotations

import hashlib
import json
import weakref

from torch import nn

_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (vocab size, fingerprint)


def tokenizer_fingerprint(tokenizer) -> str:
    """A 16-hex-digit hash of the vocabulary (token -> id) and the BOS/EOS ids.

    Two tokenizers with the same fingerprint turn text into the same token ids, so a value
    head trained on one can score candidates proposed by a model that uses the other.
    The pad token is left out: setting `pad_token = eos_token` does not change the ids.
    Cached per tokenizer object (hashing a 50k vocabulary takes ~50 ms); adding tokens invalidates it.
    """
    cached = _cache.get(tokenizer)
    if cached and cached[0] == len(tokenizer):
        return cached[1]
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }
    fingerprint = hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]
    _cache[tokenizer] = (len(tokenizer), fingerprint)
    return fingerprint


def describe_tokenizer(tokenizer) -> str:
    """`name (fingerprint)` for error messages."""
    return f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} ({tokenizer_fingerprint(tokenizer)})"


def model_name(model) -> str:
    """`config._name_or_path` of a model, or its class name when it was built in memory."""
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def weights_fingerprint(model, n_tensors: int = 8) -> str:
    """A 16-hex hash of the shapes of all parameters and the sums of a few of them (cheap; not a full hash)."""
    params = list(model.named_parameters())
    step = max(1, len(params) // n_tensors)
    picked = params[::step][:n_tensors] + params[-1:]
    payload = {
        "shapes": [(name, list(p.shape), str(p.dtype)) for name, p in params],
        "sums": [(name, float(p.detach().double().sum()), float(p.detach().double().abs().sum()))
                 for name, p in picked],
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def backbone_probe(decoder: nn.Module) -> list[float]:
    """A few weights of the backbone, to tell one checkpoint from another (tolerant to dtype)."""
    names = sorted(n for n, _ in decoder.named_parameters() if "lora_" not in n)
    tensors = dict(decoder.named_parameters())
    return [float(v) for n in names[:: max(1, len(names) // 8)] for v in tensors[n].detach().flatten()[:4].float()]
