"""Shared-trunk heads: LoRA on the top layers only; the layers below run once per sequence for all of them."""

import json

import pytest
import torch
from conftest import FAMILIES, Recorder, assert_same_mix, build_model, build_tokenizer, expected_scores, make_bank, \
    run_generate

import valuemix as vm
from valuemix.compose.candidates import VALUE_ATOL
from valuemix.heads.tokens import position_ids_from_mask

PROMPTS = ["hello world", "the cat sat on the mat and the dog"]  # different lengths: left padding
HEADS = ("full", "top2", "top2b", "top1")  # LoRA on every layer, on the top 2 (two heads), on the top layer
LORA_LAYERS = {"top2": 2, "top2b": 2, "top1": 1}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def shared_bank(tok, family="llama"):
    return make_bank(tok, family, heads=HEADS, layers=4, lora_layers=LORA_LAYERS)


def one_whole_forward(bank, head, input_ids, attention_mask):
    """V_head of every prefix by peft's own forward of every layer with that head active (no trunk sharing)."""
    bank.model.set_adapter(head, inference_mode=True)
    hidden = bank.model(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
    return bank.project(hidden[None], [head])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_depth_values_equal_whole_forwards_one_head_at_a_time(tok, family):
    bank = shared_bank(tok, family)
    assert [bank.lora_start(h) for h in HEADS] == [0, 2, 2, 3]
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    together = bank.values(enc.input_ids, enc.attention_mask)
    real = enc.attention_mask.bool()
    for i, head in enumerate(HEADS):
        alone = one_whole_forward(bank, head, enc.input_ids, enc.attention_mask)
        torch.testing.assert_close(together[i][real], alone[real], atol=VALUE_ATOL, rtol=0)
    assert bank.trunk_sharing_ok is (family != "gpt2")  # GPT-2 adds positions to embeddings: it runs unshared


def test_one_head_alone_after_any_other_was_active(tok):
    """A single shared-trunk head runs its segments on peft's plain path: whatever adapter was active before, every
    layer then runs with this head's (an adapter switch must reach the layers outside the segment running)."""
    bank = shared_bank(tok)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    real = enc.attention_mask.bool()
    for head in HEADS:
        for before in HEADS:
            one_whole_forward(bank, before, enc.input_ids, enc.attention_mask)  # leaves `before` active
            alone = bank.values(enc.input_ids, enc.attention_mask, heads=[head])[0]
            torch.testing.assert_close(alone[real], one_whole_forward(bank, head, enc.input_ids,
                                                                      enc.attention_mask)[real],
                                       atol=VALUE_ATOL, rtol=0)


def test_the_trunk_runs_once_per_sequence(tok):
    """The value cache holds a layer's rows once per computation: one per sequence below a head's LoRA (the trunk,
    shared by every head that has not begun), one per (sequence, head) from where a head's LoRA begins."""
    bank = shared_bank(tok)
    mixer = vm.Mixer(bank, {"top2": 1.0, "top2b": -1.0, "top1": 2.0}, top_k=4)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    mixer(enc.input_ids, torch.randn(2, len(tok)))
    rows = [layer.keys.shape[0] for layer in mixer.scorer.rows.cache.layers]
    assert rows == [2, 2, 3 * 2, 3 * 2]  # layers 0-1: the trunk; 2: top2, top2b and top1's trunk; 3: the three heads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tree", [True, False], ids=["tree", "expanded"])
def test_mixed_depth_mix_equals_brute_force_inside_generate(tok, family, tree):
    bank = shared_bank(tok, family)
    bank.tree_masks_ok = tree
    weights = {"full": 1.0, "top2": 1.5, "top2b": -0.7, "top1": 0.8}
    recorder = Recorder(vm.Mixer(bank, weights, top_k=5, top_p=1.0))
    run_generate(build_model(family, len(tok), seed=0), tok, recorder, new_tokens=4)
    for input_ids, scores, out in recorder.calls:
        assert_same_mix(out, expected_scores(bank, input_ids, scores, weights, 5))


def test_a_shared_trunk_head_round_trips_with_its_depth(tok, tmp_path):
    bank = shared_bank(tok)
    folder = bank.save_head("top2", tmp_path / "top2")
    assert json.loads((tmp_path / "top2" / "head_config.json").read_text())["trunk_layers"] == 2
    assert json.loads((tmp_path / "top2" / "adapter_config.json").read_text())["layers_to_transform"] == [2, 3]
    assert "from decoder layer 2: the 2 layers below are a shared trunk" in (tmp_path / "top2" / "README.md").read_text()
    fresh = make_bank(tok, heads=(), layers=4)
    fresh.load_head(folder)
    assert fresh.lora_start("top2") == 2 and fresh.configs["top2"].trunk_layers == 2
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    torch.testing.assert_close(fresh.values(enc.input_ids, enc.attention_mask),
                               bank.values(enc.input_ids, enc.attention_mask, heads=["top2"]), atol=VALUE_ATOL, rtol=0)


def test_a_head_whose_files_disagree_on_its_depth_is_refused(tok, tmp_path):
    bank = shared_bank(tok)
    bank.save_head("top2", tmp_path / "top2")
    config = tmp_path / "top2" / "head_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"trunk_layers": 1}))
    fresh = make_bank(tok, heads=(), layers=4)
    with pytest.raises(ValueError, match=r"records a shared trunk of 1 layers but adapter_config.json puts the LoRA "
                                         r"from layer 2; re-save the head"):
        fresh.load_head(tmp_path / "top2")
    assert fresh.heads == []


@pytest.mark.parametrize("layers", [0, 5, 1.5, True])
def test_lora_layers_out_of_range_are_refused(tok, layers):
    bank = make_bank(tok, heads=(), layers=4)
    with pytest.raises(ValueError, match=rf"layers={layers!r}: a head's LoRA goes on the top 1 to 4 decoder layers"):
        bank.add_head("bad", layers=layers)
    assert bank.heads == []
