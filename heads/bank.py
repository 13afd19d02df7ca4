"""ValueBank: one value backbone (a causal LM's decoder, no LM head) carrying named value heads.

A head is a named peft LoRA adapter on the shared backbone plus a scalar value layer
Linear(hidden, 1), zero-initialised, on the last hidden state. Heads are scored together
in one forward with peft's mixed-adapter batches (`adapter_names=`): K heads send K×B rows.

A shared-trunk head puts its LoRA on the top layers only (`add_head(..., layers=n)`, peft's
`layers_to_transform`). Below its first LoRA layer it computes exactly what the bare backbone
computes, so rows of one sequence share that trunk: `forward_hidden(..., row_sequences=...)` runs
each layer once per distinct (sequence, head whose LoRA has begun), the trunk once per sequence,
and copies the trunk's hidden states into each head's rows where its LoRA begins.

A forward whose rows all run one head runs a copy of the backbone with that head's LoRA merged into
its weights (`merge_single_head`, `MergedDecoder`): the same values without LoRA's extra matrix products,
about a quarter faster per value forward on a CPU. The copy shares every tensor but the merged weights.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections.abc import Hashable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from valuemix.heads.compat import with_cache
from valuemix.heads.fingerprint import backbone_probe, describe_tokenizer, tokenizer_fingerprint
from valuemix.heads.head_config import HeadConfig
from valuemix.heads.loading import keep_first_layers, load_decoder
from valuemix.heads.tokens import position_ids_from_mask

logger = logging.getLogger(__name__)

ADAPTER, VALUE = "adapter.", "value."  # key prefixes of a head's tensors in head_state / head_parameters
DEFAULT_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
TRUNK = "trunk"  # in a row key (sequence, head): the sequence's shared trunk, below its heads' LoRA
BASE = "__base__"  # peft's adapter name, in a mixed-adapter batch, for a row without adapter
STACKS = (("layers", "norm"), ("h", "ln_f"))  # (decoder layers, final norm) of Llama/Qwen2-style and GPT-2-style


def causal_mask(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4D mask (rows, 1, q, kv) of a 2D padding mask (rows, kv) whose last q tokens are fed:
    each sees the real tokens up to itself; a pad sees itself only (its output is never used)."""
    rows, kv = attention_mask.shape
    past = kv - query_length
    device = attention_mask.device
    allowed = torch.ones(query_length, kv, dtype=torch.bool, device=device).tril(past)[None] \
        & attention_mask.bool()[:, None, :]
    allowed[:, torch.arange(query_length, device=device), past + torch.arange(query_length, device=device)] = True
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class TrunkSegment:
    """A run of decoder layers [start, stop) in which the same rows are computed.

    keys: the rows computed, (sequence, head) or (sequence, TRUNK) for a sequence's shared trunk;
    rows: for each key, the first input row with it (its tokens, mask and positions are fed);
    parents: for each key, its row in the previous segment's output (whose hidden states it continues);
    of_row: for each input row, its key's index; row_keys: each input row's key; index_of: key -> index;
    heads: the adapter each computed row runs with (for a trunk row, a head whose LoRA has not begun).
    """

    start: int
    stop: int
    keys: list[tuple]
    rows: torch.Tensor
    parents: torch.Tensor
    of_row: torch.Tensor
    row_keys: list[tuple]
    index_of: dict
    heads: list[str]  # the adapter each row computed runs with (for a trunk row, a head not begun in these layers)


class MergedDecoder:
    """A copy of a peft-wrapped decoder with plain layers in place of the LoRA-wrapped ones, into which one head's
    LoRA at a time is merged (W + scale·BA, in weight buffers made once); every other tensor is the decoder's.

    A head is merged once it has run alone `AFTER` times in a row (heads that alternate never pay for merges), and
    again when its LoRA tensors change (training, `set_head_state`). A merge is one pass over the head's LoRA'd
    weights, no allocation after the first; the last merged head stays ready while others run a few forwards.
    """

    AFTER = 4

    def __init__(self, decoder: nn.Module):
        self.wrapped = [(name, module) for name, module in decoder.named_modules() if isinstance(module, LoraLayer)]
        shared = {id(t): t for t in itertools.chain(decoder.parameters(), decoder.buffers())}
        with torch.inference_mode(False), torch.no_grad():
            self.decoder = copy.deepcopy(decoder, memo=dict(shared))  # the modules copied, their tensors shared
            self.layers = {}
            for name, module in self.wrapped:
                self.layers[name] = copy.deepcopy(module.get_base_layer(), memo=dict(shared))
                self.decoder.set_submodule(name, self.layers[name])
        self.weights: dict[str, nn.Parameter] = {}  # the merge buffers, by module name
        self.head, self.version = None, None  # the head merged now, and its LoRA tensors' versions then
        self.candidate, self.streak = None, 0  # the head running alone lately, and how many times in a row

    def for_head(self, head: str) -> nn.Module | None:
        """The decoder with `head` merged in, or None while it has run alone fewer than `AFTER` times in a row or its
        layers cannot merge (quantized)."""
        own = [(name, module) for name, module in self.wrapped if head in module.lora_A]
        version = tuple((id(w), w._version) for _, module in own for w in (module.lora_A[head].weight,
                                                                            module.lora_B[head].weight))
        if head == self.head and version == self.version:
            return self.decoder
        self.streak = self.streak + 1 if head == self.candidate else 1
        self.candidate = head
        if self.streak < self.AFTER or not all(isinstance(m.get_base_layer(), (nn.Linear, Conv1D))
                                               and m.get_base_layer().weight.is_floating_point() for _, m in own):
            return None
        with torch.inference_mode(False), torch.no_grad():
            for name, module in self.wrapped:
                base = module.get_base_layer().weight
                if head in module.lora_A:
                    if name not in self.weights:
                        self.weights[name] = nn.Parameter(torch.empty_like(base), requires_grad=False)
                    torch.add(base, module.get_delta_weight(head), out=self.weights[name])
                    self.layers[name].weight = self.weights[name]
                else:
                    self.layers[name].weight = base
        self.head, self.version = head, version
        return self.decoder


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
        merge_single_head: run a forward of one head's rows on a copy of the backbone with that head's LoRA
            merged in (see the module docstring); it costs the memory of the LoRA'd layers' weights once.
            False saves that memory. Quantized backbones never merge.
    """

    def __init__(self, backbone, tokenizer=None, *, revision: str | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, quantization: str | None = None,
                 num_layers: int | None = None, merge_single_head: bool = True):
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
        self.trunk_sharing_ok: bool | None = None  # set by the first forward that could share a trunk
        self._plans: dict = {}  # trunk plans by rows (see trunk_plan)
        self.merge_single_head = merge_single_head and not quantization
        self._merged: MergedDecoder | None = None  # made by the first forward of one head alone (merged_decoder)

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

    @property
    def num_layers(self) -> int:
        """Decoder layers of the value backbone."""
        return self.decoder.config.num_hidden_layers

    def add_head(self, name: str, lora: LoraConfig | dict | None = None, seed: int | None = None,
                 layers: int | None = None, **metadata) -> HeadConfig:
        """Add a new head: a LoRA adapter (default r=16 on all linear layers) and a zero value layer.

        seed: seed of the adapter's random initialisation (default: torch's global random state).
        layers: put the LoRA on the top `layers` decoder layers only (a shared-trunk head: heads whose LoRA
            starts at the same layer run the layers below it once for all of them); None: every layer.
        """
        if name in self.value_layers:
            raise ValueError(f"Head '{name}' is already on the bank; remove_head('{name}') first or pick another name.")
        if not name or name == "__base__" or not name.replace("-", "_").isidentifier():
            raise ValueError(f"Head name {name!r} is not valid: use letters, digits, '_' or '-' (e.g. 'helpful').")
        lora_config = lora if isinstance(lora, LoraConfig) else LoraConfig(**{**DEFAULT_LORA, **(lora or {})})
        lora_config.base_model_name_or_path = self.backbone_id
        if layers is not None:
            if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= self.num_layers:
                raise ValueError(f"layers={layers!r}: a head's LoRA goes on the top 1 to {self.num_layers} decoder "
                                 f"layers of this backbone (None: all {self.num_layers}).")
            lora_config = copy.copy(lora_config)
            lora_config.layers_to_transform = list(range(self.num_layers - layers, self.num_layers))
            lora_config.layers_pattern = [stack for stack, _ in STACKS if hasattr(self.decoder, stack)] or None
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
            self._plans.clear()
            self._merged = None
        config = HeadConfig(name=name, backbone=self.backbone_id, backbone_revision=self.backbone_revision,
                            backbone_layers=self.backbone_layers, backbone_probe=self.probe,
                            tokenizer_fingerprint=self.fingerprint, trunk_layers=self.lora_start(name), **metadata)
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
            self._plans.clear()
            self._merged = None

    def lora_layers(self, name: str) -> set[int]:
        """The decoder layers carrying head `name`'s LoRA."""
        layers = self.model.peft_config[name].layers_to_transform
        if layers is None:
            return set(range(self.num_layers))
        return set(layers) if isinstance(layers, (list, tuple)) else {int(layers)}

    def lora_start(self, name: str) -> int:
        """The first decoder layer carrying head `name`'s LoRA: the depth of its shared trunk (0: full depth)."""
        return min(self.lora_layers(name))

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

    def same_tokenizer(self, tokenizer) -> bool:
        """Whether `tokenizer` maps text to the same ids as the backbone's."""
        return tokenizer_fingerprint(tokenizer) == self.fingerprint

    def check_tokenizer(self, tokenizer, what: str = "the base model") -> None:
        """Refuse a tokenizer that does not map text to the same ids as the backbone's."""
        if tokenizer is not None and not self.same_tokenizer(tokenizer):
            raise ValueError(
                f"Tokenizer mismatch: {what} uses {describe_tokenizer(tokenizer)} but the value backbone "
                f"{self.backbone_id} uses {describe_tokenizer(self.tokenizer)}. Values are only meaningful on "
                "the backbone's own token ids: pick a backbone that shares the base model's tokenizer, or mix "
                "across tokenizers with Mixer(bank, weights, tokenizer=base_tokenizer), which values the text.")

    # ----------------------------------------------------------------- values
    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       row_heads: list[str], cache=None, row_sequences: Sequence[Hashable] | None = None
                       ) -> torch.Tensor:
        """Run the backbone with head `row_heads[i]` on row i; returns the last hidden states.

        `cache` (a transformers `Cache`) is extended in place by the tokens fed. `row_sequences[i]` names the
        sequence of row i (rows of one sequence hold the same tokens, mask and positions): with it, heads share
        their trunk (see the module docstring), and the cache's layer ℓ holds the rows `layer_rows(...)[ℓ]`.
        """
        with self.lock:
            plan = self.trunk_plan(row_heads, row_sequences)
            if len(plan) == 1 and len(plan[0].keys) == len(row_heads):  # nothing shared: one plain forward
                return self._run_layers(input_ids, attention_mask, position_ids, list(row_heads), cache)
            if attention_mask.dim() == 2:  # a 4D mask, as each later segment cannot tell its past length
                attention_mask = causal_mask(attention_mask, input_ids.shape[1], self.decoder.dtype)
            hidden = None
            for segment in plan:
                rows = segment.rows.to(input_ids.device)
                inputs = input_ids[rows] if hidden is None else hidden[segment.parents.to(hidden.device)]
                model, routing = self._routing(segment.heads)  # before the cut: it must reach every layer
                with self._only_layers(model, segment.start, segment.stop):
                    hidden = self._forward(model, inputs, attention_mask[rows], position_ids[rows], routing, cache,
                                           embedded=segment.start > 0)
            return hidden[plan[-1].of_row.to(hidden.device)]

    def layer_rows(self, row_heads: Sequence[str], row_sequences: Sequence[Hashable] | None) -> list[list[tuple]]:
        """For each decoder layer, the (sequence, head or TRUNK) rows it computes, in the order of the cache's rows."""
        return [segment.keys for segment in self.trunk_plan(row_heads, row_sequences)
                for _ in range(segment.start, segment.stop)]

    def trunk_plan(self, row_heads: Sequence[str], row_sequences: Sequence[Hashable] | None) -> list[TrunkSegment]:
        """The runs of layers one forward makes for these rows: see `TrunkSegment`. Without `row_sequences`, or
        where this backbone cannot share a trunk, one segment of every layer with one row per row.

        Plans are kept by rows (decoding asks for the same rows at every step), until a head is added or removed.
        """
        key = (tuple(row_heads), None if row_sequences is None else tuple(row_sequences))
        if key not in self._plans:
            if len(self._plans) >= 64:  # a server's rows change as requests come and go
                self._plans.clear()
            self._plans[key] = self._plan(row_heads, row_sequences)
        return self._plans[key]

    def _plan(self, row_heads, row_sequences) -> list[TrunkSegment]:
        starts = {h: self.lora_start(h) for h in set(row_heads)}
        lora_in = {h: self.lora_layers(h) for h in starts}
        if row_sequences is None:
            row_sequences = range(len(row_heads))
        if not any(starts.values()) or not self._sharing_ok(next(h for h, s in starts.items() if s)):
            starts = dict.fromkeys(starts, 0)  # every (sequence, head) its own row at every layer
        bounds = sorted({0, *(s for s in starts.values() if s < self.num_layers)}) + [self.num_layers]
        plan = []
        for start, stop in zip(bounds, bounds[1:]):
            row_keys = [(seq, head if starts[head] <= start else TRUNK) for seq, head in zip(row_sequences, row_heads)]
            index = {}
            for row, key in enumerate(row_keys):
                index.setdefault(key, (len(index), row))
            keys = list(index)
            rows = [row for _, row in index.values()]
            parents = [plan[-1].index_of[plan[-1].row_keys[row]] for row in rows] if plan else []
            # rows of one adapter run peft's plain path; a trunk row then runs with its own head active, whose LoRA
            # has not begun in these layers (the bare backbone, without peft's slow disable_adapter); in a mixed
            # batch it is peft's "__base__" row
            adapters = [row_heads[row] for row in rows]
            if len(set(adapters)) > 1:  # peft refuses a name without LoRA in the layers running: BASE computes the same
                adapters = [BASE if head == TRUNK or not lora_in[head] & set(range(start, stop)) else head
                            for _, head in keys]
            plan.append(TrunkSegment(start, stop, keys, torch.tensor(rows), torch.tensor(parents, dtype=torch.long),
                                     torch.tensor([index[k][0] for k in row_keys]), row_keys,
                                     {k: i for k, (i, _) in index.items()}, adapters))
        return plan

    def _run_layers(self, inputs, attention_mask, position_ids, heads, cache):
        """One forward of every decoder layer with head `heads[i]` on row i."""
        model, routing = self._routing(heads)
        return self._forward(model, inputs, attention_mask, position_ids, routing, cache)

    def _routing(self, heads: list[str]) -> tuple[nn.Module, dict]:
        """The model and keyword that run head `heads[i]` on row i: for one head its merged copy (see
        `merged_decoder`) or peft's plain path (~20% faster than a mixed batch), that head then active; for several,
        peft's mixed-adapter batch."""
        if len(set(heads)) > 1:
            return self.model, {"adapter_names": heads}
        merged = self.merged_decoder(heads[0])
        if merged is not None:
            return merged, {}
        if self.model.active_adapter != heads[0]:
            self.model.set_adapter(heads[0], inference_mode=True)
        return self.model, {}

    def merged_decoder(self, head: str) -> nn.Module | None:
        """The decoder with head `head`'s LoRA merged into its weights (see `MergedDecoder`), or None: while gradients
        are recorded (training needs the LoRA), with `merge_single_head=False`, or where the head's layers cannot
        merge (quantized)."""
        if not self.merge_single_head or torch.is_grad_enabled():
            return None
        if self._merged is None:
            self._merged = MergedDecoder(self.decoder)
        return self._merged.for_head(head)

    def _forward(self, model, inputs, attention_mask, position_ids, routing, cache, embedded=False) -> torch.Tensor:
        feed = {"inputs_embeds": inputs} if embedded else {"input_ids": inputs}
        out = model(**feed, attention_mask=attention_mask, position_ids=position_ids, **with_cache(cache),
                    use_cache=cache is not None, **routing)
        return out.last_hidden_state

    @contextmanager
    def _only_layers(self, model: nn.Module, start: int, stop: int):
        """Run only `model`'s decoder layers [start, stop): the final norm only with the last layer."""
        decoder = model.get_base_model() if isinstance(model, PeftModel) else model
        layers_name, norm_name = next(s for s in STACKS if hasattr(decoder, s[0]))
        layers, norm = getattr(decoder, layers_name), getattr(decoder, norm_name)
        setattr(decoder, layers_name, nn.ModuleList(layers[start:stop]))
        if stop < len(layers):
            setattr(decoder, norm_name, nn.Identity())
        try:
            yield
        finally:
            setattr(decoder, layers_name, layers)
            setattr(decoder, norm_name, norm)

    def _sharing_ok(self, head: str) -> bool:
        """Whether running the trunk, then the upper layers from its hidden states, reproduces one whole forward
        on this backbone; checked once per bank on a short input (GPT-2 adds positions to embeddings: it cannot)."""
        if self.trunk_sharing_ok is None:
            self.trunk_sharing_ok = False
            if any(hasattr(self.decoder, a) and hasattr(self.decoder, b) for a, b in STACKS):
                ids = torch.arange(3, 9, device=self.device)[None]
                mask, positions = torch.ones_like(ids), torch.arange(6, device=self.device)[None]
                whole = self._run_layers(ids, mask, positions, [head], None)
                try:
                    self.trunk_sharing_ok = True
                    shared = self.forward_hidden(ids, mask, positions, [head], row_sequences=[0])
                    self.trunk_sharing_ok = torch.allclose(shared, whole, atol=1e-5, rtol=1e-4)
                except (RuntimeError, ValueError, TypeError) as err:
                    logger.warning("Shared-trunk forward raised %r", err)
                    self.trunk_sharing_ok = False
                self._plans.clear()  # the check's own plan assumed sharing
            if not self.trunk_sharing_ok:
                logger.warning("%s cannot run its layers in parts: shared-trunk heads run every layer per head "
                               "(correct, not faster).", self.backbone_id)
        return self.trunk_sharing_ok

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
        n, batch = len(heads), input_ids.shape[0]
        hidden = self.forward_hidden(input_ids.repeat(n, 1), attention_mask.repeat(n, 1),
                                     position_ids_from_mask(attention_mask).repeat(n, 1),
                                     [h for h in heads for _ in range(batch)], row_sequences=list(range(batch)) * n)
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


