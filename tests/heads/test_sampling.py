"""Tests for valuemix.heads.sampling: sample_base and score."""

from __future__ import annotations

import copy
import logging
import math
import os

import datasets
import pytest
import torch
from conftest import build_model, build_tokenizer
from tokenizers.processors import TemplateProcessing

from valuemix.heads.sampling import SAMPLE_COLUMNS, sample_base, score

PROMPTS = ["hello world", "the cat sat on the mat and", "one two"]


def sample(base, tokenizer, prompts=PROMPTS, **kwargs):
    kwargs = {"n_per_prompt": 2, "max_new_tokens": 6, "progress": False, **kwargs}
    return sample_base(base, tokenizer, prompts, **kwargs)


def greedy(base, prompt_ids, max_new_tokens, eos_id):
    """Greedy completion of one unpadded prompt, cut after the first EOS."""
    out = base.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=eos_id)
    ids = out[0, len(prompt_ids):].tolist()
    return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids


@pytest.fixture
def eos_model(tokenizer):
    """A tiny llama whose LM head favours EOS (+3 logits), so some samples finish and some do not."""
    model = build_model("llama", len(tokenizer), seed=0)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 3.0
    model.lm_head = head
    return model


@pytest.fixture
def counting(monkeypatch):
    """Wrap base.generate so a test can count its calls."""
    def wrap(base):
        calls = []
        original = base.generate
        monkeypatch.setattr(base, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
        return calls
    return wrap


# --- sample_base: shape and content -------------------------------------------------------------


def test_rows_and_columns(base_model, tokenizer):
    ds = sample(base_model, tokenizer, n_per_prompt=3)
    assert len(ds) == len(PROMPTS) * 3
    assert tuple(ds.column_names) == SAMPLE_COLUMNS
    assert ds["prompt_index"] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    assert ds["prompt"] == [PROMPTS[i] for i in ds["prompt_index"]]


def test_completion_ids_end_at_first_eos(eos_model, tokenizer):
    eos = tokenizer.eos_token_id
    ds = sample(eos_model, tokenizer, n_per_prompt=8, max_new_tokens=16)
    assert 0 < sum(ds["finished"]) < len(ds)  # the fixture gives both kinds
    for row in ds:
        ids = row["completion_ids"]
        assert eos not in ids[:-1]
        assert row["finished"] == (ids[-1] == eos)
        if not row["finished"]:
            assert len(ids) == 16


def test_completion_is_decoded_completion_ids(eos_model, tokenizer):
    ds = sample(eos_model, tokenizer, n_per_prompt=4, max_new_tokens=16)
    assert ds["completion"] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in ds["completion_ids"]]


def test_prompt_ids_are_the_tokenizer_encoding(base_model, tokenizer):
    ds = sample(base_model, tokenizer)
    assert ds["prompt_ids"] == [tokenizer(p)["input_ids"] for p in ds["prompt"]]


def test_prompt_ids_keep_special_tokens_the_tokenizer_adds(base_model):
    tokenizer = build_tokenizer()
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    ds = sample(base_model, tokenizer)
    assert all(ids[0] == tokenizer.bos_token_id for ids in ds["prompt_ids"])
    assert ds["prompt_ids"] == [tokenizer(p)["input_ids"] for p in ds["prompt"]]


def test_chat_template_formats_prompt_ids(base_model, tokenizer):
    ds = sample(base_model, tokenizer, chat_template=True)
    for row in ds:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                             add_generation_prompt=True, tokenize=False)
        assert row["prompt_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(row["prompt_ids"]).endswith("assistant:")


def test_settings_recorded_per_row(base_model, tokenizer):
    ds = sample(base_model, tokenizer, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    assert set(ds["temperature"]) == {0.7} and set(ds["top_k"]) == {5} and set(ds["top_p"]) == {0.9}
    assert set(ds["seed"]) == {3} and set(ds["max_new_tokens"]) == {6}
    assert set(ds["base_model"]) == {"LlamaForCausalLM"}


# --- sample_base: the distribution --------------------------------------------------------------


def test_same_seed_same_samples(base_model, tokenizer):
    assert sample(base_model, tokenizer, seed=1).to_list() == sample(base_model, tokenizer, seed=1).to_list()


def test_different_seed_different_samples(base_model, tokenizer):
    one, two = sample(base_model, tokenizer, seed=1), sample(base_model, tokenizer, seed=2)
    assert one["completion_ids"] != two["completion_ids"]


def test_seed_does_not_touch_global_rng(base_model, tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample(base_model, tokenizer)
    assert torch.equal(torch.rand(3), expected)


def test_low_temperature_is_greedy(family, tokenizer):
    base = build_model(family, len(tokenizer), seed=0)
    # 1e-6: this tiny gpt2 has a near-tie of 9e-5 logits that 1e-4 would sample either way
    ds = sample(base, tokenizer, temperature=1e-6, max_new_tokens=8)  # prompts of different lengths: left padding
    for row in ds:
        assert row["completion_ids"] == greedy(base, row["prompt_ids"], 8, tokenizer.eos_token_id)


def test_model_generation_config_does_not_truncate(base_model, tokenizer):
    base_model.generation_config.top_k = 1  # would make every sample the greedy one
    ds = sample(base_model, tokenizer, prompts=["hello world"], n_per_prompt=4)
    assert len(set(map(tuple, ds["completion_ids"]))) > 1


# --- sample_base: cache -------------------------------------------------------------------------


def test_cache_hit_skips_generate(base_model, tokenizer, tmp_path, counting, caplog):
    calls = counting(base_model)
    first = sample(base_model, tokenizer, cache_dir=tmp_path)
    n_calls = len(calls)
    with caplog.at_level(logging.INFO, logger="valuemix.heads.sampling"):
        second = sample(base_model, tokenizer, cache_dir=tmp_path)
    assert len(calls) == n_calls > 0
    assert second.to_list() == first.to_list()
    assert "cache hit" in caplog.text


def test_cache_leaves_one_entry_per_run(base_model, tokenizer, tmp_path):
    sample(base_model, tokenizer, cache_dir=tmp_path)
    sample(base_model, tokenizer, cache_dir=tmp_path)
    sample(base_model, tokenizer, cache_dir=tmp_path, seed=5)
    assert len(os.listdir(tmp_path)) == 2
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))


def test_cache_misses_when_weights_change(base_model, tokenizer, tmp_path, counting):
    calls = counting(base_model)
    sample(base_model, tokenizer, cache_dir=tmp_path)
    n_calls = len(calls)
    with torch.no_grad():
        base_model.lm_head.weight.mul_(2.0)
    sample(base_model, tokenizer, cache_dir=tmp_path)
    assert len(calls) == 2 * n_calls


def test_failed_save_leaves_no_cache(base_model, tokenizer, tmp_path, monkeypatch):
    def crash(self, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "half-written.arrow"), "w").close()
        raise OSError("disk full")
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash)
    with pytest.raises(OSError, match="disk full"):
        sample(base_model, tokenizer, cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


# --- sample_base: errors ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": ["fine", "  \n"]}, "prompt 1 is empty or whitespace-only"),
    ({"prompts": "hello"}, "not one string"),
    ({"n_per_prompt": 0}, "n_per_prompt must be at least 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
])
def test_bad_arguments_rejected(base_model, tokenizer, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        sample(base_model, tokenizer, **kwargs)


def test_tokenizer_without_pad_rejected(base_model, tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match=r"set tokenizer.pad_token = tokenizer.eos_token"):
        sample(base_model, no_pad)


def test_foreign_tokenizer_rejected(tokenizer):
    small = build_model("llama", 100, seed=0)
    with pytest.raises(ValueError, match="does not belong to model LlamaForCausalLM"):
        sample(small, tokenizer)


# --- score --------------------------------------------------------------------------------------


def length_reward(prompts, completions):
    return [float(len(p) + 10 * len(c)) for p, c in zip(prompts, completions)]


@pytest.fixture
def samples(base_model, tokenizer):
    return sample(base_model, tokenizer, n_per_prompt=3)


def test_score_adds_reward_columns_in_row_order(samples):
    scored = score(samples, {"length": length_reward, "neg": lambda p, c: [-x for x in length_reward(p, c)]},
                   batch_size=4, progress=False)
    expected = length_reward(samples["prompt"], samples["completion"])
    assert scored["length"] == expected
    assert scored["neg"] == [-x for x in expected]
    assert scored.column_names == samples.column_names + ["length", "neg"]


@pytest.mark.parametrize("batch_size", [1, 4, 1000])
def test_score_batching_invariant(samples, batch_size):
    scored = score(samples, {"length": length_reward}, batch_size=batch_size, progress=False)
    assert scored["length"] == length_reward(samples["prompt"], samples["completion"])


def test_score_calls_reward_in_batches(samples):
    sizes = []
    score(samples, {"r": lambda p, c: sizes.append(len(p)) or [0.0] * len(p)}, batch_size=4, progress=False)
    assert sizes == [4, 4, 1]


def test_score_replaces_same_name_column(samples):
    once = score(samples, {"r": lambda p, c: [1.0] * len(p)}, progress=False)
    twice = score(once, {"r": lambda p, c: [2.0] * len(p)}, progress=False)
    assert twice.column_names == once.column_names
    assert set(twice["r"]) == {2.0}


def test_score_accepts_tensors(samples):
    scored = score(samples, {"r": lambda p, c: torch.arange(len(p), dtype=torch.float32)}, batch_size=4, progress=False)
    assert scored["r"] == [0.0, 1.0, 2.0, 3.0] * 2 + [0.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_score_rejects_non_finite_value_naming_row(samples, bad):
    def reward(prompts, completions):
        return [bad if prompts[i] == PROMPTS[1] else 0.0 for i in range(len(prompts))]
    row = samples["prompt"].index(PROMPTS[1])
    with pytest.raises(ValueError, match=rf"reward 'helpful' returned {bad!r} for row {row} \(prompt "
                                         rf"'{PROMPTS[1]}', .*rewards must be finite numbers"):
        score(samples, {"helpful": reward}, batch_size=4, progress=False)


def test_score_rejects_wrong_length(samples):
    with pytest.raises(ValueError, match="reward 'short' returned 3 values for a batch of 4 completions"):
        score(samples, {"short": lambda p, c: [0.0] * 3}, batch_size=4, progress=False)


def test_score_rejects_column_name_clash(samples):
    with pytest.raises(ValueError, match="reward name 'completion' clashes with a sample column"):
        score(samples, {"completion": length_reward}, progress=False)


def test_score_rejects_empty_rewards(samples):
    with pytest.raises(ValueError, match="rewards is empty"):
        score(samples, {}, progress=False)
