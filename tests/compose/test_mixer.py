"""The mixer: exact base top-k at β = 0, brute-force equality of the added values, purity, errors."""

import math

import pytest
import torch
from conftest import (Recorder, assert_same_mix, build_model, build_tokenizer, expected_scores, make_bank,
                      nucleus_sizes, run_generate)
from transformers import LogitsProcessor, TopKLogitsWarper

import valuemix as vm
from valuemix.heads.fingerprint import tokenizer_fingerprint
from valuemix.compose.candidates import VALUE_ATOL
from valuemix.heads.tokens import real_token_mask

PROMPTS = ["hello world", "the cat sat on the mat and the dog"]  # different lengths: left padding


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_zero_coefficients_give_the_base_top_k_scores_exactly(tok):
    bank = make_bank(tok)
    mixer = vm.Mixer(bank, {"helpful": 0.0, "concise": 0.0}, top_k=7, top_p=1.0)
    scores = torch.randn(3, len(tok))
    out = mixer(torch.randint(3, len(tok), (3, 5)), scores)
    expected = TopKLogitsWarper(top_k=7)(None, scores.clone())
    assert torch.equal(out, expected)


def test_zero_coefficients_sample_exactly_like_base_top_k(tok):
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok)
    mixer = vm.Mixer(bank, {"helpful": 0.0}, top_k=5, top_p=1.0)
    mixed = vm.generate(base, tok, PROMPTS, mixer, max_new_tokens=10, seed=3)
    plain = vm.generate(base, tok, PROMPTS, None, max_new_tokens=10, seed=3,
                        logits_processors=[TopKLogitsWarper(top_k=5)])
    assert mixed.token_ids == plain.token_ids
    assert mixed.kl == [0.0, 0.0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_added_logits_equal_brute_force_inside_generate(tok, family):
    base, bank = build_model(family, len(tok), seed=0), make_bank(tok, family)
    weights = {"helpful": 1.5, "concise": -0.7}
    recorder = Recorder(vm.Mixer(bank, weights, top_k=6, top_p=1.0))
    run_generate(base, tok, recorder, new_tokens=5)
    assert len(recorder.calls) == 5
    for input_ids, scores, out in recorder.calls:
        assert_same_mix(out, expected_scores(bank, input_ids, scores, weights, 6))


class Sharpen(LogitsProcessor):
    """Scales the scores so that a random tiny model is as confident as an instruction model on some steps."""

    def __call__(self, input_ids, scores):
        return scores * 40.0


def test_adaptive_sets_equal_brute_force_with_sizes_that_differ_by_row_and_step(tok):
    """top_p: each row's candidates are its own nucleus inside the top-k; values and the mean over the set
    are the brute-force ones, at every step of a real generate, with left padding."""
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok)
    weights = {"helpful": 1.5, "concise": -0.7}
    recorder = Recorder(vm.Mixer(bank, weights, top_k=6, top_p=0.8))
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    base.generate(**enc, logits_processor=[Sharpen(), recorder], do_sample=True, max_new_tokens=12, top_k=None,
                  pad_token_id=tok.pad_token_id)
    sizes = [nucleus_sizes(scores, 6, 0.8) for _, scores, _ in recorder.calls]
    assert any(len(set(step)) > 1 for step in sizes)  # rows of one step differ
    assert {1, 2, 3} <= {s for step in sizes for s in step}  # singletons and sets of several sizes
    for (input_ids, scores, out), step in zip(recorder.calls, sizes):
        assert torch.isfinite(out).sum(-1).tolist() == step
        assert_same_mix(out, expected_scores(bank, input_ids, scores, weights, 6, top_p=0.8))


def test_steps_where_every_set_is_one_token_run_no_value_forward(tok, monkeypatch):
    """A confident step values nothing; its token reaches the value cache with the next step that values."""
    bank = make_bank(tok)
    bank.tree_masks_ok = True  # as the first scoring finds for Llama (its check runs extra forwards)
    weights = {"helpful": 2.0}
    mixer = vm.Mixer(bank, weights, top_k=5, top_p=0.9)
    fed = []
    original = bank.forward_hidden
    monkeypatch.setattr(bank, "forward_hidden", lambda ids, *args, **kw: fed.append(ids.shape) or original(ids, *args,
                                                                                                            **kw))
    confident, unsure = torch.zeros(2, len(tok)), torch.zeros(2, len(tok))
    confident[:, 11] = 30.0  # one token holds all but e^-30 of the mass in both rows
    unsure[1, 11] = 30.0  # row 0 is flat (5 candidates), row 1 still a single token
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    steps = [(ids, unsure), (torch.cat([ids, torch.tensor([[11], [11]])], 1), confident),
             (torch.cat([ids, torch.tensor([[11, 11], [11, 11]])], 1), unsure)]
    outs = [mixer(step_ids, scores) for step_ids, scores in steps]
    assert fed == [(2, 3 + 5), (2, 2 + 5)]  # nothing at the confident step; then its token and the new one
    assert torch.equal(outs[1], mixer.reference(confident)) and torch.isfinite(outs[1]).sum().item() == 2
    for (step_ids, scores), out in zip(steps, outs):
        assert torch.isfinite(out).sum(-1).tolist() == nucleus_sizes(scores, 5, 0.9)
        assert_same_mix(out, expected_scores(bank, step_ids, scores, weights, 5, top_p=0.9))


def test_top_p_one_is_plain_top_k(tok):
    bank = make_bank(tok)
    scores = torch.randn(2, len(tok), generator=torch.Generator().manual_seed(0))  # no ties
    scores[:, 3] = 200.0  # float32 rounds this token's probability to exactly 1
    ids = torch.tensor([[5, 6], [7, 8]])
    assert torch.equal(vm.Mixer(bank, {}, top_k=4, top_p=1.0)(ids, scores),
                       TopKLogitsWarper(top_k=4)(None, scores.clone()))
    mixed = vm.Mixer(bank, {"helpful": 1.0}, top_k=4, top_p=1.0)(ids, scores)
    assert torch.isfinite(mixed).sum(-1).tolist() == [4, 4]  # all four valued, though one holds all the mass
    assert torch.isfinite(vm.Mixer(bank, {"helpful": 1.0}, top_k=4)(ids, scores)).sum(-1).tolist() == [1, 1]


def test_cold_call_equals_warm_call(tok):
    """The mixer is a pure function up to VALUE_ATOL: a fresh mixer, or one whose cache holds another sequence,
    gives the same candidates and values as the warm call inside generate (not bit for bit: cached and cold
    forwards round differently on some CPUs)."""
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok)
    weights = {"helpful": 2.0}
    recorder = Recorder(vm.Mixer(bank, weights, top_k=6))
    run_generate(base, tok, recorder, new_tokens=4)
    input_ids, scores, warm = recorder.calls[-1]
    assert_same_mix(vm.Mixer(bank, weights, top_k=6)(input_ids, scores), warm)
    busy = recorder.mixer  # its cache now holds the last step; feed it an unrelated shorter sequence first
    busy(input_ids[:, :3], scores)
    assert_same_mix(busy(input_ids, scores), warm)


def test_cache_expansion_fallback_agrees_with_brute_force(tok):
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok)
    bank.tree_masks_ok = False  # as for an architecture that rejects custom 4D masks
    weights = {"helpful": 1.0, "concise": 0.5}
    recorder = Recorder(vm.Mixer(bank, weights, top_k=4, top_p=1.0))
    run_generate(base, tok, recorder, new_tokens=3)
    for input_ids, scores, out in recorder.calls:
        assert_same_mix(out, expected_scores(bank, input_ids, scores, weights, 4))


def test_first_scoring_detects_that_tree_masks_work(tok):
    bank = make_bank(tok)
    vm.Mixer(bank, {"helpful": 1.0}, top_k=3)(torch.tensor([[5, 6, 7]]), torch.randn(1, len(tok)))
    assert bank.tree_masks_ok is True


def test_outside_top_k_left_unchanged_when_asked(tok):
    bank = make_bank(tok)
    scores = torch.randn(2, len(tok))
    mixer = vm.Mixer(bank, {"helpful": 3.0}, top_k=5, top_p=1.0, mask_outside_top_k=False)
    out = mixer(torch.tensor([[5, 6], [7, 8]]), scores)
    top = scores.topk(5).indices
    outside = torch.ones_like(scores, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(out[outside], scores[outside])
    assert not torch.equal(out.gather(-1, top), scores.gather(-1, top))


def test_set_weights_changes_the_mix_without_reloading(tok):
    bank = make_bank(tok)
    mixer = vm.Mixer(bank, {"helpful": 1.0}, top_k=5)
    ids, scores = torch.tensor([[5, 6, 7]]), torch.randn(1, len(tok))
    steered = mixer(ids, scores)
    mixer.set_weights({"helpful": 0.0})
    assert torch.equal(mixer(ids, scores), mixer.reference(scores))
    mixer.set_weights({"helpful": 2.0})
    bonus = mixer(ids, scores) - mixer.reference(scores)
    finite = torch.isfinite(bonus)
    torch.testing.assert_close(bonus[finite], 2 * (steered - mixer.reference(scores))[finite],
                               atol=2 * VALUE_ATOL, rtol=0)  # β doubled: so is the tolerance


@pytest.mark.parametrize("weights, top_k, error, message", [
    ({"helpfull": 1.0}, 20, KeyError, "Unknown head 'helpfull'. Heads on this bank: 'helpful', 'concise'"),
    ({"helpful": 50.0}, 20, ValueError, r"Coefficient 50.0 for head 'helpful' is outside its range \[-10.0, 10.0\]"),
    ({"helpful": float("nan")}, 20, ValueError, "must be a finite number, got nan"),
    ({}, 0, ValueError, "top_k must be a positive integer"),
], ids=["unknown head", "out of range", "nan", "top_k 0"])
def test_bad_weights_get_a_clear_error(tok, weights, top_k, error, message):
    with pytest.raises(error, match=message):
        vm.Mixer(make_bank(tok), weights, top_k=top_k)


@pytest.mark.parametrize("top_p", [0, 1.5, float("nan"), "0.9", True])
def test_bad_top_p_gets_a_clear_error(tok, top_p):
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\] \(got .*\): 1.0 values all top_k"):
        vm.Mixer(make_bank(tok), {}, top_p=top_p)


def test_another_base_tokenizer_values_text(tok):
    """Given the base's tokenizer, a mixer whose backbone tokenizes otherwise values text (tests/compose/
    test_cross_tokenizer.py); without it, generate refuses the other tokenizer (test_generate)."""
    bank, other = make_bank(tok), build_tokenizer(vocab_size=300)
    assert not vm.Mixer(bank, {"helpful": 1.0}, tokenizer=tok).cross_tokenizer
    with pytest.raises(ValueError, match=r"Head 'helpful' was made for bases with the backbone's own tokenizer, not "
                                         r"for .*: train a cross-tokenizer head on this base's samples with "
                                         r"train_head\(bank, name, samples, reward, base_tokenizer=base_tokenizer\)"):
        vm.Mixer(bank, {"helpful": 1.0}, tokenizer=other)
    bank.configs["helpful"].base_tokenizer = tokenizer_fingerprint(other)
    assert vm.Mixer(bank, {"helpful": 1.0}, tokenizer=other).cross_tokenizer
