"""Big models: will a model's weights fit on a device, 8-bit/4-bit loading, and out-of-memory errors that say what to do.

    check_fits("Qwen/Qwen2.5-7B-Instruct", dtype=torch.bfloat16, device="cuda")   # before loading anything
    ValueBank("Qwen/Qwen2.5-0.5B-Instruct", quantization="4bit")                 # needs bitsandbytes

The weights' size comes from the model's config alone (an empty model on the meta device,
`accelerate.init_empty_weights`), so nothing is downloaded or allocated to find it.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import psutil
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModel, BitsAndBytesConfig

QUANTIZATIONS = ("8bit", "4bit")
BITS_PER_WEIGHT = {"8bit": 8, "4bit": 4}
GB = 1e9
ADVICE = ("load it in bfloat16 (dtype=torch.bfloat16, or --dtype bfloat16), quantize the value backbone "
          "(quantization='4bit' or '8bit', needs `pip install bitsandbytes`), or use a device with more memory")
TRAINING_ADVICE = ("lower batch_size and raise gradient_accumulation_steps (the same head, less memory), turn on "
                   "gradient_checkpointing, train with mixed_precision='bf16', or lower max_length")


def quantization_config(quantization: str | None) -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for "8bit" or "4bit" (NF4, bfloat16 compute); None for None."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None (got {quantization!r}).")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError(f"quantization={quantization!r} loads the model with bitsandbytes, which is not "
                                  "installed: pip install 'valuemix[quant]' (or pip install bitsandbytes).")
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def weights_bytes(source, dtype: torch.dtype | None = None, quantization: str | None = None,
                  revision: str | None = None) -> int:
    """Bytes the model's parameters take in `dtype` (default float32), or quantized, from its config alone.

    `source`: a folder, a Hub id (its config.json, from the cache when offline) or a config object.
    Quantization applies to the linear layers' weights; embeddings and norms keep `dtype`.
    """
    config = source if not isinstance(source, str) else AutoConfig.from_pretrained(source, revision=revision)
    with init_empty_weights():
        model = AutoModel.from_config(config)
    bits = torch.finfo(dtype or torch.float32).bits
    total = sum(p.numel() for p in model.parameters()) * bits
    if quantization is not None:
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        total -= linear * (bits - BITS_PER_WEIGHT[quantization])
    return total // 8


def free_bytes(device: str | torch.device) -> int | None:
    """Free memory on `device`: CUDA's free memory, the RAM the OS can give for "cpu", else None (unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return None


def check_fits(source, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quantization: str | None = None, available: int | None = None, what: str = "The model",
               revision: str | None = None) -> int:
    """Raise MemoryError, with what to do, when the model's weights cannot fit in the device's free memory.

    available: the memory budget in bytes (default: what is free on `device` now; devices other than cuda
    and cpu are not checked). Returns the weights' bytes.
    """
    need = weights_bytes(source, dtype, quantization, revision=revision)
    free = free_bytes(device) if available is None else available
    if free is not None and need > free:
        name = source if isinstance(source, str) else getattr(source, "_name_or_path", "") or source.model_type
        kind = quantization or str(dtype or torch.float32).removeprefix("torch.")
        raise MemoryError(f"{what} {name} needs {need / GB:.2f} GB for its weights in {kind} but {device} has "
                          f"{free / GB:.2f} GB free: {ADVICE}.")
    return need


@contextmanager
def explain_out_of_memory(what: str, advice: str = TRAINING_ADVICE):
    """Re-raise an out-of-memory error (CUDA, or a failed CPU allocation) as a MemoryError saying what to do."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as err:
        text = str(err)
        if not isinstance(err, torch.OutOfMemoryError) and "can't allocate memory" not in text:
            raise
        raise MemoryError(f"{what} ran out of memory ({text.splitlines()[0]}): {advice}.") from err
