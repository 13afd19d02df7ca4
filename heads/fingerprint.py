"""Tokenizer fingerprints: a short hash that tells whether two tokenizers map text to the same ids."""

from __future__ import annotations

import hashlib
import json
import weakref

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
