"""A forward of one head's rows runs a copy of the backbone with that head's LoRA merged into its weights."""

import pytest
import torch
from conftest import FAMILIES, build_tokenizer, make_bank

from valuemix.compose.candidates import VALUE_ATOL
from valuemix.heads.bank import MergedDecoder

PROMPTS = ["hello world", "the cat sat on the mat and the dog"]  # different lengths: left padding
MERGED_RTOL = 1e-4  # x(W + BA) rounds differently from xW + (xA)B; these random heads' values are of order 1


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def values_alone(bank, enc, head, runs=MergedDecoder.AFTER):
    """V_head of every prefix from `runs` forwards of that head alone (the last one merged), and the merged copy."""
    with torch.inference_mode():
        for _ in range(runs):
            values = bank.values(enc.input_ids, enc.attention_mask, heads=[head])[0]
    return values, bank._merged.decoder if bank._merged.head == head else None


def unmerged_values(bank, enc, head):
    bank.merge_single_head = False
    try:
        with torch.inference_mode():
            return bank.values(enc.input_ids, enc.attention_mask, heads=[head])[0]
    finally:
        bank.merge_single_head = True


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora_layers", [None, {"b": 1}], ids=["full-depth", "shared-trunk"])
def test_merged_values_equal_peft_lora_path(tok, family, lora_layers):
    bank = make_bank(tok, family, heads=("a", "b"), layers=3, lora_layers=lora_layers)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    real = enc.attention_mask.bool()
    for head in ("a", "b"):
        expected = unmerged_values(bank, enc, head)
        merged_values, merged = values_alone(bank, enc, head)
        assert merged is not None, "the merged copy is made once a head has run alone AFTER times"
        torch.testing.assert_close(merged_values[real], expected[real], atol=VALUE_ATOL, rtol=MERGED_RTOL)
        assert not (merged_values[real] == unmerged_values(bank, enc, "b" if head == "a" else "a")[real]).all()


def test_merged_copy_shares_every_tensor_but_the_heads_lora_weights(tok):
    bank = make_bank(tok, "llama", heads=("a", "b"), layers=3, lora_layers={"b": 1})
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    source = {t.data_ptr() for t in bank.decoder.parameters()}
    for head, merged_layers in (("a", 3), ("b", 1)):
        _, merged = values_alone(bank, enc, head)
        new = [name for name, p in merged.named_parameters() if p.data_ptr() not in source]
        assert len(new) == 7 * merged_layers  # q, k, v, o, gate, up, down of each layer with the head's LoRA
        assert all(name.endswith("proj.weight") for name in new)
        assert not any("lora_" in name for name, _ in merged.named_parameters())


def test_changed_lora_remerges(tok):
    """Training or set_head_state changes a head's LoRA: the next merged forward uses the new weights."""
    bank = make_bank(tok, "llama", heads=("a",), layers=2)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    real = enc.attention_mask.bool()
    before, first = values_alone(bank, enc, "a")
    state = bank.head_state("a")
    state = {k: v * 1.5 if "lora_B" in k else v for k, v in state.items()}
    bank.set_head_state("a", state)
    after, second = values_alone(bank, enc, "a", runs=1)  # merged again at once: "a" still runs alone
    assert second is first
    torch.testing.assert_close(after[real], unmerged_values(bank, enc, "a")[real], atol=VALUE_ATOL, rtol=MERGED_RTOL)
    assert (after[real] - before[real]).abs().max() > 100 * VALUE_ATOL


def test_no_merge_while_training_mixing_or_alternating(tok):
    bank = make_bank(tok, "llama", heads=("a", "b"), layers=2)
    assert torch.is_grad_enabled()
    assert all(bank.merged_decoder("a") is None for _ in range(MergedDecoder.AFTER + 1))  # gradients must reach the LoRA
    with torch.no_grad():
        for _ in range(MergedDecoder.AFTER + 1):  # alternating heads make no copies
            assert bank.merged_decoder("a") is None and bank.merged_decoder("b") is None
        assert [bank.merged_decoder("a") is None for _ in range(MergedDecoder.AFTER)] == [True] * (MergedDecoder.AFTER - 1) \
            + [False]
        model, routing = bank._routing(["a", "b"])  # a mixed batch: peft's mixed-adapter routing
        assert model is bank.model and routing == {"adapter_names": ["a", "b"]}
        bank.merge_single_head = False
        assert all(bank.merged_decoder("a") is None for _ in range(MergedDecoder.AFTER + 1))
