"""Big models: the weights' size from the config alone, the fit check before loading, quantization, OOM messages."""

import importlib.util

import pytest
import torch
from conftest import build_model, build_tokenizer
from transformers import AutoModel

import valuemix as vm
from valuemix.heads.loading import check_fits, explain_out_of_memory, quantization_config, weights_bytes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    tok = build_tokenizer()
    build_model("qwen2", len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def loaded_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_bytes_from_the_config_equal_the_loaded_models(folder, dtype):
    assert weights_bytes(folder, dtype) == loaded_bytes(AutoModel.from_pretrained(folder, dtype=dtype))


def test_quantized_size_counts_the_linear_weights_at_4_or_8_bits(folder):
    model = AutoModel.from_pretrained(folder)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    full = weights_bytes(folder, torch.bfloat16)
    assert weights_bytes(folder, torch.bfloat16, "8bit") == full - linear
    assert weights_bytes(folder, torch.bfloat16, "4bit") == full - linear * 3 // 2


def test_a_model_that_does_not_fit_is_refused_before_loading_with_what_to_do(folder):
    need = weights_bytes(folder)
    assert check_fits(folder, available=need) == need
    with pytest.raises(MemoryError) as err:
        check_fits(folder, available=need - 1, what="The value backbone")
    assert str(err.value) == (
        f"The value backbone {folder} needs {need / 1e9:.2f} GB for its weights in float32 but cpu has "
        f"{(need - 1) / 1e9:.2f} GB free: load it in bfloat16 (dtype=torch.bfloat16, or --dtype bfloat16), quantize "
        "the value backbone (quantization='4bit' or '8bit', needs `pip install bitsandbytes`), or use a device with "
        "more memory.")
    assert vm.ValueBank(folder).probe  # the real free memory of this machine holds it
    assert check_fits(folder, device="meta") == need  # a device whose free memory is unknown is not refused


def test_quantization_needs_bitsandbytes_or_builds_its_config(folder):
    with pytest.raises(ValueError, match=r"quantization must be one of \('8bit', '4bit'\) or None \(got '3bit'\)"):
        quantization_config("3bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'valuemix\[quant\]'"):
            vm.ValueBank(folder, quantization="4bit")
    else:
        config = quantization_config("4bit")
        assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"


def test_a_failed_allocation_becomes_a_memory_error_that_says_what_to_do():
    with pytest.raises(MemoryError, match=r"^Training ran out of memory \(.*can't allocate memory.*\): lower "
                                          r"batch_size and raise gradient_accumulation_steps"):
        with explain_out_of_memory("Training"):
            torch.empty(2 ** 45)  # 140 TB: the allocator refuses it at once
    with pytest.raises(RuntimeError, match="shape"):  # any other error passes through unchanged
        with explain_out_of_memory("Training"):
            torch.zeros(2, 3) @ torch.zeros(2, 3)
