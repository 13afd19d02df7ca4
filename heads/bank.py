"""ValueBank: one value backbone (a causal LM's decoder, no LM head) carrying named value heads.

A head is a named peft LoRA adapter on the shared backbone plus a scalar value layer
Linear(hidden, 1), zero-initialised, on the last hidden state. Heads are scored together
in one forward with peft's mixed-adapter batches (`adapter_names=`): K heads send K×B rows.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from valuemix.heads.compat import with_cache
from valuemix.heads.fingerprint import backbone_probe, describe_tokenizer, tokenizer_fingerprint
from valuemix.heads.head_config import HeadConfig
from valuemix.heads.loading import keep_first_layers, load_decoder
from valuemix.heads.tokens import position_ids_from_mask

ADAPTER, VALUE = "adapter.", "value."  # key prefixes of a head's tensors in head_state / head_parameters
DEFAULT_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def few(items, n: int = 3) -> str:
    """'a; b; c and 4 more' (or 'none'), for error messages."""
    items = list(items)
    if not items:
        return "none"
    return "; ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


class ValueBank:
    """A value backbone loaded once, with named value heads on it.

    Args:
        backbone: a causal LM (or its decoder) object, a local folder or a Hugging Face Hub id.
            A model object is copied, so the object passed in (e.g. the base model itself) is never changed.
        tokenizer: the backbone's tokenizer; loaded from `backbone` when it is a path or an id.
        revision: Hub revision of `backbone`.
        dtype: dtype to load the backbone in (default: float32; bfloat16 halves the memory).
        device: device to put the backbone on.
        quantization: "8bit" or "4bit" to load the backbone quantized with bitsandbytes (an extra:
            `pip install 'valuemix[quant]'`); the heads' LoRA matrices and value layers stay in full precision.
        num_layers: use only the backbone's first `num_layers` decoder layers (and its final norm): a smaller,
            faster value backbone cut from a bigger model. Heads record the cut (`HeadConfig.backbone_layers`).
    """

    def __init__(self, backbone, tokenizer=None, *, revision: str | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, quantization: str | None = None,
                 num_layers: int | None = None):
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                       or num_layers < 1):
            raise ValueError(f"num_layers must be a positive whole number of decoder layers, got {num_layers!r}.")
        if isinstance(backbone, nn.Module):
            decoder = copy.deepcopy(backbone.base_model if isinstance(backbone, PreTrainedModel) else backbone)
            source = getattr(decoder.config, "_name_or_path", "") or type(backbone).__name__
            if num_layers is not None:
                keep_first_layers(decoder, num_layers)
        else:
            source = str(backbone)
            decoder = load_decoder(source, revision=revision, dtype=dtype, device=device, quantization=quantization,
                                   num_layers=num_layers)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        if tokenizer is None:
            raise ValueError("ValueBank needs the backbone's tokenizer when given a model object: "
                             "ValueBank(model, tokenizer=tokenizer).")
        decoder.name_or_path = source  # peft records it as the adapter's base model
        if decoder.config._attn_implementation not in ("eager", "sdpa"):
            decoder.set_attn_implementation("sdpa")  # candidate scoring uses custom 4D masks
        if device is not None and not quantization:
            decoder.to(device)
        self.decoder = decoder.eval().requires_grad_(False)
        self.model: nn.Module = self.decoder  # becomes a PeftModel with the first head
        self.tokenizer = tokenizer
        self.backbone_id = source
        self.backbone_revision = revision or getattr(decoder.config, "_commit_hash", None)
        self.backbone_layers = num_layers  # None: every layer of the backbone
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.probe = [] if quantization else backbone_probe(decoder)  # quantized weights cannot be compared
        self.value_layers = nn.ModuleDict()
        self.configs: dict[str, HeadConfig] = {}
        self.lock = threading.RLock()  # peft's adapter routing is module state: one forward at a time
        self.tree_masks_ok: bool | None = None  # set by the first candidate scoring

    # ------------------------------------------------------------------ heads
    @property
    def heads(self) -> list[str]:
        """Names of the heads on the bank, in the order they were added."""
        return list(self.value_layers.keys())

    @property
    def hidden_size(self) -> int:
        return self.decoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def add_head(self, name: str, lora: LoraConfig | dict | None = None, seed: int | None = None,
                 **metadata) -> HeadConfig:
        """Add a new head: a LoRA adapter (default r=16 on all linear layers) and a zero value layer.

        seed: seed of the adapter's random initialisation (default: torch's global random state).
        """
        if name in self.value_layers:
            raise ValueError(f"Head '{name}' is already on the bank; remove_head('{name}') first or pick another name.")
        if not name or name == "__base__" or not name.replace("-", "_").isidentifier():
            raise ValueError(f"Head name {name!r} is not valid: use letters, digits, '_' or '-' (e.g. 'helpful').")
        lora_config = lora if isinstance(lora, LoraConfig) else LoraConfig(**{**DEFAULT_LORA, **(lora or {})})
        lora_config.base_model_name_or_path = self.backbone_id
        with self.lock, torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if isinstance(self.model, PeftModel):
                self.model.add_adapter(name, lora_config)
            else:
                self.model = get_peft_model(self.decoder, lora_config, adapter_name=name)
            self.model.eval()
            layer = nn.Linear(self.hidden_size, 1, device=self.device, dtype=torch.float32)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
            self.value_layers[name] = layer.requires_grad_(False)
        config = HeadConfig(name=name, backbone=self.backbone_id, backbone_revision=self.backbone_revision,
                            backbone_layers=self.backbone_layers, backbone_probe=self.probe,
                            tokenizer_fingerprint=self.fingerprint, **metadata)
        self.configs[name] = config
        return config

    def remove_head(self, name: str) -> None:
        """Remove a head and free its adapter."""
        self.check_heads([name])
        with self.lock:
            if len(self.value_layers) == 1:
                self.model = self.model.unload()  # the last adapter: back to the bare decoder
            else:
                self.model.delete_adapter(name)
            del self.value_layers[name]
            del self.configs[name]

    def check_heads(self, heads: Sequence[str]) -> list[str]:
        """Validate head names; raise a KeyError listing the bank's heads for an unknown one."""
        heads = list(heads)
        for name in heads:
            if name not in self.value_layers:
                known = ", ".join(repr(h) for h in self.heads) or "none yet (add_head or load_head)"
                raise KeyError(f"Unknown head '{name}'. Heads on this bank: {known}.")
        if len(set(heads)) != len(heads):
            raise ValueError(f"Heads listed twice: {heads}.")
        return heads

    def check_tokenizer(self, tokenizer, what: str = "the base model") -> None:
        """Refuse a tokenizer that does not map text to the same ids as the backbone's."""
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.fingerprint:
            raise ValueError(
                f"Tokenizer mismatch: {what} uses {describe_tokenizer(tokenizer)} but the value backbone "
                f"{self.backbone_id} uses {describe_tokenizer(self.tokenizer)}. Values are only meaningful on "
                "the backbone's own token ids: pick a backbone that shares the base model's tokenizer.")

    # ----------------------------------------------------------------- values
    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       row_heads: list[str], cache=None) -> torch.Tensor:
        """Run the backbone with head `row_heads[i]` on row i; returns the last hidden states.

        `cache` (a transformers `Cache`) is extended in place by the tokens fed.
        """
        routing = {"adapter_names": row_heads}  # peft's mixed-adapter batch: row i through head row_heads[i]
        with self.lock:
            if len(set(row_heads)) == 1:  # one head: peft's plain path is ~20% faster than per-row routing
                if self.model.active_adapter != row_heads[0]:
                    self.model.set_adapter(row_heads[0], inference_mode=True)
                routing = {}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **with_cache(cache), use_cache=cache is not None, **routing)
        return out.last_hidden_state

    def project(self, hidden: torch.Tensor, heads: Sequence[str]) -> torch.Tensor:
        """Value layers of `heads` on hidden states (n_heads, ..., hidden) -> (n_heads, ...)."""
        weight = torch.cat([self.value_layers[h].weight for h in heads])  # (H, hidden)
        bias = torch.cat([self.value_layers[h].bias for h in heads])  # (H,)
        flat = hidden.reshape(len(heads), -1, hidden.shape[-1]).float()
        values = torch.einsum("hnd,hd->hn", flat, weight) + bias[:, None]
        return values.reshape(hidden.shape[:-1])

    @torch.inference_mode()
    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               heads: Sequence[str] | None = None) -> torch.Tensor:
        """V of every prefix: (n_heads, batch, seq); entry [h, b, t] values the prefix ending at token t."""
        heads = self.check_heads(self.heads if heads is None else heads)
        if not heads:
            raise ValueError("The bank has no heads: add_head or load_head first.")
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        n = len(heads)
        row_heads = [h for h in heads for _ in range(input_ids.shape[0])]
        hidden = self.forward_hidden(input_ids.repeat(n, 1), attention_mask.repeat(n, 1),
                                        position_ids_from_mask(attention_mask).repeat(n, 1), row_heads)
        return self.project(hidden.reshape(n, *input_ids.shape, -1), heads)

    # ------------------------------------------------------------- parameters
    def head_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The trainable parameters of one head by name: "adapter.<parameter>" for its LoRA matrices (in the
        backbone's order), then "value.weight" and "value.bias" for its value layer."""
        self.check_heads([name])
        lora = {f"{ADAPTER}{n}": p for n, p in self.model.named_parameters() if f".{name}." in n and ".lora_" in n}
        return lora | {f"{VALUE}{n}": p for n, p in self.value_layers[name].named_parameters()}

    def head_state(self, name: str) -> dict[str, torch.Tensor]:
        """A copy of every tensor of one head: "adapter.<key>" (peft's saved keys) and "value.<key>"."""
        self.check_heads([name])
        with self.lock:  # a consistent snapshot even while another thread trains or decodes
            adapter = get_peft_model_state_dict(self.model, adapter_name=name, save_embedding_layers=False)
            state = {f"{ADAPTER}{k}": v.detach().clone() for k, v in adapter.items()}
            state.update({f"{VALUE}{k}": v.detach().clone() for k, v in self.value_layers[name].state_dict().items()})
        return state

    def set_head_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Load tensors shaped as `head_state(name)` returns them into head `name`.

        Raises ValueError naming the adapter keys that do not fit (extra or missing) and RuntimeError for
        tensors of the wrong shape; the head may then be partly written, so callers discard it.
        """
        self.check_heads([name])
        adapter = {k[len(ADAPTER):]: v for k, v in state.items() if k.startswith(ADAPTER)}
        value = {k[len(VALUE):]: v for k, v in state.items() if k.startswith(VALUE)}
        with self.lock:
            result = set_peft_model_state_dict(self.model, adapter, adapter_name=name)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            if result.unexpected_keys or missing:
                raise ValueError(f"unexpected keys {few(result.unexpected_keys)}, missing keys {few(missing)}")
            self.value_layers[name].load_state_dict(value)

    # -------------------------------------------------------------- files/hub
    def save_head(self, name: str, directory) -> str:
        """Write head `name` to `directory` (peft adapter files, value layer, head_config.json, model card)."""
        from valuemix.heads.files import save_head

        return save_head(self, name, directory)

    def load_head(self, source, name: str | None = None, revision: str | None = None, token=None) -> str:
        """Load a head from a folder or a Hub repo id (or a list of them); returns the head name(s)."""
        from valuemix.heads.files import load_head

        if isinstance(source, (list, tuple)):
            return [self.load_head(s, revision=revision, token=token) for s in source]
        return load_head(self, source, name=name, revision=revision, token=token)

    def push_head(self, name: str, repo_id: str, **kwargs) -> str:
        """Push head `name` to the Hugging Face Hub repo `repo_id` in one commit; returns the commit URL.

        Keyword arguments (private, token, commit_message, revision) are those of `heads.hub.push_head`.
        """
        from valuemix.heads.hub import push_head

        return push_head(self, name, repo_id, **kwargs)

    def __repr__(self) -> str:
        return f"ValueBank(backbone={self.backbone_id!r}, heads={self.heads})"


