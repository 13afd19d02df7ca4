"""The reference VAS decoder (the benchmark's baseline) is faithful: it samples what Mixer(mask_outside_top_k=False) does."""

import pytest
import torch
from conftest import build_model, build_tokenizer, make_bank
from transformers import SuppressTokensLogitsProcessor

import valuemix as vm
from valuemix.compose.candidates import VALUE_ATOL
from valuemix.compose.reference import reference_generate
from valuemix.heads.tokens import encode_prompts, position_ids_from_mask

PROMPTS = ["hello world", "the cat sat on the mat and the dog"]  # different lengths: left padding


@pytest.mark.parametrize("beta", [0.0, 1.5, -2.0])
def test_reference_decoding_equals_the_mixer_that_keeps_tokens_outside_the_top_k(beta):
    """Same seed, same tokens at every step, and the same KL from the base per completion (the KL sums each
    step's whole mixed distribution, so equal KLs mean equal per-step logits up to the value tolerance)."""
    tok = build_tokenizer()
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok, heads=("helpful",))
    reference = reference_generate(base, tok, bank, "helpful", beta, PROMPTS, top_k=6, max_new_tokens=8, seed=3)
    mixer = vm.Mixer(bank, {"helpful": beta}, top_k=6, top_p=1.0, mask_outside_top_k=False)
    ours = vm.generate(base, tok, PROMPTS, mixer, max_new_tokens=8, seed=3)
    assert reference.token_ids == ours.token_ids
    assert reference.kl == pytest.approx(ours.kl, abs=8 * abs(beta) * VALUE_ATOL + 1e-6)
    assert (max(ours.kl) > 0.01) == (beta != 0)  # the mix really moved the distribution


@pytest.mark.parametrize("beta", [1.5, -2.0])
def test_reference_logits_equal_the_mixers_at_every_step_on_the_same_prefixes(beta):
    """Each step's mixed logits of the reference decoder equal Mixer(mask_outside_top_k=False)'s, called cold on the
    same prefix (prompt + the tokens sampled so far), up to the value tolerance (and float noise on the base logits)."""
    tok = build_tokenizer()
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok, heads=("helpful",))
    no_eos = SuppressTokensLogitsProcessor([tok.eos_token_id])  # every row stays alive for every step
    recorded = []
    reference = reference_generate(base, tok, bank, "helpful", beta, PROMPTS, top_k=6, max_new_tokens=6, seed=3,
                                   logits_processors=[no_eos], step_logits=recorded)
    mixer = vm.Mixer(bank, {"helpful": beta}, top_k=6, top_p=1.0, mask_outside_top_k=False)
    _, prompt_ids, prompt_mask = encode_prompts(tok, PROMPTS)
    generated = torch.tensor(reference.token_ids)
    assert len(recorded) == generated.shape[1] == 6
    for step, logits in enumerate(recorded):
        ids = torch.cat([prompt_ids, generated[:, :step]], dim=1)
        mask = torch.cat([prompt_mask, torch.ones_like(generated[:, :step])], dim=1)
        with torch.inference_mode():
            scores = base(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        expected = mixer(ids, no_eos(ids, scores.float()))
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(logits)), step
        torch.testing.assert_close(logits[finite], expected[finite], atol=abs(beta) * VALUE_ATOL + 1e-4, rtol=0)
