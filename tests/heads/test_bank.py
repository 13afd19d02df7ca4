"""ValueBank: heads on one backbone, mixed-adapter values, loading the backbone, errors."""

import pytest
import torch
from conftest import FAMILIES, build_model, build_tokenizer, make_bank

import valuemix as vm
from valuemix.compose.candidates import VALUE_ATOL

TEXTS = ["hello world", "the cat sat on the mat and the dog"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_adapter_values_equal_one_head_at_a_time(tok, family):
    bank = make_bank(tok, family, heads=("helpful", "concise", "cheerful"))
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    together = bank.values(enc.input_ids, enc.attention_mask)
    assert together.shape == (3, 2, enc.input_ids.shape[1])
    for i, head in enumerate(bank.heads):
        alone = bank.values(enc.input_ids, enc.attention_mask, heads=[head])[0]
        torch.testing.assert_close(together[i], alone, atol=VALUE_ATOL, rtol=0)
    assert not torch.allclose(together[0], together[1])  # the heads really differ


def test_left_padding_does_not_change_a_rows_values(tok):
    bank = make_bank(tok)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    single = tok(TEXTS[:1], return_tensors="pt")
    batched = bank.values(enc.input_ids, enc.attention_mask)[:, 0, -single.input_ids.shape[1]:]
    torch.testing.assert_close(batched, bank.values(single.input_ids)[:, 0], atol=VALUE_ATOL, rtol=0)


def test_a_new_head_is_zero_and_adding_it_leaves_others_unchanged(tok):
    bank = make_bank(tok)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    before = bank.values(enc.input_ids, enc.attention_mask)
    bank.add_head("fresh")
    assert torch.equal(bank.values(enc.input_ids, enc.attention_mask, heads=["fresh"]),
                       torch.zeros(1, *enc.input_ids.shape))
    torch.testing.assert_close(bank.values(enc.input_ids, enc.attention_mask, heads=["helpful", "concise"]), before)


def test_remove_head_frees_it_and_keeps_the_others(tok):
    bank = make_bank(tok)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    concise = bank.values(enc.input_ids, enc.attention_mask, heads=["concise"])
    bank.remove_head("helpful")
    assert bank.heads == ["concise"]
    torch.testing.assert_close(bank.values(enc.input_ids, enc.attention_mask), concise)
    bank.remove_head("concise")
    assert bank.heads == [] and not any("lora_" in n for n, _ in bank.model.named_parameters())
    bank.add_head("again")  # the bank is usable after its last head went


def test_the_model_passed_in_is_never_changed(tok):
    base = build_model("llama", len(tok))
    weights = {n: p.clone() for n, p in base.named_parameters()}
    bank = vm.ValueBank(base, tok)
    bank.add_head("helpful")
    assert not any("lora_" in n for n, _ in base.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in base.named_parameters())


def test_backbone_loads_from_a_folder_without_its_lm_head(tok, tmp_path):
    model = build_model("llama", len(tok))
    model.save_pretrained(tmp_path / "backbone")
    tok.save_pretrained(tmp_path / "backbone")
    bank = vm.ValueBank(str(tmp_path / "backbone"))
    assert bank.fingerprint == vm.tokenizer_fingerprint(tok)
    assert not hasattr(bank.decoder, "lm_head")
    assert bank.probe == vm.ValueBank(model, tok).probe  # same weights as the object it was saved from


def test_errors_name_the_problem(tok, tmp_path):
    bank = make_bank(tok)
    with pytest.raises(KeyError, match="Unknown head 'nope'. Heads on this bank: 'helpful', 'concise'."):
        bank.values(torch.tensor([[4, 5]]), heads=["nope"])
    with pytest.raises(ValueError, match="Head 'helpful' is already on the bank"):
        bank.add_head("helpful")
    with pytest.raises(ValueError, match="Head name 'a b' is not valid"):
        bank.add_head("a b")
    with pytest.raises(ValueError, match="ValueBank needs the backbone's tokenizer"):
        vm.ValueBank(build_model("llama", len(tok)))
    with pytest.raises(ValueError, match="Tokenizer mismatch: the base model uses"):
        bank.check_tokenizer(build_tokenizer(vocab_size=300))
    with pytest.raises(OSError, match="Could not load the value backbone"):
        vm.ValueBank(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="The bank has no heads"):
        vm.ValueBank(build_model("llama", len(tok)), tok).values(torch.tensor([[4, 5]]))


def test_backbone_loads_from_a_hub_id_offline(tok, tmp_path, hub_cache):
    model = build_model("llama", len(tok))
    model.save_pretrained(tmp_path / "backbone")
    tok.save_pretrained(tmp_path / "backbone")
    hub_cache(tmp_path / "backbone", "org/tiny-backbone")
    bank = vm.ValueBank("org/tiny-backbone")
    assert bank.backbone_id == "org/tiny-backbone"
    assert bank.probe == vm.ValueBank(model, tok).probe
    with pytest.raises(OSError, match="Could not load the value backbone 'org/not-cached'"):
        vm.ValueBank("org/not-cached")


@pytest.mark.parametrize("family", FAMILIES)
def test_num_layers_from_a_folder_equals_cutting_the_model_object(tok, tmp_path, family):
    model = build_model(family, len(tok), layers=3)
    model.save_pretrained(tmp_path / "backbone")
    tok.save_pretrained(tmp_path / "backbone")
    cut_object, cut_folder = vm.ValueBank(model, tok, num_layers=2), vm.ValueBank(str(tmp_path / "backbone"),
                                                                                   num_layers=2)
    for bank in (cut_object, cut_folder):
        bank.add_head("helpful", seed=0)
        assert bank.backbone_layers == 2 and bank.configs["helpful"].backbone_layers == 2
    ids = tok(TEXTS[:1], return_tensors="pt").input_ids
    full = model.base_model(ids, output_hidden_states=True).hidden_states
    hidden = cut_folder.forward_hidden(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], ["helpful"])
    assert cut_folder.decoder.config.num_hidden_layers == 2 and len(full) == 4
    torch.testing.assert_close(cut_object.values(ids), cut_folder.values(ids), atol=VALUE_ATOL, rtol=0)
    assert hidden.shape == full[2].shape


def test_a_head_of_a_cut_backbone_refuses_the_whole_backbone(tok, tmp_path):
    model = build_model("llama", len(tok), layers=3)
    cut = vm.ValueBank(model, tok, num_layers=2)
    cut.add_head("helpful")
    cut.save_head("helpful", tmp_path / "helpful")
    with pytest.raises(ValueError, match=r"trained on the first 2 decoder layers of backbone LlamaForCausalLM but the "
                                         r"bank runs every decoder layer .* ValueBank\('LlamaForCausalLM', "
                                         r"num_layers=2\)"):
        vm.ValueBank(model, tok).load_head(tmp_path / "helpful")
    assert vm.ValueBank(model, tok, num_layers=2).load_head(tmp_path / "helpful") == "helpful"


@pytest.mark.parametrize("num_layers, message", [(0, "num_layers must be a positive whole number"),
                                                 (2.5, "num_layers must be a positive whole number"),
                                                 (9, "num_layers=9 but the backbone has only 2 decoder layers")])
def test_bad_num_layers(tok, num_layers, message):
    with pytest.raises(ValueError, match=message):
        vm.ValueBank(build_model("llama", len(tok)), tok, num_layers=num_layers)


def test_head_parameters_are_named_lora_first_then_the_value_layer(tok):
    bank = make_bank(tok)
    names = list(bank.head_parameters("helpful"))
    assert names[-2:] == ["value.weight", "value.bias"]
    assert names[:-2] and all(n.startswith("adapter.") and ".lora_" in n and ".helpful." in n for n in names[:-2])


def test_set_head_state_round_trips_and_names_keys_that_do_not_fit(tok):
    bank = make_bank(tok)
    ids = tok(TEXTS[:1], return_tensors="pt").input_ids
    helpful, concise = bank.head_state("helpful"), bank.values(ids, heads=["concise"])
    bank.set_head_state("concise", {k.replace(".helpful.", ".concise."): v for k, v in helpful.items()})
    assert torch.equal(bank.values(ids, heads=["concise"]), bank.values(ids, heads=["helpful"]))
    assert not torch.equal(bank.values(ids, heads=["concise"]), concise)
    with pytest.raises(ValueError, match=r"unexpected keys base_model\.nowhere\.lora_A\.weight, missing keys none"):
        bank.set_head_state("helpful", helpful | {"adapter.base_model.nowhere.lora_A.weight": torch.zeros(1)})
