"""Base sampling and reward scoring: step 1 and 2 of VAS.

`sample_base` draws completions y ~ π_base(·|x) from the frozen base model once, as a
`datasets.Dataset` with one row per (prompt, repeat); `score` adds one float column per reward.
The same samples then train every value head. Under `accelerate launch` the processes share the
batches out and every process gets the whole dataset; each batch has its own seed, so the samples
are the same for any number of processes.

    samples = sample_base(base, tokenizer, ["Write a haiku"], n_per_prompt=4, max_new_tokens=32)
    samples = score(samples, {"short": lambda prompts, completions: [-len(c) for c in completions]})
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import warnings
from collections.abc import Callable, Mapping, Sequence

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from valuemix.heads.api import APIBase
from valuemix.heads.atomic import atomic_directory
from valuemix.heads.fingerprint import describe_tokenizer, model_name, tokenizer_fingerprint, weights_fingerprint
from valuemix.heads.loading import explain_out_of_memory
from valuemix.heads.processes import process_state
from valuemix.heads.tokens import eos_ids, tokenize_prompts

logger = logging.getLogger(__name__)

Reward = Callable[[list[str], list[str]], Sequence[float]]

FEATURES = datasets.Features({
    "prompt": datasets.Value("string"),
    "completion": datasets.Value("string"),
    "prompt_ids": datasets.List(datasets.Value("int64")),
    "completion_ids": datasets.List(datasets.Value("int64")),
    "finished": datasets.Value("bool"),
    "prompt_index": datasets.Value("int64"),
    "temperature": datasets.Value("float64"),
    "top_k": datasets.Value("int64"),
    "top_p": datasets.Value("float64"),
    "max_new_tokens": datasets.Value("int64"),
    "seed": datasets.Value("int64"),
    "chat_template": datasets.Value("bool"),
    "base_model": datasets.Value("string"),
    "tokenizer_fingerprint": datasets.Value("string"),
})
SAMPLE_COLUMNS = tuple(FEATURES)  # reward names may not take these

# Generation knobs set explicitly to neutral values, so that whatever the model's own
# generation_config says (top_k=50, repetition_penalty=1.1, ...) the samples come from π_base itself.
_NEUTRAL = dict(num_beams=1, num_return_sequences=1, typical_p=1.0, min_p=0.0, epsilon_cutoff=0.0,
                eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                guidance_scale=1.0, renormalize_logits=False)
# Knobs that bend the distribution and cannot be switched off by passing a value: warn instead.
_UNNEUTRAL = ("top_h", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
              "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
              "watermarking_config")
SAMPLING_ADVICE = "lower batch_size or max_new_tokens, or load the base model in bfloat16"
_CACHE_FORMAT = 2  # 2: one seed per batch


def sample_base(base, tokenizer, prompts: Sequence[str], n_per_prompt: int = 4, max_new_tokens: int = 64,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                batch_size: int = 16, chat_template: bool = False, cache_dir: str | os.PathLike | None = None,
                progress: bool = True) -> datasets.Dataset:
    """Sample `n_per_prompt` completions per prompt from the frozen base model.

    base: a causal LM, or an `APIBase` (`heads.api`: a model behind an OpenAI-compatible server), asked for each
    prompt's completions in one request.

    Returns a Dataset of `len(prompts) * n_per_prompt` rows, prompt-major (all repeats of prompt 0
    first), with columns `prompt` (the text given), `completion` (decoded, special tokens skipped),
    `prompt_ids` (the tokens the model saw, no padding), `completion_ids` (generated tokens up to and
    including the first EOS), `finished` (ended with EOS), `prompt_index` and the settings of the run.
    `top_k=0` and `top_p=1.0` mean no truncation: the model's generation_config defaults do not apply.
    `chat_template=True` wraps each prompt as one user message with a generation prompt.
    The same arguments and seed give the same dataset; with `cache_dir` it is sampled once and
    loaded from `cache_dir/<key>` afterwards.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string; pass [prompt]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {i} is empty or whitespace-only ({prompt!r}); remove it or give it text")
    check_whole_number("n_per_prompt", n_per_prompt, 1)
    check_whole_number("max_new_tokens", max_new_tokens, 1)
    check_whole_number("seed", seed, 0, 2**63 - 1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use a small value such as 1e-4 for greedy")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {describe_tokenizer(tokenizer)} has no pad token; "
                         "set tokenizer.pad_token = tokenizer.eos_token before sampling")
    api = isinstance(base, APIBase)
    if not api:
        n_embeddings = base.get_input_embeddings().num_embeddings
        max_id = max(tokenizer.get_vocab().values())
        if max_id >= n_embeddings:
            raise ValueError(f"tokenizer {describe_tokenizer(tokenizer)} does not belong to model "
                             f"{model_name(base)}: it has token id {max_id} but the model embeds only {n_embeddings} "
                             "tokens; load the tokenizer saved with the model")

    encoded = tokenize_prompts(tokenizer, prompts, chat_template)
    if not api:
        check_context(base, [len(ids) for ids in encoded], max_new_tokens)
    settings = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                    max_new_tokens=int(max_new_tokens), seed=int(seed), chat_template=bool(chat_template),
                    base_model=base.model if api else model_name(base),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))

    path = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps({
            "format": _CACHE_FORMAT, "prompts": prompts, "prompt_ids": encoded, "settings": settings,
            "n_per_prompt": n_per_prompt, "batch_size": batch_size,
            "weights": f"{base.base_url} {base.model}" if api else weights_fingerprint(base),
        }).encode()).hexdigest()[:32]
        path = os.path.join(os.fspath(cache_dir), key)
        if os.path.isdir(path):
            logger.info("sample_base: cache hit, loading %s", path)
            return datasets.load_from_disk(path)

    state = process_state()  # one process, or one of `accelerate launch`'s
    if api:
        rows = _sample_api(base, tokenizer, prompts, encoded, n_per_prompt, progress, settings)
    else:
        rows = _generate(base, tokenizer, prompts, encoded, n_per_prompt, batch_size, progress, settings, state)
    dataset = datasets.Dataset.from_list(rows, features=FEATURES)
    if path is not None and state.is_main_process:
        _save_atomically(dataset, path)
    state.wait_for_everyone()
    return dataset


def is_dataset_folder(path: str | os.PathLike) -> bool:
    """True for a folder written by `Dataset.save_to_disk` (and so by `valuemix sample` / `score`)."""
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def load_samples(samples) -> datasets.Dataset:
    """`samples` itself if it is a Dataset, else the samples saved in that folder (FileNotFoundError if none)."""
    if isinstance(samples, datasets.Dataset):
        return samples
    path = os.fspath(samples)
    if not os.path.isdir(path) or not is_dataset_folder(path):
        raise FileNotFoundError(f"No samples at {path}: make them with vm.sample_base(...).save_to_disk({path!r}) or "
                                f"`valuemix sample --out {path}`.")
    return datasets.load_from_disk(path)


def check_whole_number(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; a ValueError naming the argument otherwise (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {value}.")
    return value


def context_length(model) -> int | None:
    """The longest sequence a model takes (max_position_embeddings), or None when its config has no limit."""
    return getattr(model.config, "max_position_embeddings", None)


def check_context(model, prompt_lengths: Sequence[int], max_new_tokens: int, what: str = "the base model") -> None:
    """Refuse prompts that, with `max_new_tokens` more tokens, do not fit in the model's context."""
    limit = context_length(model)
    if limit is None or not prompt_lengths:
        return
    row = max(range(len(prompt_lengths)), key=lambda i: prompt_lengths[i])
    if prompt_lengths[row] + max_new_tokens > limit:
        raise ValueError(f"Prompt {row} is {prompt_lengths[row]} tokens long and max_new_tokens is {max_new_tokens}: "
                         f"{prompt_lengths[row] + max_new_tokens} tokens do not fit in {what}'s context of {limit} "
                         f"tokens ({model_name(model)}). Shorten the prompt or lower max_new_tokens.")


def _generate(base, tokenizer, prompts, encoded, n_per_prompt, batch_size, progress, settings, state) -> list[dict]:
    """Sample every (prompt, repeat) pair in left-padded batches; one dict per row, in prompt-major order.

    Batch b is drawn with the seed (seed, b) by process b mod n; the rows are then gathered to all processes.
    """
    stop_ids = eos_ids(base, tokenizer)
    pad = tokenizer.pad_token_id
    bent = [k for k in _UNNEUTRAL if getattr(base.generation_config, k, None) is not None]
    if bent:
        warnings.warn(f"the generation_config of {settings['base_model']} sets {bent}; these bend the base "
                      "distribution and are applied to the samples too")
    pairs = [(i, r) for i in range(len(prompts)) for r in range(n_per_prompt)]
    starts = list(range(0, len(pairs), batch_size))
    rows = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode(), \
            tqdm(total=len(pairs), desc="sampling", disable=not (progress and state.is_main_process)) as bar:
        for b in range(state.process_index, len(starts), state.num_processes):
            start = starts[b]
            torch.manual_seed(int(np.random.SeedSequence([settings["seed"], b]).generate_state(1)[0]))
            batch = [encoded[i] for i, _ in pairs[start:start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=base.device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch],
                                          device=base.device)
            with explain_out_of_memory(f"Sampling the base (batch_size {batch_size})", SAMPLING_ADVICE):
                out = base.generate(
                    input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                    max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                    top_k=settings["top_k"], top_p=settings["top_p"], pad_token_id=pad,
                    eos_token_id=stop_ids or None, **_NEUTRAL,
                )
            for position, generated in enumerate(out[:, width:].tolist(), start):
                i = pairs[position][0]
                ends = [t for t, token in enumerate(generated) if token in stop_ids]
                completion_ids = generated[:ends[0] + 1] if ends else generated
                rows.append((position, dict(
                    prompt=prompts[i], completion=tokenizer.decode(completion_ids, skip_special_tokens=True),
                    prompt_ids=encoded[i], completion_ids=completion_ids, finished=bool(ends), prompt_index=i,
                    **settings,
                )))
            bar.update(len(batch) * state.num_processes)
    return [row for _, row in sorted(gather_object(rows), key=lambda item: item[0])]


def _sample_api(api, tokenizer, prompts, encoded, n_per_prompt, progress, settings) -> list[dict]:
    """Sample each prompt's `n_per_prompt` completions in one request to an API base (seed: (seed, prompt))."""
    rows = []
    for i in tqdm(range(len(prompts)), desc="sampling (API)", disable=not progress):
        seed = int(np.random.SeedSequence([settings["seed"], i]).generate_state(1)[0]) % 2**31
        for completion_ids, finished in api.sample(encoded[i], n_per_prompt, settings["max_new_tokens"],
                                                   settings["temperature"], settings["top_k"], settings["top_p"],
                                                   seed):
            rows.append(dict(prompt=prompts[i], completion=tokenizer.decode(completion_ids, skip_special_tokens=True),
                             prompt_ids=encoded[i], completion_ids=completion_ids, finished=finished, prompt_index=i,
                             **settings))
    return rows


def _save_atomically(dataset: datasets.Dataset, path: str) -> None:
    """save_to_disk into a temp dir beside `path`, then rename it into place (a crash leaves no half cache).

    A concurrent run that saved the same key first wins: its folder is kept.
    """
    with atomic_directory(path, overwrite=False) as tmp:
        dataset.save_to_disk(tmp)


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")


def score(samples: datasets.Dataset | str | os.PathLike, rewards: Mapping[str, Reward], batch_size: int = 64,
          progress: bool = True) -> datasets.Dataset:
    """Add one float64 column per reward: `rewards[name](prompts, completions)` for every row.

    `samples` is a Dataset or the folder it was saved to. A reward maps a batch of prompts and
    completions (lists of `batch_size` strings or fewer) to one finite number per completion (rewards
    per completion, any scale). A column that already has the reward's name is replaced. Row order is kept.
    """
    samples = load_samples(samples)
    if not rewards:
        raise ValueError("rewards is empty; pass a dict such as {'helpful': fn}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    missing = {"prompt", "completion"} - set(samples.column_names)
    if missing:
        raise ValueError(f"samples lack the columns {sorted(missing)}; make them with sample_base")
    for name in rewards:
        if not isinstance(name, str) or not name:
            raise ValueError(f"reward names must be non-empty strings, got {name!r}")
        if name in SAMPLE_COLUMNS:
            raise ValueError(f"reward name {name!r} clashes with a sample column {SAMPLE_COLUMNS}; rename the reward")

    prompts, completions = list(samples["prompt"]), list(samples["completion"])
    n = len(prompts)
    with tqdm(total=n * len(rewards), desc="scoring", disable=not progress) as bar:
        for name, fn in rewards.items():
            bar.set_postfix_str(name)
            values: list[float] = []
            for start in range(0, n, batch_size):
                batch_prompts = prompts[start:start + batch_size]
                out = fn(batch_prompts, completions[start:start + batch_size])
                if hasattr(out, "tolist"):  # torch tensors, numpy arrays
                    out = out.tolist()
                if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
                    raise TypeError(f"reward {name!r} returned {type(out).__name__}; it must return a list of "
                                    "floats, one per completion")
                if len(out) != len(batch_prompts):
                    last = start + len(batch_prompts) - 1
                    raise ValueError(f"reward {name!r} returned {len(out)} values for a batch of "
                                     f"{len(batch_prompts)} completions (rows {start}-{last}); "
                                     "it must return one value per completion")
                for j, value in enumerate(out):
                    if not isinstance(value, numbers.Real) or not math.isfinite(value):
                        row = start + j
                        raise ValueError(f"reward {name!r} returned {value!r} for row {row} (prompt "
                                         f"{_short(prompts[row])}, completion {_short(completions[row])}); "
                                         "rewards must be finite numbers")
                    values.append(float(value))
                bar.update(len(batch_prompts))
            if name in samples.column_names:
                samples = samples.remove_columns(name)
            samples = samples.add_column(name, values, feature=datasets.Value("float64"))
    return samples
