"""The reference VAS decoder (the benchmark's baseline) is faithful: it samples what Mixer(mask_outside_top_k=False) does."""

import pytest
from conftest import build_model, build_tokenizer, make_bank

import valuemix as vm
from valuemix.compose.candidates import VALUE_ATOL
from valuemix.compose.reference import reference_generate

PROMPTS = ["hello world", "the cat sat on the mat and the dog"]  # different lengths: left padding


@pytest.mark.parametrize("beta", [0.0, 1.5, -2.0])
def test_reference_decoding_equals_the_mixer_that_keeps_tokens_outside_the_top_k(beta):
    """Same seed, same tokens at every step, and the same KL from the base per completion (the KL sums each
    step's whole mixed distribution, so equal KLs mean equal per-step logits up to the value tolerance)."""
    tok = build_tokenizer()
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok, heads=("helpful",))
    reference = reference_generate(base, tok, bank, "helpful", beta, PROMPTS, top_k=6, max_new_tokens=8, seed=3)
    mixer = vm.Mixer(bank, {"helpful": beta}, top_k=6, mask_outside_top_k=False)
    ours = vm.generate(base, tok, PROMPTS, mixer, max_new_tokens=8, seed=3)
    assert reference.token_ids == ours.token_ids
    assert reference.kl == pytest.approx(ours.kl, abs=8 * abs(beta) * VALUE_ATOL + 1e-6)
    assert (max(ours.kl) > 0.01) == (beta != 0)  # the mix really moved the distribution
