"""valuemix's own decoding loop: streaming, exact KL, EOS per row, and errors."""

import math

import pytest
import torch
from conftest import build_model, build_tokenizer, make_bank

import valuemix as vm
from valuemix.compose.generate import step_kl

PROMPTS = ["hello world", "the cat sat on the mat"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_step_kl_equals_the_definition():
    generator = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(3, 9, generator=generator), torch.randn(3, 9, generator=generator)
    p_logits[:, 6:] = q_logits[:, 6:] = -math.inf  # masked tokens on both sides
    p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
    expected = torch.tensor([sum(p[b, a] * math.log(p[b, a] / q[b, a]) for a in range(6)) for b in range(3)])
    torch.testing.assert_close(step_kl(p_logits, q_logits), expected.float())


def test_kl_is_the_sum_of_step_kls_of_the_sampled_path(tok):
    """Recompute the mixed and reference distributions along the generated tokens with a cold mixer."""
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok)
    mixer = vm.Mixer(bank, {"helpful": 2.0, "concise": -1.0}, top_k=6)
    out = vm.generate(base, tok, PROMPTS[:1], mixer, max_new_tokens=5, seed=0, temperature=0.7)
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    total = 0.0
    for token in out.token_ids[0]:
        scores = base(ids).logits[:, -1].float()
        cold = vm.Mixer(bank, mixer.weights, top_k=6)
        total += step_kl(cold(ids, scores) / 0.7, cold.reference(scores) / 0.7).item()
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert out.kl[0] == pytest.approx(total, rel=1e-4)
    assert out.kl[0] > 0


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_kl_is_the_sum_of_step_kls_over_variable_sets(tok, top_p):
    """With adaptive sets (sizes changing by row and step), the loop's KL is the brute-force KL of softmax over
    the mixed set against the base truncated to the same set, summed along the sampled path."""
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok)
    sharpen = lambda ids, scores: scores * 40.0  # noqa: E731  (a confident base: sets of 1 to k tokens)
    mixer = vm.Mixer(bank, {"helpful": 2.0}, top_k=6, top_p=top_p)
    out = vm.generate(base, tok, PROMPTS, mixer, max_new_tokens=8, seed=1, logits_processors=[sharpen])
    for row, prompt in enumerate(PROMPTS):
        ids = tok([prompt], return_tensors="pt").input_ids
        total, sizes = 0.0, set()
        for token in out.token_ids[row]:
            scores = sharpen(ids, base(ids).logits[:, -1].float())
            top = scores.topk(6).values[0]
            probs = torch.softmax(scores[0], -1).sort(descending=True).values
            size = 6 if top_p == 1 else min(6, int((probs.cumsum(0) < top_p).sum()) + 1)
            sizes.add(size)
            values = bank.values(torch.cat([ids.repeat(size, 1), scores.topk(size).indices.T], 1), heads=["helpful"])
            values = values[0, :, -1]
            mixed = top[:size] + 2.0 * (values - values.mean())
            p, q = torch.log_softmax(mixed, -1), torch.log_softmax(top[:size], -1)
            total += float((p.exp() * (p - q)).sum())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert out.kl[row] == pytest.approx(total, rel=1e-3, abs=1e-5)
        assert top_p == 1 or len(sizes) > 1


def test_zero_coefficients_with_adaptive_sets_sample_the_truncated_base(tok):
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok)
    sharpen = lambda ids, scores: scores * 40.0  # noqa: E731
    mixer = vm.Mixer(bank, {"helpful": 0.0}, top_k=6, top_p=0.7)
    mixed = vm.generate(base, tok, PROMPTS, mixer, max_new_tokens=10, seed=3, logits_processors=[sharpen])
    reference = lambda ids, scores: mixer.reference(scores)  # noqa: E731
    plain = vm.generate(base, tok, PROMPTS, None, max_new_tokens=10, seed=3, logits_processors=[sharpen, reference])
    assert mixed.token_ids == plain.token_ids
    assert mixed.kl == [0.0, 0.0]


def test_streamed_pieces_add_up_to_the_texts(tok):
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok)
    mixer = vm.Mixer(bank, {"helpful": 1.0}, top_k=8)
    stream = vm.generate(base, tok, PROMPTS, mixer, max_new_tokens=12, seed=4, stream=True)
    assert stream.result is None
    pieces = list(stream)
    whole = vm.generate(base, tok, PROMPTS, mixer, max_new_tokens=12, seed=4)
    for row in range(len(PROMPTS)):
        assert "".join(p.text for p in pieces if p.row == row) == stream.result.texts[row] == whole.texts[row]


def test_generate_matches_transformers_generate_token_for_token(tok):
    """Greedy decoding with the mixer in our loop and in `model.generate` picks the same tokens."""
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok)
    mixer = vm.Mixer(bank, {"helpful": 3.0}, top_k=8)
    ours = vm.generate(base, tok, PROMPTS, mixer, max_new_tokens=8, do_sample=False)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    theirs = base.generate(**enc, logits_processor=[mixer], do_sample=False, max_new_tokens=8,
                           pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    for row, tokens in enumerate(ours.token_ids):
        assert tokens == theirs[row, :len(tokens)].tolist()


def test_rows_stop_at_their_own_eos(tok):
    base = build_model("llama", len(tok), seed=0)

    def favour_eos(input_ids, scores):  # a logits processor: EOS becomes likely but not certain
        scores[:, tok.eos_token_id] = scores.max(-1).values
        return scores

    out = vm.generate(base, tok, PROMPTS * 4, None, max_new_tokens=30, seed=0, logits_processors=[favour_eos])
    lengths = [len(t) for t in out.token_ids]
    assert all(tokens[-1] == tok.eos_token_id or len(tokens) == 30 for tokens in out.token_ids)
    assert all(tok.eos_token_id not in tokens[:-1] for tokens in out.token_ids)  # nothing after a row's EOS
    assert len(set(lengths)) > 1


@pytest.mark.parametrize("prompts, settings, other_tokenizer, message", [
    (["hi", "  "], {}, False, "Prompt 1 is empty"),
    ([], {}, False, "No prompts given"),
    (["hi"], {"max_new_tokens": 0}, False, "max_new_tokens must be at least 1"),
    (["hi"], {}, True, "Tokenizer mismatch"),
], ids=["empty prompt", "no prompts", "no new tokens", "other tokenizer"])
def test_bad_input_gets_a_clear_error(tok, prompts, settings, other_tokenizer, message):
    base, mixer = build_model("llama", len(tok)), vm.Mixer(make_bank(tok), {"helpful": 1.0})
    with pytest.raises(ValueError, match=message):
        vm.generate(base, build_tokenizer(vocab_size=300) if other_tokenizer else tok, prompts, mixer, **settings)
