"""Head files: save a value head to a folder, load it back from a folder or a Hugging Face Hub repo.

A head folder (DESIGN.md, "A head on disk"):

    adapter_config.json, adapter_model.safetensors   peft's own files: the LoRA adapter
    value_head.safetensors                           the scalar value layer: weight (1, hidden), bias (1,)
    head_config.json                                 HeadConfig: reward, backbone, tokenizer fingerprint, λ, ...
    README.md                                        model card with YAML metadata (huggingface_hub.ModelCard)

Saving is atomic (the folder appears whole or not at all). Loading reads safetensors only, never
pickle, and checks everything (files, backbone, tokenizer, shapes, name) before it touches the bank.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig, PeftConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from valuemix.heads.atomic import atomic_directory
from valuemix.heads.bank import ADAPTER, VALUE, few
from valuemix.heads.head_config import VALUEMIX_VERSION, HeadConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VALUE_WEIGHTS = "value_head.safetensors"
HEAD_CONFIG = "head_config.json"
MODEL_CARD = "README.md"
REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, VALUE_WEIGHTS, HEAD_CONFIG)
CARD_TEMPLATE = Path(__file__).parent / "templates" / "head_card.md"
PROBE_RTOL, PROBE_ATOL = 2e-2, 1e-3  # backbone probes agree across dtypes (bf16 ≈ 3 significant digits)
_NEEDS = f"A valuemix head needs {', '.join(REQUIRED_FILES)}"


# ------------------------------------------------------------------------------------------ save
def save_head(bank, name: str, directory: str | os.PathLike, *, repo_id: str | None = None) -> str:
    """Write head `name` of `bank` to `directory`, atomically; returns the folder's absolute path.

    An existing head folder at `directory` is replaced; any other non-empty folder is refused.
    `repo_id` (when the folder is about to be pushed) is what the model card's usage snippet loads.
    """
    bank.check_heads([name])
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.isfile(os.path.join(directory, HEAD_CONFIG)):
        raise FileExistsError(f"{directory} is a non-empty folder but not a valuemix head (no {HEAD_CONFIG}); "
                              "save_head replaces the whole folder, so pick a new or empty folder.")
    config = replace(bank.configs[name], valuemix_version=VALUEMIX_VERSION)
    adapter_config = copy.deepcopy(bank.model.peft_config[name])
    adapter_config.inference_mode = True  # as peft's own save_pretrained writes it
    state = bank.head_state(name)  # a consistent snapshot even while another thread trains or decodes
    adapter_state = {k[len(ADAPTER):]: v.to("cpu").contiguous() for k, v in state.items() if k.startswith(ADAPTER)}
    value_state = {k[len(VALUE):]: v.to("cpu", torch.float32).contiguous() for k, v in state.items()
                   if k.startswith(VALUE)}
    card = head_card(config, source=repo_id or directory)
    with atomic_directory(directory) as tmp:
        adapter_config.save_pretrained(tmp)
        save_file(adapter_state, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        save_file(value_state, os.path.join(tmp, VALUE_WEIGHTS), metadata={"format": "pt"})
        Path(tmp, HEAD_CONFIG).write_text(config.to_json() + "\n", encoding="utf-8")
        card.save(os.path.join(tmp, MODEL_CARD))
    return directory


def head_card(config: HeadConfig, source: str | None = None) -> ModelCard:
    """The model card of a head: YAML metadata + what it values, how it was trained, how to use it.

    `source` is the folder or Hub repo id the usage snippet loads the head from.
    """
    backbone = config.backbone or "<value backbone>"
    # The snippet loads the recorded base model when it can be loaded (a folder or a Hub id; a model built
    # in memory records only its class name), else the backbone, which shares the base model's tokenizer.
    loadable = config.base_model and (os.path.isdir(config.base_model) or looks_like_repo_id(config.base_model))
    base = config.base_model if loadable else backbone
    card_data = ModelCardData(
        library_name="valuemix",
        base_model=backbone if looks_like_repo_id(backbone) else None,
        tags=["valuemix", "value-head", "vas", config.name],
        license="apache-2.0",
    )
    if config.lam is None:
        lam_text = "not recorded"
    else:
        lam_text = f"λ = {config.lam:g}, γ = 1" + (" (Monte Carlo)" if config.lam == 1 else "")
    worked = config.evaluation.get("working_beta_range", config.beta_range)
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        name=config.name,
        reward=config.reward,
        backbone=backbone,
        backbone_on_hub=looks_like_repo_id(backbone),
        backbone_revision=config.backbone_revision,
        base_model_id=config.base_model,
        tokenizer_fingerprint=config.tokenizer_fingerprint or "not recorded",
        base_tokenizer=config.base_tokenizer,
        data_size=config.data_size,
        lam_text=lam_text,
        reward_mean=f"{config.reward_mean:.4g}",
        reward_std=f"{config.reward_std:.4g}",
        beta_min=f"{config.beta_range[0]:g}",
        beta_max=f"{config.beta_range[1]:g}",
        evaluation=config.evaluation,
        worked_min=f"{worked[0]:g}",
        worked_max=f"{worked[1]:g}",
        metrics=[(key, f"{value:.4g}" if isinstance(value, float) else value)
                 for key, value in sorted(config.metrics.items())],
        valuemix_version=config.valuemix_version or "unknown",
        base_literal=repr(base),
        backbone_layers=config.backbone_layers,
        trunk_layers=config.trunk_layers,
        bank_call=bank_call(replace(config, backbone=backbone)),
        source_literal=repr(os.fspath(source) if source is not None else config.name),
        name_literal=repr(config.name),
    )


# ------------------------------------------------------------------------------------------ load
def load_head(bank, source: str | os.PathLike, name: str | None = None, revision: str | None = None,
              token: str | bool | None = None) -> str:
    """Load a head from a folder or a Hub repo id ("user/repo") onto `bank`; returns its name on the bank.

    `name` loads it under another name (e.g. a second copy). `revision` and `token` apply to Hub repos.
    Raises FileNotFoundError (missing files, unknown repo, not cached offline) or ValueError (corrupt
    files, another backbone or tokenizer, wrong shapes, a name already on the bank); on any error the
    bank is left as it was.
    """
    folder, label = resolve_head_folder(source, revision=revision, token=token)
    config, lora_config, adapter_state, value_state = read_head_folder(folder, label)
    check_head_fits(bank, config)
    _check_value_state(value_state, bank.hidden_size, config.name, label)
    name = name or config.name
    if name in bank.value_layers:
        raise ValueError(f"A head named '{name}' is already on the bank; load this one under another name with "
                         f"bank.load_head({os.fspath(source)!r}, name='{name}_2'), or bank.remove_head('{name}') "
                         "first.")
    lora_config.inference_mode = False  # the bank manages gradients itself, as for a head made by add_head
    with bank.lock:
        bank.add_head(name, lora=lora_config)
        if config.trunk_layers != bank.lora_start(name):
            start = bank.lora_start(name)
            bank.remove_head(name)
            raise ValueError(f"{HEAD_CONFIG} in {label} records a shared trunk of {config.trunk_layers} layers but "
                             f"{ADAPTER_CONFIG} puts the LoRA from layer {start}; re-save the head.")
        try:
            bank.set_head_state(name, {f"{ADAPTER}{k}": v for k, v in adapter_state.items()}
                                | {f"{VALUE}{k}": v for k, v in value_state.items()})
        except ValueError as err:  # adapter keys that do not fit
            bank.remove_head(name)
            raise ValueError(f"{ADAPTER_WEIGHTS} in {label} does not match {ADAPTER_CONFIG}: {err}; re-save the "
                             "head.") from err
        except RuntimeError as err:  # size mismatches from load_state_dict
            bank.remove_head(name)
            problems = [line.strip() for line in str(err).splitlines()[1:]] or [str(err)]
            raise ValueError(f"{ADAPTER_WEIGHTS} in {label} does not fit the adapter described by "
                             f"{ADAPTER_CONFIG} on this backbone ({few(problems, 2)}); re-save the head.") from err
        except BaseException:
            bank.remove_head(name)
            raise
        bank.configs[name] = replace(config, name=name)
    return name


def resolve_head_folder(source: str | os.PathLike, revision: str | None = None,
                        token: str | bool | None = None) -> tuple[str, str]:
    """A local folder for `source` (a folder, or a Hub repo id fetched with snapshot_download).

    Returns (folder, label) where label names the source in error messages.
    """
    path = os.fspath(source)
    if os.path.isdir(path):
        if revision is not None:
            warnings.warn(f"revision={revision!r} is ignored: {path!r} is a local folder, not a Hub repo.")
        return path, f"folder {path}"
    if os.path.exists(path):
        raise NotADirectoryError(f"{path} is a file, not a head folder. {_NEEDS}.")
    set_aside = glob.glob(os.path.join(glob.escape(os.path.dirname(os.path.abspath(path))),
                                       f".{glob.escape(os.path.basename(os.path.abspath(path)))}.old-*"))
    if set_aside:
        raise FileNotFoundError(f"No head folder at {path!r}: a save over it was interrupted, and the previous head "
                                f"is at {set_aside[0]!r}; rename that folder back to {path!r} to load it.")
    if not looks_like_repo_id(path):
        raise FileNotFoundError(f"No head folder at {path!r}, and it is not a Hub repo id ('user/name'). "
                                "Pass the folder given to bank.save_head, or a Hub repo id.")
    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(path, revision=revision, token=token, library_name="valuemix",
                                   library_version=VALUEMIX_VERSION, allow_patterns=[*REQUIRED_FILES, MODEL_CARD])
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"Hub repo {path!r} has no revision {revision!r}; pass an existing branch, tag "
                                "or commit as revision=.") from err
    except RepositoryNotFoundError as err:  # also gated/private repos without a valid token
        raise FileNotFoundError(f"No local folder {path!r} and no Hub repo {path!r} (or it is private or gated: "
                                "pass token=...). Check the repo id or the folder path.") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise FileNotFoundError(
            f"No local folder {path!r}, and Hub repo {path!r}{at} could not be fetched: the Hub is not reachable "
            f"(offline mode or no network) and the repo is not in the local Hugging Face cache. Download it once "
            f"where the Hub is reachable (huggingface_hub.snapshot_download({path!r})), or pass a local folder."
        ) from err
    except OSError as err:  # other HTTP errors: server down, proxy, ...
        raise OSError(f"Could not fetch Hub repo {path!r}{at}: {err}") from err
    return folder, f"Hub repo {path!r}{at} ({folder})"


def looks_like_repo_id(text: str) -> bool:
    """True for 'user/name' strings that are valid Hub repo ids and not an existing local path."""
    if text.count("/") != 1 or text.startswith((".", "~")) or os.path.isabs(text) or os.path.exists(text):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_head_fits(bank, config: HeadConfig) -> None:
    """Refuse a head trained with another tokenizer or on another backbone checkpoint than the bank's."""
    if config.tokenizer_fingerprint != bank.fingerprint:
        raise ValueError(
            f"Head '{config.name}' was trained with tokenizer fingerprint {config.tokenizer_fingerprint or '(none)'} "
            f"(backbone {config.backbone}) but the bank's tokenizer is {bank.fingerprint} (backbone "
            f"{bank.backbone_id}); load it on a bank of {bank_call(config)}.")
    if config.backbone_layers != bank.backbone_layers:
        def layers(n):
            return f"the first {n} decoder layers" if n else "every decoder layer"
        raise ValueError(
            f"Head '{config.name}' was trained on {layers(config.backbone_layers)} of backbone {config.backbone} but "
            f"the bank runs {layers(bank.backbone_layers)} of {bank.backbone_id}; load it on {bank_call(config)}.")
    head_probe, bank_probe = list(config.backbone_probe), list(bank.probe)
    if not head_probe or not bank_probe:
        return  # a quantized backbone: its weights cannot be compared, the tokenizer check above stands
    if len(head_probe) != len(bank_probe) or not np.allclose(head_probe, bank_probe, rtol=PROBE_RTOL,
                                                             atol=PROBE_ATOL):
        raise ValueError(
            f"Head '{config.name}' was trained for backbone {config.backbone} but the bank holds "
            f"{bank.backbone_id} (their weights differ); load it with {bank_call(config)}.")


def bank_call(config: HeadConfig) -> str:
    """The `ValueBank(...)` call that builds the backbone a head was trained on, as Python source."""
    cut = f", num_layers={config.backbone_layers}" if config.backbone_layers else ""
    return f"ValueBank({config.backbone!r}{cut})"


# --------------------------------------------------------------------------------------- readers
def read_head_config(source: str | os.PathLike, revision: str | None = None, token=None) -> HeadConfig:
    """The HeadConfig of a head folder or Hub repo id, without reading its weights (checked as load_head does)."""
    folder, label = resolve_head_folder(source, revision, token)
    return _read_head_config(folder, label)


def read_head_folder(folder: str, label: str | None = None):
    """(HeadConfig, LoraConfig, adapter tensors, value tensors) of a head folder, every file checked.

    `label` names the folder in error messages (default: "folder FOLDER"). Raises FileNotFoundError for a
    missing file and ValueError for one that is corrupt; reads safetensors only.
    """
    label = label or f"folder {folder}"
    config = _read_head_config(folder, label)
    return (config, _read_adapter_config(folder, label), _read_safetensors(folder, ADAPTER_WEIGHTS, label),
            _read_safetensors(folder, VALUE_WEIGHTS, label))


def _check_files(folder: str, label: str) -> None:
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    if HEAD_CONFIG in missing:
        raise FileNotFoundError(f"{label} is not a valuemix head: it has no {HEAD_CONFIG} (missing: "
                                f"{', '.join(missing)}). {_NEEDS}; write one with bank.save_head(name, folder).")
    if missing:
        raise FileNotFoundError(f"{label} is missing {', '.join(missing)}. {_NEEDS}; re-download the head "
                                "or save it again with bank.save_head(name, folder).")


def _read_head_config(folder: str, label: str) -> HeadConfig:
    _check_files(folder, label)
    path = os.path.join(folder, HEAD_CONFIG)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{HEAD_CONFIG} in {label} is not valid JSON ({err}); re-download or re-save the head.") \
            from err
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        raise ValueError(f"{HEAD_CONFIG} in {label} is not a head config: it needs a JSON object with a 'name'; "
                         "re-download or re-save the head.")
    try:
        return HeadConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{HEAD_CONFIG} in {label} has invalid fields ({err}); re-save the head.") from err


def _read_adapter_config(folder: str, label: str) -> LoraConfig:
    try:
        config = PeftConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as err:  # bad JSON, unknown peft_type or fields
        raise ValueError(f"{ADAPTER_CONFIG} in {label} is not a valid peft adapter config ({err}); "
                         "re-download or re-save the head.") from err
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{ADAPTER_CONFIG} in {label} describes a {config.peft_type} adapter; valuemix heads are "
                         "LoRA adapters.")
    return config


def _read_safetensors(folder: str, filename: str, label: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(os.path.join(folder, filename))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{filename} in {label} is corrupt or not a safetensors file ({err}); re-download the head "
                         "or re-save it with bank.save_head.") from err


def _check_value_state(state: dict[str, torch.Tensor], hidden: int, head: str, label: str) -> None:
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != {"weight": (1, hidden), "bias": (1,)}:
        raise ValueError(f"{VALUE_WEIGHTS} in {label} holds {shapes} but the bank's value layer needs "
                         f"{{'weight': (1, {hidden}), 'bias': (1,)}}: head '{head}' does not fit this backbone "
                         f"(hidden size {hidden}).")
