"""The slider app's logic (valuemix.ui.logic) on tiny models, without a browser."""

import pytest
import torch
from conftest import tiny_app_parts, vowel_reward
from valuemix.ui.logic import (
    KL_AXIS,
    MAX_NEW_TOKENS,
    AppParts,
    RequestError,
    axis_choices,
    default_axes,
    explain_step,
    first_divergence,
    load_preset,
    mix_from_query,
    mix_label,
    mix_to_query,
    parse_weights,
    record,
    run_mix,
    run_mix_once,
    save_preset,
    step_choices,
    trade_off_rows,
    validate_request,
)

import valuemix as vm
from valuemix.compose.candidates import VALUE_ATOL


@pytest.fixture(scope="module")
def parts():
    return tiny_app_parts(examples=["the cat sat"])


def ask(parts, weights, prompt="the cat sat on", tokens=12, seed=0):
    return validate_request(parts, prompt, weights, tokens, seed)


# --- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, weights, tokens, seed, message", [
    ("", {}, 8, 0, "The prompt is empty"),
    ("   ", {}, 8, 0, "The prompt is empty"),
    ("hi", {"polite": 1.0}, 8, 0, "Unknown head 'polite'. Heads in this app: helpful, concise."),
    ("hi", {"helpful": 11.0}, 8, 0, r"Coefficient 11.0 for head 'helpful' is outside its range \[-10.0, 10.0\]"),
    ("hi", {"helpful": -10.5}, 8, 0, "outside its range"),
    ("hi", {"helpful": float("nan")}, 8, 0, "must be a finite number"),
    ("hi", {"helpful": "lots"}, 8, 0, "must be a finite number"),
    ("hi", "{not json", 8, 0, "weights is not valid JSON"),
    ("hi", "[1, 2]", 8, 0, "weights must be an object"),
    ("hi", {}, MAX_NEW_TOKENS + 1, 0, "max_new_tokens must be between 1 and 256, got 257"),
    ("hi", {}, 0, 0, "max_new_tokens must be between 1 and 256"),
    ("hi", {}, 2.5, 0, "max_new_tokens must be a whole number"),
    ("hi", {}, 8, -1, "seed must be between 0"),
])
def test_bad_requests_get_a_clear_message(parts, prompt, weights, tokens, seed, message):
    with pytest.raises(RequestError, match=message):
        validate_request(parts, prompt, weights, tokens, seed)


def test_every_problem_of_a_request_is_listed_at_once(parts):
    with pytest.raises(RequestError) as err:
        validate_request(parts, "", {"polite": 1.0, "helpful": 99}, 1000, 0)
    assert len(str(err.value).splitlines()) == 4


def test_weights_from_json_or_dict_fill_every_head(parts):
    from_json = parse_weights(parts.bank, '{"helpful": 1.5}')
    assert from_json == parse_weights(parts.bank, {"helpful": 1.5}) == {"helpful": 1.5, "concise": 0.0}
    assert parse_weights(parts.bank, None) == parse_weights(parts.bank, "") == {"helpful": 0.0, "concise": 0.0}


def test_the_range_comes_from_the_head_config(parts):
    config = parts.bank.configs["concise"]
    old = config.beta_range
    config.beta_range = (-1.0, 2.0)
    try:
        assert parse_weights(parts.bank, {"concise": 2.0})["concise"] == 2.0
        with pytest.raises(RequestError, match=r"\[-1.0, 2.0\]"):
            parse_weights(parts.bank, {"concise": 3.0})
    finally:
        config.beta_range = old


# --- presets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [{"helpful": 1.5, "concise": -0.5}, {"helpful": 0.1 + 0.2, "concise": 0.0},
                                     {"helpful": 0.0, "concise": 0.0}, {"helpful": -10.0, "concise": 10.0}])
def test_a_mix_round_trips_through_a_query_string(parts, weights):
    query = mix_to_query(weights)
    assert mix_from_query(parts.bank, query) == weights


def test_query_string_format(parts):
    assert mix_to_query({"helpful": 1.5, "concise": -0.5}) == "?helpful=1.5&concise=-0.5"
    assert mix_to_query({"helpful": 0.0, "concise": 2.0}) == "?concise=2.0"
    assert mix_to_query({"helpful": 0.0}) == ""
    assert mix_from_query(parts.bank, "helpful=2") == {"helpful": 2.0, "concise": 0.0}


def test_a_page_query_ignores_keys_that_name_no_head_but_not_bad_values(parts):
    assert mix_from_query(parts.bank, {"__theme": "dark", "helpful": "1.5"}, strict=False)["helpful"] == 1.5
    with pytest.raises(RequestError, match="Unknown head '__theme'"):
        mix_from_query(parts.bank, "?__theme=dark")
    with pytest.raises(RequestError, match="outside its range"):
        mix_from_query(parts.bank, "?helpful=50", strict=False)


def test_presets_save_and_load_by_name(parts):
    presets = save_preset({}, " chatty ", {"helpful": 2.0, "concise": -1.0})
    presets = save_preset(presets, "terse", {"helpful": 0.0, "concise": 3.0})
    assert list(presets) == ["chatty", "terse"]
    assert load_preset(presets, "chatty") == {"helpful": 2.0, "concise": -1.0}
    with pytest.raises(RequestError, match="Give the preset a name"):
        save_preset(presets, "  ", {})
    with pytest.raises(RequestError, match="No preset named 'nope'; saved presets: chatty, terse"):
        load_preset(presets, "nope")


# --- generation -------------------------------------------------------------------------------------


def test_all_zero_mix_gives_the_base_reply(parts):
    outcome = run_mix_once(parts, ask(parts, {}, seed=3))
    assert outcome.mixed.text == outcome.base.text and outcome.mixed.token_ids == outcome.base.token_ids
    assert outcome.mixed.kl == outcome.base.kl == 0.0


def test_the_base_reply_is_the_top_k_reference_under_the_same_seed(parts):
    parts.base_cache.clear()
    outcome = run_mix_once(parts, ask(parts, {"helpful": 4.0}, seed=5))
    reference = vm.generate(parts.base, parts.tokenizer, ["the cat sat on"], vm.Mixer(parts.bank, {}),
                            max_new_tokens=12, seed=5)
    steered = vm.generate(parts.base, parts.tokenizer, ["the cat sat on"], vm.Mixer(parts.bank, {"helpful": 4.0}),
                          max_new_tokens=12, seed=5)
    assert outcome.base.text == reference.texts[0] and outcome.mixed.text == steered.texts[0]
    assert outcome.mixed.kl == pytest.approx(steered.kl[0]) and outcome.mixed.kl > 0
    assert outcome.mixed.text != outcome.base.text


def test_streaming_grows_both_texts_and_ends_with_the_outcome(parts):
    partials = list(run_mix(parts, ask(parts, {"concise": -3.0}, seed=1, prompt="a happy day")))
    outcome = partials[-1].outcome
    assert all(p.outcome is None for p in partials[:-1]) and len(partials) > 3
    for p in partials:
        assert outcome.base.text.startswith(p.base_text) and outcome.mixed.text.startswith(p.mixed_text)
    assert (partials[-1].base_text, partials[-1].mixed_text) == (outcome.base.text, outcome.mixed.text)


def test_every_reward_scores_both_replies(parts):
    outcome = run_mix_once(parts, ask(parts, {"helpful": 2.0}))
    for output in (outcome.base, outcome.mixed):
        assert output.rewards == {"length": len(output.text) / 10, "vowels": vowel_reward([], [output.text])[0]}
    summary = outcome.summary()
    assert summary["rewards"] == outcome.mixed.rewards and summary["kl"] == outcome.mixed.kl
    assert summary["base"]["text"] == outcome.base.text


def test_no_rewards_is_fine(parts):
    bare = AppParts(parts.base, parts.tokenizer, parts.bank)
    outcome = run_mix_once(bare, ask(bare, {"helpful": 1.0}))
    assert outcome.mixed.rewards == {} and outcome.mixed.kl >= 0
    assert default_axes(bare) == (KL_AXIS, "β helpful")


def test_a_failing_reward_is_named(parts):
    def broken(prompts, completions):
        raise ZeroDivisionError("oops")

    bad = AppParts(parts.base, parts.tokenizer, parts.bank, {"broken": broken})
    with pytest.raises(RuntimeError, match="Reward 'broken' failed: ZeroDivisionError: oops"):
        run_mix_once(bad, ask(bad, {}))


def test_the_base_reply_is_decoded_once_per_prompt_and_seed(parts):
    parts.base_cache.clear()
    first = run_mix_once(parts, ask(parts, {"helpful": 1.0}, seed=7))
    second = run_mix_once(parts, ask(parts, {"helpful": -1.0}, seed=7))
    assert second.base is first.base and len(parts.base_cache) == 1


# --- history ----------------------------------------------------------------------------------------


def test_history_grows_with_each_mix_and_keeps_one_base_per_prompt(parts):
    history = []
    for beta in (1.0, 2.0, -1.0):
        history = record(history, run_mix_once(parts, ask(parts, {"helpful": beta})))
    history = record(history, run_mix_once(parts, ask(parts, {"helpful": 1.0}, seed=1)))
    assert [p["kind"] for p in history] == ["base", "mix", "mix", "mix", "base", "mix"]
    assert [p["label"] for p in history if p["kind"] == "mix"] == ["helpful=1", "helpful=2", "helpful=-1",
                                                                   "helpful=1"]
    rows = trade_off_rows(history, KL_AXIS, "reward: length")
    assert [r["point"] for r in rows] == ["base", "tried", "tried", "tried", "base", "current"]
    assert rows[0]["x"] == 0.0 and rows[2]["x"] == history[2]["kl"]
    assert [r["x"] for r in trade_off_rows(history, "β helpful", KL_AXIS)][:4] == [0.0, 1.0, 2.0, -1.0]


def test_record_returns_a_new_list(parts):
    history = []
    assert record(history, run_mix_once(parts, ask(parts, {}))) and history == []


def test_axes(parts):
    assert axis_choices(parts) == [KL_AXIS, "reward: length", "reward: vowels", "β helpful", "β concise"]
    assert default_axes(parts) == (KL_AXIS, "reward: length")
    assert mix_label({"helpful": 1.5, "concise": 0.0}) == "helpful=1.5"
    assert mix_label({"helpful": 0.0}) == "base (all β = 0)"


# --- why this token ---------------------------------------------------------------------------------


def test_contributions_sum_to_final_minus_base_logit(parts):
    outcome = run_mix_once(parts, ask(parts, {"helpful": 2.5, "concise": -1.5}))
    for step in range(0, len(outcome.mixed.token_ids), 3):
        rows = explain_step(parts, outcome, step)
        assert len(rows) == parts.top_k
        for row in rows:
            total = sum(row["contributions"].values())
            assert row["final_logit"] - row["base_logit"] == pytest.approx(total, abs=VALUE_ATOL)
        assert [r["token_id"] for r in rows if r["chosen"]] == [outcome.mixed.token_ids[step]]
        assert [r["final_logit"] for r in rows] == sorted((r["final_logit"] for r in rows), reverse=True)
        assert sum(r["p_mixed"] for r in rows) == pytest.approx(1.0, abs=1e-5)


def test_contributions_are_centred_per_head_and_zero_for_heads_at_zero(parts):
    outcome = run_mix_once(parts, ask(parts, {"helpful": 3.0}))
    rows = explain_step(parts, outcome, 1)
    assert all(r["contributions"]["concise"] == 0.0 for r in rows)
    assert sum(r["contributions"]["helpful"] for r in rows) == pytest.approx(0.0, abs=VALUE_ATOL)


def test_the_base_logits_match_the_decoding(parts):
    outcome = run_mix_once(parts, ask(parts, {}))
    rows = explain_step(parts, outcome, 2)
    ids = parts.tokenizer("the cat sat on", return_tensors="pt")["input_ids"]
    prefix = torch.cat([ids, torch.tensor([outcome.mixed.token_ids[:2]])], dim=1)
    logits = parts.base(input_ids=prefix).logits[0, -1]
    assert [r["base_logit"] for r in rows] == pytest.approx(logits.topk(parts.top_k).values.tolist(), abs=1e-4)


def test_steps_outside_the_reply_are_refused(parts):
    outcome = run_mix_once(parts, ask(parts, {}, tokens=4))
    with pytest.raises(RequestError, match="not a step of the mixed reply"):
        explain_step(parts, outcome, len(outcome.mixed.token_ids))


def test_step_choices_and_first_divergence(parts):
    assert step_choices(parts.tokenizer, [2]) == [("0: '</s>'", 0)]
    assert first_divergence([5, 6, 7], [5, 6, 8]) == 2 and first_divergence([5], [5]) == 0


def test_a_world_becomes_app_parts_through_its_own_method(parts):
    from types import SimpleNamespace

    from valuemix.ui.logic import as_parts

    world = SimpleNamespace(app_parts=lambda top_k, top_p: AppParts(parts.base, parts.tokenizer, parts.bank,
                                                                     top_k=top_k, top_p=top_p))
    assert (as_parts(world, top_k=7, top_p=0.8).top_k, as_parts(world, top_k=7, top_p=0.8).top_p) == (7, 0.8)
    assert as_parts(parts) is parts


def test_the_app_steers_a_base_whose_tokenizer_is_not_the_backbones():
    """Cross-tokenizer heads in the app: replies and 'why this token' value the base's candidates as text."""
    from conftest import build_model, build_tokenizer, make_bank, vowel_reward

    from valuemix.heads.fingerprint import tokenizer_fingerprint

    base_tok = build_tokenizer(kind="unigram")
    bank = make_bank(build_tokenizer(kind="bpe", vocab_size=300))
    for head in bank.heads:  # as train_head(..., base_tokenizer=base_tok) records it
        bank.configs[head].base_tokenizer = tokenizer_fingerprint(base_tok)
    cross = AppParts(build_model("llama", len(base_tok), seed=0), base_tok, bank, {"vowels": vowel_reward})
    outcome = run_mix_once(cross, validate_request(cross, "the cat sat on", {"helpful": 4.0}, 8, 0))
    assert outcome.mixed.kl > 0 and outcome.base.kl == 0
    for step in range(len(outcome.mixed.token_ids)):
        rows = explain_step(cross, outcome, step)
        assert [r["token_id"] for r in rows if r["chosen"]] == [outcome.mixed.token_ids[step]]
        for row in rows:
            assert row["final_logit"] - row["base_logit"] == pytest.approx(row["contributions"]["helpful"],
                                                                           abs=VALUE_ATOL)
        assert sum(r["contributions"]["helpful"] for r in rows) == pytest.approx(0.0, abs=VALUE_ATOL)
