"""Tests for valuemix.heads.files (save_head / load_head) and valuemix.heads.atomic."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import HUB_COMMIT as COMMIT, build_model, build_tokenizer
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import valuemix as vm
from valuemix.compose.candidates import VALUE_ATOL
from valuemix.heads import atomic, files
from valuemix.heads.atomic import atomic_directory
from valuemix.heads.files import REQUIRED_FILES

BACKBONE = "org/tiny-llama"
TEXTS = ["hello world, how are you?", "the cat sat on the mat"]


def backbone(family="llama", seed=0, name=BACKBONE, tokenizer=None):
    """A tiny causal LM whose `_name_or_path` looks like a Hub id (what a bank records as its backbone)."""
    model = build_model(family, len(tokenizer) if tokenizer is not None else 320, seed=seed)
    model.config._name_or_path = name
    return model


def make_bank(tokenizer, model=None, heads=(), seed=1):
    """A bank on `model` (default: the llama backbone) with `heads` added and randomised."""
    bank = vm.ValueBank(model if model is not None else backbone(), tokenizer)
    for i, name in enumerate(heads):
        bank.add_head(name, reward=f"reward {name}", lam=0.9, data_size=64, metrics={"loss": 0.25, "steps": 12})
        randomise(bank, name, seed=seed + i)
    return bank


def randomise(bank, name, seed=1):
    """Make a head non-trivial: random LoRA matrices (lora_B starts at zero) and value layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.head_parameters(name).values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def batch(tokenizer):
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def values(bank, tokenizer, heads=None):
    return bank.values(*batch(tokenizer), heads=heads)


@pytest.fixture
def bank(tokenizer):
    return make_bank(tokenizer, heads=["helpful", "concise"])


@pytest.fixture
def saved(bank, tmp_path):
    """The 'helpful' head of `bank` saved to tmp_path/helpful."""
    folder = tmp_path / "helpful"
    bank.save_head("helpful", folder)
    return folder


# --- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_round_trip_gives_identical_values(tokenizer, tmp_path, family):
    model = backbone(family)
    bank = make_bank(tokenizer, model, heads=["concise", "helpful"])
    bank.save_head("helpful", tmp_path / "helpful")  # not the first adapter: peft would use a subfolder
    fresh = vm.ValueBank(model, tokenizer)
    assert fresh.load_head(tmp_path / "helpful") == "helpful"
    expected = values(bank, tokenizer, ["helpful"])
    assert expected.abs().max() > 0
    assert torch.equal(values(fresh, tokenizer), expected)


def test_round_trip_keeps_head_config(bank, saved, tokenizer):
    fresh = make_bank(tokenizer)
    fresh.load_head(saved)
    loaded, original = fresh.configs["helpful"], bank.configs["helpful"]
    assert loaded.valuemix_version == vm.__version__
    assert loaded == original.__class__(**{**vars(original), "valuemix_version": vm.__version__})


def test_head_folder_holds_exactly_the_head_files(saved):
    assert sorted(os.listdir(saved)) == sorted([*REQUIRED_FILES, "README.md"])
    assert set(load_file(saved / "value_head.safetensors")) == {"weight", "bias"}
    assert all(".lora_" in k for k in load_file(saved / "adapter_model.safetensors"))
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == BACKBONE


def test_save_does_not_change_the_banks_config(bank, saved):
    assert bank.configs["helpful"].valuemix_version == ""


def test_model_card_has_metadata_and_usage(saved):
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "valuemix"
    assert card.data.base_model == BACKBONE
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["valuemix", "value-head", "vas", "helpful"]
    for snippet in [f"vm.ValueBank('{BACKBONE}')", f"bank.load_head('{saved}')", "vm.Mixer(bank, {'helpful': 1.0})",
                    "logits_processor=[mixer]", "reward helpful", "λ = 0.9", "64 sampled completions",
                    "| loss | 0.25 |", "-10 to 10"]:
        assert snippet in card.text, snippet


def test_model_card_names_the_repo_it_will_be_pushed_to(bank, tmp_path):
    files.save_head(bank, "helpful", tmp_path / "h", repo_id="user/vm-helpful")
    assert "bank.load_head('user/vm-helpful')" in ModelCard.load(tmp_path / "h" / "README.md").text


def test_two_heads_from_disk_mix_like_single_heads(bank, tokenizer, tmp_path):
    bank.save_head("helpful", tmp_path / "helpful")
    bank.save_head("concise", tmp_path / "concise")
    fresh = make_bank(tokenizer)
    assert fresh.load_head([tmp_path / "concise", tmp_path / "helpful"]) == ["concise", "helpful"]
    mixed = values(fresh, tokenizer, ["helpful", "concise"])
    single = torch.cat([values(fresh, tokenizer, ["helpful"]), values(fresh, tokenizer, ["concise"])])
    torch.testing.assert_close(mixed, single, rtol=0, atol=VALUE_ATOL)  # batch shapes differ: float rounding
    assert torch.equal(mixed, values(bank, tokenizer, ["helpful", "concise"]))


def test_load_under_another_name(bank, saved, tokenizer):
    assert bank.load_head(saved, name="helpful_copy") == "helpful_copy"
    assert bank.configs["helpful_copy"].name == "helpful_copy"
    assert torch.equal(values(bank, tokenizer, ["helpful_copy"]), values(bank, tokenizer, ["helpful"]))


def test_probe_tolerates_a_lower_precision_copy_of_the_backbone(saved, tokenizer):
    model = backbone().to(torch.bfloat16).to(torch.float32)
    fresh = make_bank(tokenizer, model)
    assert fresh.load_head(saved) == "helpful"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"])
def test_missing_file(saved, tokenizer, missing):
    (saved / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"helpful is missing {missing}\. A valuemix head needs "
                                                r"adapter_config.json, adapter_model.safetensors"):
        make_bank(tokenizer).load_head(saved)


def test_folder_without_head_config_is_not_a_head(saved, tokenizer):
    (saved / "head_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="is not a valuemix head: it has no head_config.json"):
        make_bank(tokenizer).load_head(saved)


@pytest.mark.parametrize("filename", ["adapter_model.safetensors", "value_head.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(saved, tokenizer, filename, damage):
    path = saved / filename
    data = path.read_bytes()
    path.write_bytes(data[:-7] if damage == "truncate" else b"\x00\x01 not a safetensors file" * 3)
    with pytest.raises(ValueError, match=rf"{filename} in folder .* is corrupt .*re-download the head or re-save"):
        make_bank(tokenizer).load_head(saved)


def test_head_config_not_json(saved, tokenizer):
    (saved / "head_config.json").write_text('{"name": "helpful",')
    with pytest.raises(ValueError, match="head_config.json in folder .* is not valid JSON"):
        make_bank(tokenizer).load_head(saved)


def test_tokenizer_mismatch(saved, tokenizer):
    other = build_tokenizer(vocab_size=300)
    bank = make_bank(other, backbone(tokenizer=other, name="org/other"))
    with pytest.raises(ValueError) as info:
        bank.load_head(saved)
    message = str(info.value)
    assert f"trained with tokenizer fingerprint {vm.tokenizer_fingerprint(tokenizer)} (backbone {BACKBONE})" in message
    assert f"the bank's tokenizer is {bank.fingerprint} (backbone org/other)" in message
    assert f"load it on a bank of ValueBank('{BACKBONE}')" in message


def test_backbone_mismatch(saved, tokenizer):
    bank = make_bank(tokenizer, backbone(seed=7, name="org/other"))
    with pytest.raises(ValueError, match=rf"Head 'helpful' was trained for backbone {BACKBONE} but the bank holds "
                                         rf"org/other .*load it with ValueBank\('{BACKBONE}'\)"):
        bank.load_head(saved)


def test_value_layer_of_the_wrong_shape(saved, tokenizer):
    save_file({"weight": torch.zeros(1, 48), "bias": torch.zeros(1)}, saved / "value_head.safetensors")
    with pytest.raises(ValueError, match=r"value_head.safetensors in folder .* needs \{'weight': \(1, 32\)"):
        make_bank(tokenizer).load_head(saved)


def test_name_already_on_the_bank(bank, saved):
    with pytest.raises(ValueError, match=r"A head named 'helpful' is already on the bank; .*name='helpful_2'"):
        bank.load_head(saved)


@pytest.mark.parametrize("heads", [(), ("concise",)])
def test_failed_load_leaves_the_bank_unchanged(saved, tokenizer, heads):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))  # weights are r=16
    bank = make_bank(tokenizer, heads=heads)
    before = values(bank, tokenizer) if heads else None
    with pytest.raises(ValueError, match="adapter_model.safetensors in folder .* does not fit the adapter"):
        bank.load_head(saved)
    assert bank.heads == list(heads) and set(bank.configs) == set(heads)
    if heads:
        assert torch.equal(values(bank, tokenizer), before)
    else:
        assert bank.model is bank.decoder
    bank.add_head("again")  # the bank still takes heads
    assert bank.heads == [*heads, "again"]


@pytest.mark.parametrize("edit", ["extra key", "missing key"])
def test_adapter_weights_that_do_not_match_the_adapter(saved, tokenizer, edit):
    state = load_file(saved / "adapter_model.safetensors")
    if edit == "extra key":
        state["base_model.model.layers.0.self_attn.nowhere.lora_A.weight"] = torch.zeros(16, 32)
    else:
        del state[next(iter(state))]
    save_file(state, saved / "adapter_model.safetensors")
    bank = make_bank(tokenizer, heads=["concise"])
    with pytest.raises(ValueError, match=f"adapter_model.safetensors in folder .* does not match adapter_config.json: "
                                         f".*{'nowhere' if edit == 'extra key' else 'lora_'}"):
        bank.load_head(saved)
    assert bank.heads == ["concise"] and list(bank.model.peft_config) == ["concise"]


def test_no_folder_and_not_a_repo_id(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="No head folder at .* and it is not a Hub repo id"):
        make_bank(tokenizer).load_head(tmp_path / "nowhere" / "helpful")


# --- atomic writes ------------------------------------------------------------------------------


def test_failure_mid_save_keeps_the_previous_head(bank, saved, tokenizer, monkeypatch):
    before = {name: (saved / name).read_bytes() for name in os.listdir(saved)}
    randomise(bank, "helpful", seed=99)
    monkeypatch.setattr(ModelCard, "save", lambda self, path: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        bank.save_head("helpful", saved)
    assert os.listdir(saved.parent) == ["helpful"]  # no temp or old folders left
    assert {name: (saved / name).read_bytes() for name in os.listdir(saved)} == before


def test_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    """Where no atomic exchange is available, the two-rename swap restores the old folder when it fails."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError("rename failed")
        real_rename(src, dst)
    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(target) as tmp:
        (tmp_path / tmp / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["ckpt"] and (target / "old.txt").read_text() == "old"


def test_overwrite_an_existing_head(bank, saved, tokenizer):
    randomise(bank, "helpful", seed=42)
    bank.save_head("helpful", saved)
    assert os.listdir(saved.parent) == ["helpful"]
    fresh = make_bank(tokenizer)
    fresh.load_head(saved)
    assert torch.equal(values(fresh, tokenizer), values(bank, tokenizer, ["helpful"]))


def test_save_refuses_to_replace_a_folder_that_is_not_a_head(bank, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a valuemix head"):
        bank.save_head("helpful", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_atomic_directory_without_overwrite_keeps_the_existing_folder(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "first").write_text("1")
    with atomic_directory(tmp_path / "cache", overwrite=False) as tmp:
        (tmp_path / tmp / "second").write_text("2")
    assert os.listdir(tmp_path) == ["cache"] and os.listdir(tmp_path / "cache") == ["first"]


# --- Hugging Face Hub (offline, through a real cache layout) -------------------------------------


def test_load_from_hub_cache_offline(bank, saved, tokenizer, hub_cache):
    hub_cache(saved, "user/vm-helpful")
    shutil.rmtree(saved)  # only the cache has it now
    fresh = make_bank(tokenizer)
    assert fresh.load_head("user/vm-helpful") == "helpful"
    assert torch.equal(values(fresh, tokenizer), values(bank, tokenizer, ["helpful"]))
    assert fresh.load_head("user/vm-helpful", name="pinned", revision=COMMIT) == "pinned"


def test_missing_repo_offline(tokenizer, hub_cache):
    with pytest.raises(FileNotFoundError, match=r"Hub repo 'user/vm-missing' could not be fetched: the Hub is not "
                                                r"reachable .* not in the local Hugging Face cache"):
        make_bank(tokenizer).load_head("user/vm-missing")


def test_cached_repo_that_is_not_a_head(saved, tokenizer, hub_cache):
    (saved / "head_config.json").unlink()  # a plain peft adapter repo
    hub_cache(saved, "user/plain-lora")
    with pytest.raises(FileNotFoundError, match=r"Hub repo 'user/plain-lora' .* is not a valuemix head"):
        make_bank(tokenizer).load_head("user/plain-lora")
