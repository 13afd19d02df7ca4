"""Shared fixtures: the tiny tokenizer and models of valuemix.tiny, banks with randomised heads."""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager

# Idle OpenMP threads sleep instead of spinning. Spinning threads of two torch processes on the same cores
# (a second test run, any other job) slowed decoding here 27-fold; sleeping ones share the cores fairly.
# Read when torch loads its OpenMP runtime, so this must come before the first `import torch`.
assert "torch" not in sys.modules, "tests/conftest.py must set OMP_WAIT_POLICY before torch is imported"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LogitsProcessor  # noqa: E402

from valuemix.heads.tokens import real_token_mask  # noqa: E402
from valuemix.tiny import FAMILIES, build_model, build_tokenizer  # noqa: F401, E402  (tests import them from here)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> str:
    """A tiny llama (seed 0) and its tokenizer saved to a folder: a base and backbone that load by path, offline."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model("llama", len(tokenizer), seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def vowel_share(prompts, completions):
    """Share of the completion's characters that are vowels: a dense rule reward."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


@pytest.fixture(scope="session")
def vowel_samples(tokenizer):
    """Samples of a tiny llama (seed 0) on six prompts, four each, scored with `vowel_share` as "vowels"."""
    import valuemix as vm

    base = build_model("llama", len(tokenizer), seed=0)
    prompts = ["hello world", "the cat sat", "a happy day", "one two three", "red green blue", "please write"]
    data = vm.sample_base(base, tokenizer, prompts, n_per_prompt=4, max_new_tokens=8, seed=0, progress=False)
    return vm.score(data, {"vowels": vowel_share}, progress=False)


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


def make_bank(tokenizer, family: str = "llama", heads=("helpful", "concise"), seed: int = 1, layers: int = 2,
              lora_layers: dict | None = None):
    """A ValueBank on a tiny backbone of `layers` layers with randomised heads; `lora_layers[head]` puts a head's
    LoRA on that many top layers only (a shared-trunk head)."""
    from valuemix.heads.bank import ValueBank

    bank = ValueBank(build_model(family, len(tokenizer), seed=seed, layers=layers), tokenizer)
    for head in heads:
        bank.add_head(head, layers=(lora_layers or {}).get(head))
    randomize_heads(bank, seed=seed)
    return bank


def assert_same_mix(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Two mixer outputs agree: the same candidates (finite entries) and scores within VALUE_ATOL."""
    from valuemix.compose.candidates import VALUE_ATOL

    assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), "different candidate sets"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], atol=VALUE_ATOL, rtol=0)


def brute_force_values(bank, input_ids, attention_mask, candidates, heads):
    """V_h(s·a) for every candidate by a separate full forward of s·a: (n_heads, batch, k)."""
    batch, k = candidates.shape
    out = torch.zeros(len(heads), batch, k)
    for c in range(k):
        ids = torch.cat([input_ids, candidates[:, c:c + 1]], dim=1)
        mask = torch.cat([attention_mask, torch.ones(batch, 1, dtype=attention_mask.dtype)], dim=1)
        out[:, :, c] = bank.values(ids, mask, heads=heads)[:, :, -1]
    return out


MIX_PROMPTS = ["hello world", "the cat sat on the mat and the dog"]  # different lengths: left padding


class Recorder(LogitsProcessor):
    """Wraps the mixer inside `generate` and keeps (input_ids, scores in, scores out) of every call."""

    def __init__(self, mixer):
        self.mixer, self.calls = mixer, []

    def __call__(self, input_ids, scores):
        out = self.mixer(input_ids, scores)
        self.calls.append((input_ids.clone(), scores.clone(), out.clone()))
        return out


def run_generate(base, tokenizer, processor, new_tokens=6, seed=0):
    enc = tokenizer(MIX_PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    return base.generate(**enc, logits_processor=[processor], do_sample=True, max_new_tokens=new_tokens,
                         top_k=None, pad_token_id=tokenizer.pad_token_id)


def nucleus_sizes(scores, top_k, top_p):
    """Each row's set size, one token at a time: add the next most likely token while the mass is short of top_p."""
    sizes = []
    for row in torch.softmax(scores.double(), -1):
        probs, size, mass = row.sort(descending=True).values.tolist(), 0, 0.0
        while size < top_k and (size == 0 or mass < top_p or top_p == 1):
            mass, size = mass + probs[size], size + 1
        sizes.append(size)
    return sizes


def expected_scores(bank, input_ids, scores, weights, top_k, top_p=1.0, brute_force=brute_force_values):
    """β·(V − mean V) over each row's set (its nucleus inside the top-k) added by `brute_force` (a function like
    `brute_force_values`); -inf elsewhere."""
    expected = torch.full_like(scores, -math.inf)
    heads = list(weights)
    beta = torch.tensor([weights[h] for h in heads])
    for row, size in enumerate(nucleus_sizes(scores, top_k, top_p)):
        top, candidates = scores[row:row + 1].topk(size, dim=-1)
        ids = input_ids[row:row + 1]
        values = brute_force(bank, ids, real_token_mask(ids, bank.tokenizer.pad_token_id), candidates, heads)
        bonus = torch.einsum("h,hbk->bk", beta, values - values.mean(-1, keepdim=True))
        expected[row].scatter_(-1, candidates[0], (top + bonus)[0])
    return expected


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp_path; returns `publish(folder, repo_id, commit, ref)`.

    `publish` lays a folder out as huggingface_hub caches a downloaded repo:
    models--org--name/blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<ref>.
    huggingface_hub reads HF_HOME / HF_HUB_OFFLINE into `constants` at import time and both it and
    transformers read the constants at call time, so the constants are patched as well as the environment.
    """
    import hashlib
    import os

    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def publish(folder, repo_id: str, commit: str = HUB_COMMIT, ref: str = "main"):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        for sub in ("blobs", f"snapshots/{commit}", "refs"):
            (repo / sub).mkdir(parents=True, exist_ok=True)
        for name in os.listdir(folder):
            data = (folder / name).read_bytes()
            blob = hashlib.sha256(data).hexdigest()
            (repo / "blobs" / blob).write_bytes(data)
            os.symlink(os.path.join("..", "..", "blobs", blob), repo / "snapshots" / commit / name)
        (repo / "refs" / ref).write_text(commit)

    return publish


def length_reward(prompts, completions):
    return [len(c) / 10 for c in completions]


def vowel_reward(prompts, completions):
    return [sum(ch in "aeiou" for ch in c) for c in completions]


def tiny_app_parts(examples):
    """What the slider app steers in the UI tests: a tiny Llama, two random heads, two rule rewards."""
    from valuemix.ui.logic import AppParts

    tok = build_tokenizer()
    return AppParts(build_model("llama", len(tok), seed=0), tok, make_bank(tok),
                    {"length": length_reward, "vowels": vowel_reward}, examples=list(examples))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (so that two test runs side by side never collide)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(world, **kwargs):
    """The slider app of `world` served on 127.0.0.1 at a free port, in a background thread; yields its URL."""
    from valuemix.ui.app import build_app

    app = build_app(world, **kwargs)
    port = free_port()
    app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()
