"""Loading models: the base, the value backbone and reward models, with the memory checks that come first.

    load_base("HuggingFaceTB/SmolLM2-135M-Instruct")                             # (causal LM, tokenizer)
    load_model("distilbert/...", AutoModelForSequenceClassification)             # a reward model
    check_fits("Qwen/Qwen2.5-7B-Instruct", dtype=torch.bfloat16, device="cuda")   # before loading anything
    ValueBank("Qwen/Qwen2.5-0.5B-Instruct", quantization="4bit")                 # needs bitsandbytes

Everything is loaded from safetensors, never with remote code; Hub ids come from the local cache
when `HF_HUB_OFFLINE=1`, and a missing model is a `ModelNotFoundError` that says what to do.

The weights' size comes from the model's config alone (an empty model on the meta device,
`accelerate.init_empty_weights`), so nothing is downloaded or allocated to find it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager

import psutil
import torch
from accelerate import init_empty_weights
from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                          PreTrainedModel)

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------ loaders
class ModelNotFoundError(FileNotFoundError):
    """A model given by path or Hub id could not be found locally nor downloaded."""


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _in_hub_cache(repo_id: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def load_model(model, auto_class=AutoModel, tokenizer=None, device: str = "cpu", dtype: torch.dtype | None = None):
    """`(model, tokenizer)` in eval mode on `device`, from a folder, a Hub id, a pair, or a model + `tokenizer`.

    Folders and Hub ids are loaded in `dtype` (default float32) with `auto_class.from_pretrained(...,
    use_safetensors=True)` (never with remote code) and `AutoTokenizer`; Hub ids come from the local cache when
    `HF_HUB_OFFLINE=1`. Raises `ModelNotFoundError` saying what to do when the model is missing.
    """
    if isinstance(model, tuple):
        model, tokenizer = model
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        if not os.path.isdir(name) and (isinstance(model, os.PathLike) or _looks_like_path(name)):
            raise ModelNotFoundError(
                f"Model folder {name!r} does not exist. Pass a folder written by save_pretrained "
                "or a Hugging Face Hub id such as 'org/name'."
            )
        try:
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(name)
            model = auto_class.from_pretrained(name, use_safetensors=True, dtype=dtype or torch.float32)
        except OSError as err:
            if os.path.isdir(name) or _in_hub_cache(name):
                raise  # found, but broken (e.g. no safetensors weights): transformers says why
            hub = ("the Hub cannot be reached (HF_HUB_OFFLINE=1)" if is_offline_mode()
                   else f"it could not be downloaded from the Hub ({err})")
            raise ModelNotFoundError(
                f"Model {name!r} is not a local folder and is not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}), and {hub}. Download it first with "
                f"`hf download {name}` on a machine that reaches the Hub, or pass a local path."
            ) from err
    elif tokenizer is None:
        raise ValueError(f"{type(model).__name__} was passed without a tokenizer; pass tokenizer=... "
                         "or a (model, tokenizer) pair")
    return model.to(device).eval(), tokenizer


def keep_first_layers(decoder: nn.Module, num_layers: int) -> None:
    """Cut a decoder (Llama/Qwen2-style `layers` or GPT-2-style `h`) to its first `num_layers` layers, in place."""
    stack = next((getattr(decoder, a) for a in ("layers", "h") if isinstance(getattr(decoder, a, None), nn.ModuleList)),
                 None)
    if stack is None:
        raise ValueError(f"Cannot find the decoder layers of {type(decoder).__name__} to keep the first {num_layers}; "
                         "load the backbone by folder or Hub id with num_layers= instead.")
    if num_layers > len(stack):
        raise ValueError(f"num_layers={num_layers} but the backbone has only {len(stack)} decoder layers.")
    del stack[num_layers:]
    decoder.config.num_hidden_layers = num_layers


def load_decoder(source: str, revision: str | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, quantization: str | None = None,
                 num_layers: int | None = None) -> PreTrainedModel:
    """Load a model's decoder without its LM head (safetensors only, no remote code).

    `num_layers` loads only the first decoder layers (a config override: the later layers' weights are skipped).
    Checks first that its weights fit in the device's free memory (MemoryError saying what to do).
    """
    quantized = quantization_config(quantization)
    try:
        check_fits(source, dtype, device or ("cuda" if quantized else "cpu"), quantization, revision=revision,
                   what="The value backbone")
        overrides = {} if num_layers is None else {"num_hidden_layers": num_layers}
        return AutoModel.from_pretrained(source, revision=revision, dtype=dtype or torch.float32, **overrides,
                                         use_safetensors=True, attn_implementation="sdpa",
                                         quantization_config=quantized,
                                         device_map={"": device or "cuda"} if quantized else None)
    except OSError as err:
        raise OSError(f"Could not load the value backbone {source!r}: {err}\nPass a local folder, or a Hub id that "
                      "is reachable or already in the Hugging Face cache.") from err


def load_base(source: str, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """(causal LM, tokenizer) from a folder or Hub id, safetensors only; a missing pad token becomes EOS.

    Refuses, before loading, a model whose weights do not fit in the device's free memory.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        check_fits(source, dtype, device, what="The base model")
    except OSError:
        pass  # not found: load_model says what to do
    model, tokenizer = load_model(source, AutoModelForCausalLM, device=device, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.warning("%s has no pad token; using its EOS token %r for padding", source, tokenizer.eos_token)
    return model, tokenizer
