"""The workflow subcommands: `valuemix sample`, `score`, `train` and `push`.

    valuemix sample --base HuggingFaceTB/SmolLM2-135M-Instruct --prompts prompts.txt --out runs/samples
    valuemix score  --samples runs/samples --reward short=brevity polite=classifier:MODEL:LABEL
    valuemix train  --backbone HuggingFaceTB/SmolLM2-135M-Instruct --samples runs/samples --reward short \\
                    --out runs/heads/short
    valuemix push   runs/heads/short alice/vm-short

Each subcommand is a settings dataclass (its fields are the flags; see valuemix/options.py), a
`make_*_parser()` and a `*_main(argv)`, bundled as a `Subcommand` that valuemix/cli.py registers.
Every subcommand also takes `--config FILE` (YAML or JSON).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from valuemix.options import make_parser, parse

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("8bit", "4bit")  # heads.loading.QUANTIZATIONS, without importing torch for --help
REWARDS_FILE = "valuemix_rewards.json"  # beside a scored dataset: what each reward column measures


class Subcommand(NamedTuple):
    """One `valuemix` subcommand: its parser (for --help and tests) and its entry point."""

    make_parser: Callable
    main: Callable


# ------------------------------------------------------------------------------- steering a base
@dataclass
class ModelArgs:
    """The models `valuemix generate` and `valuemix ui` steer."""

    base: str = field(metadata={"metavar": "ID_OR_PATH",
        "help": "the base model: a local folder or Hugging Face Hub id"})
    heads: list[str] = field(metadata={"metavar": "HEAD", "help": "head folders or Hub repo ids to load"})
    backbone: str | None = field(default=None, metadata={"metavar": "ID_OR_PATH",
        "help": "the value backbone the heads were trained on: a folder or Hub id (required, except for "
                "`valuemix ui --server`)"})
    num_layers: int | None = field(default=None, metadata={
        "help": "use only the backbone's first N decoder layers (as the heads were trained; see their card)"})
    chat_template: bool = field(default=False, metadata={
        "help": "wrap each prompt as a user message with the tokenizer's chat template"})
    device: str = field(default="cpu", metadata={"help": "device to run the models on"})
    dtype: str = field(default="float32", metadata={"choices": DTYPES,
        "help": "dtype of the base model and the backbone"})


def load_models(args: ModelArgs):
    """(base, tokenizer, bank with the heads loaded) from the flags."""
    from valuemix.heads.loading import load_base

    require_backbone(args)  # before loading the base
    base, tokenizer = load_base(absolute_if_folder(args.base), args.device, args.dtype)
    return base, tokenizer, load_bank(args)


def require_backbone(args: ModelArgs) -> None:
    if not args.backbone:
        raise ValueError("--backbone is required: the value backbone the heads were trained on (a folder or Hub id).")


def load_bank(args: ModelArgs):
    """The value bank with the heads loaded, from the flags."""
    require_backbone(args)
    import torch

    from valuemix.heads.bank import ValueBank

    bank = ValueBank(absolute_if_folder(args.backbone), dtype=getattr(torch, args.dtype), device=args.device,
                     num_layers=args.num_layers)
    bank.load_head([absolute_if_folder(h) for h in args.heads])
    return bank


# ------------------------------------------------------------------------------------------ sample
@dataclass
class SampleArgs:
    """Settings of `valuemix sample`."""

    base: str = field(metadata={"metavar": "ID_OR_PATH",
        "help": "the base model to sample from: a local folder or a Hugging Face Hub id"})
    prompts: str = field(metadata={"metavar": "FILE", "help": (
        "prompts file: .txt (one prompt per line, blank lines skipped), .jsonl (one object with a "
        "\"prompt\" field per line) or .json (a list of strings or of such objects)"
    )})
    out: str = field(metadata={"metavar": "DIR", "help": (
        "folder to save the samples to (a datasets folder, written atomically; an existing samples folder"
        " is replaced)"
    )})
    n_per_prompt: int = field(default=4, metadata={"help": "completions sampled per prompt"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest completion, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens only (0: no limit)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold (1.0: no limit)"})
    seed: int = field(default=0, metadata={"help": "random seed; the same settings and seed give the same samples"})
    chat_template: bool = field(default=False, metadata={
        "help": "wrap each prompt as a user message with the tokenizer's chat template"})
    batch_size: int = field(default=16, metadata={"help": "rows generated together"})
    device: str = field(default="auto", metadata={"help": (
        "device to run the base model on (cpu, cuda, mps, ...); auto: this process's device under "
        "`accelerate launch` (one GPU each), else the first GPU, else the CPU"
    )})
    dtype: str = field(default="float32", metadata={"choices": DTYPES, "help": "dtype to run the base model in"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def make_sample_parser():
    return make_parser("valuemix sample", "Sample completions from the frozen base model once (step 1 of VAS); "
                                          "the same samples train every head.", SampleArgs)


def sample_main(argv=None) -> str:
    """Sample the base model on a prompts file and save the samples; returns the folder."""
    from valuemix.heads.processes import is_main_process, resolve_device
    from valuemix.heads.sampling import sample_base

    parser = make_sample_parser()
    (args,) = parse(parser, argv, "sample")
    prompts = read_prompts(args.prompts)
    args.base = absolute_if_folder(args.base)  # recorded in the samples and, later, in the head's card
    from valuemix.heads.loading import load_base

    base, tokenizer = load_base(args.base, resolve_device(args.device), args.dtype)
    samples = sample_base(base, tokenizer, prompts, n_per_prompt=args.n_per_prompt,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                          chat_template=args.chat_template, progress=args.progress)
    if not is_main_process():  # under `accelerate launch` every process has the samples; one saves them
        return os.path.abspath(args.out)
    out = save_dataset(samples, args.out)
    finished = sum(samples["finished"])
    print(f"Saved {len(samples)} samples ({len(prompts)} prompts x {args.n_per_prompt}; {finished} ended with EOS) "
          f"from {args.base} to {out}")
    return out


def absolute_if_folder(source: str) -> str:
    """A local folder as an absolute path (so that a card written later names it from anywhere); ids unchanged."""
    return os.path.abspath(source) if os.path.isdir(source) else source


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl (objects with "prompt") or .json (list) file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"No prompts file at {path}: give a .txt file with one prompt per line, or a "
                                ".jsonl/.json file of objects with a \"prompt\" field.")
    text = file.read_text(encoding="utf-8")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({err}).") from err
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}).") from err
        items = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(f"{path} must hold a list of prompts (strings or objects with a \"prompt\" field), "
                             "or an object with a \"prompts\" list.")
    else:
        return [line for line in text.splitlines() if line.strip()] or _no_prompts(path)
    prompts = []
    for number, item in enumerate(items, 1):
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}, item {number}: expected a non-empty string or an object with a \"prompt\" "
                             f"string, got {item!r}.")
        prompts.append(prompt)
    return prompts or _no_prompts(path)


def _no_prompts(path):
    raise ValueError(f"{path} holds no prompts.")


def save_dataset(dataset, out: str, rewards: dict | None = None) -> str:
    """`dataset.save_to_disk(out)` atomically, with the reward descriptions beside it; returns the folder."""
    from valuemix.heads.atomic import atomic_directory
    from valuemix.heads.sampling import is_dataset_folder

    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not is_dataset_folder(out):
        raise FileExistsError(f"{out} is a non-empty folder but not a saved dataset; it would be replaced, so "
                              "pick a new or empty folder.")
    with atomic_directory(out) as tmp:
        dataset.save_to_disk(tmp)
        if rewards:
            Path(tmp, REWARDS_FILE).write_text(json.dumps(rewards, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def load_samples(path: str):
    """(dataset, reward descriptions) from a folder written by `valuemix sample` / `score` (or save_to_disk)."""
    from valuemix.heads.sampling import load_samples as load_dataset_folder

    samples = load_dataset_folder(path)
    described = Path(path, REWARDS_FILE)
    rewards = json.loads(described.read_text(encoding="utf-8")) if described.is_file() else {}
    return samples, rewards


# ------------------------------------------------------------------------------------------- score
@dataclass
class ScoreArgs:
    """Settings of `valuemix score`."""

    samples: str = field(metadata={"metavar": "DIR", "help": "folder of samples from `valuemix sample`"})
    reward: list[str] = field(metadata={"metavar": "NAME=SPEC", "help": (
        "a reward column to add, as NAME=SPEC (e.g. short=brevity, no_city=keywords:Paris,London:absent);"
        " a column of the same name is replaced"
    )})
    out: str | None = field(default=None, metadata={"metavar": "DIR",
        "help": "folder to save the scored samples to (if not given: replace --samples in place, atomically)"})
    batch_size: int = field(default=64, metadata={"help": "completions per reward call"})
    tokenizer: str | None = field(default=None, metadata={"metavar": "ID_OR_PATH",
        "help": "tokenizer for length:tokens rewards, a folder or Hub id (if not given: the samples' base model)"})
    device: str = field(default="cpu", metadata={"help": "device to run model rewards on"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def make_score_parser():
    from valuemix.reward_specs import SPECS

    return make_parser("valuemix score", "Score samples with rewards (step 2 of VAS): one float column per "
                                         f"reward.\n\nReward specs (--reward NAME=SPEC ...):\n{SPECS}", ScoreArgs)


def score_main(argv=None) -> str:
    """Add reward columns to a samples folder; returns the folder written."""
    from valuemix.heads.sampling import score
    from valuemix.reward_specs import parse_reward

    (args,) = parse(make_score_parser(), argv, "score")
    samples, described = load_samples(args.samples)

    def tokenizer():
        from transformers import AutoTokenizer

        source = args.tokenizer or (samples[0]["base_model"] if "base_model" in samples.column_names else None)
        if not source:
            raise ValueError("length:tokens needs --tokenizer: the samples do not name their base model.")
        return AutoTokenizer.from_pretrained(source)

    reward_fns = {}
    for text in args.reward:
        name, fn, description = parse_reward(text, tokenizer=tokenizer, device=args.device)
        reward_fns[name] = fn
        described[name] = {"spec": text.partition("=")[2].strip(), "description": description}
    scored = score(samples, reward_fns, batch_size=args.batch_size, progress=args.progress)
    out = save_dataset(scored, args.out or args.samples, rewards=described)
    for name in reward_fns:
        values = scored[name]
        print(f"{name}: {described[name]['description']} (mean {sum(values) / len(values):.4g}, "
              f"min {min(values):.4g}, max {max(values):.4g})")
    print(f"Saved {len(scored)} scored samples to {out}")
    return out


# ------------------------------------------------------------------------------------------- train
@dataclass
class TrainArgs:
    """Settings of `valuemix train` besides the training ones (TrainConfig)."""

    backbone: str = field(metadata={"metavar": "ID_OR_PATH", "help": (
        "the value backbone: a local folder or Hub id of a causal LM (with another tokenizer than the base "
        "model's, the head is trained on the samples' text: see --base-tokenizer)")})
    samples: str = field(metadata={"metavar": "DIR", "help": "folder of scored samples from `valuemix score`"})
    reward: str = field(metadata={"metavar": "COLUMN", "help": "the reward column to train on"})
    out: str = field(metadata={"metavar": "DIR",
        "help": "folder to save the trained head to (replaced if it holds a head)"})
    name: str | None = field(default=None, metadata={"help": "the head's name (if not given: the reward column)"})
    description: str | None = field(default=None, metadata={"metavar": "TEXT", "help": (
        "what the head values, in words, for its card (if not given: the reward's description from `valuemix "
        "score`)"
    )})
    base_tokenizer: str | None = field(default=None, metadata={"metavar": "ID_OR_PATH", "help": (
        "the tokenizer of the base model that made the samples (a folder or Hub id), when it is not the "
        "backbone's: the samples are retokenized as text and the head is made for that base (a cross-tokenizer "
        "head). If not given: the samples' base model's tokenizer, loaded only when the samples were not "
        "tokenized with the backbone's")})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the head's adapter"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_layers: int = field(default=0, metadata={"help": (
        "put the LoRA on the top N decoder layers only: a shared-trunk head, whose lower layers run once for "
        "every head starting there (0: every layer)")})
    device: str = field(default="auto", metadata={"help": (
        "device to train on; auto: this process's device under `accelerate launch`, else the first GPU, "
        "else the CPU"
    )})
    dtype: str = field(default="float32", metadata={"choices": DTYPES,
        "help": "dtype of the backbone (the head's value layer stays float32)"})
    quantization: str | None = field(default=None, metadata={"choices": QUANTIZATIONS,
        "help": "load the backbone in 8-bit or 4-bit with bitsandbytes (pip install 'valuemix[quant]')"})


def make_train_parser():
    from valuemix.heads.training import TrainConfig

    return make_parser("valuemix train", "Train one value head by TD(λ) regression on scored samples (step 3 of "
                                         "VAS) and save it as a head folder.", TrainArgs, TrainConfig)


def train_main(argv=None) -> str:
    """Train a head on a reward column and save it; returns the head folder."""
    import torch

    from valuemix.heads.bank import DEFAULT_LORA, ValueBank
    from valuemix.heads.processes import is_main_process, resolve_device
    from valuemix.heads.training import train_head

    args, config = parse(make_train_parser(), argv, "train")
    samples, described = load_samples(args.samples)
    if args.reward not in samples.column_names:
        scored = sorted(set(samples.column_names) - _sample_columns())
        raise ValueError(f"The samples in {args.samples} have no reward column {args.reward!r}; reward columns: "
                         f"{', '.join(scored) or 'none (add one with valuemix score)'}.")
    name = args.name or args.reward
    description = args.description or described.get(args.reward, {}).get("description") or args.reward
    bank = ValueBank(absolute_if_folder(args.backbone), dtype=getattr(torch, args.dtype),
                     device=resolve_device(args.device),
                     quantization=args.quantization)
    bank.add_head(name, lora={**DEFAULT_LORA, "r": args.lora_r, "lora_alpha": args.lora_alpha}, seed=config.seed,
                  layers=args.lora_layers or None)
    base_tokenizer = samples_tokenizer(samples, bank, args.base_tokenizer)
    metrics = train_head(bank, name, samples, reward=args.reward, config=config, description=description,
                         base_tokenizer=base_tokenizer)
    if not is_main_process():  # every process holds the same head; one saves it
        return os.path.abspath(args.out)
    out = bank.save_head(name, args.out)
    made_for = "" if base_tokenizer is None else f" for bases with the tokenizer of {bank.configs[name].base_model}"
    print(f"Trained head '{name}' ({description}){made_for} on {len(samples)} samples: final loss "
          f"{metrics['final_loss']:.4g} after {metrics['steps']} steps ({metrics['seconds']:.1f} s). Saved to {out}")
    return out


def samples_tokenizer(samples, bank, source: str | None = None):
    """The base tokenizer to retokenize `samples` with for `bank`: the one at `source`, else the samples' base
    model's when the samples were not tokenized with the backbone's tokenizer; None for the backbone's own."""
    from transformers import AutoTokenizer

    columns = samples.column_names
    theirs = samples[0]["tokenizer_fingerprint"] if "tokenizer_fingerprint" in columns and len(samples) else None
    if source is None and theirs in (None, bank.fingerprint):
        return None
    source = source or (samples[0]["base_model"] if "base_model" in columns else None)
    if not source:
        raise ValueError(f"The samples were tokenized with tokenizer {theirs}, not the backbone's ({bank.fingerprint}), "
                         "and do not name their base model: pass --base-tokenizer (the base model's folder or Hub id).")
    try:
        return AutoTokenizer.from_pretrained(absolute_if_folder(source))
    except (OSError, ValueError) as err:
        raise OSError(f"The samples were tokenized with another tokenizer than the backbone's, and the tokenizer of "
                      f"their base model {source!r} could not be loaded ({err}): pass --base-tokenizer with the base "
                      "model's folder or Hub id.") from err


def _sample_columns() -> set[str]:
    from valuemix.heads.sampling import SAMPLE_COLUMNS

    return set(SAMPLE_COLUMNS)


# -------------------------------------------------------------------------------------------- push
@dataclass
class PushArgs:
    """Settings of `valuemix push`."""

    directory: str = field(metadata={"metavar": "DIR",
        "help": "the head folder to push (written by `valuemix train` or bank.save_head)"})
    repo_id: str = field(metadata={"metavar": "REPO_ID",
        "help": "the Hub repo to push to, 'user/name' or 'org/name' (created if missing)"})
    private: bool = field(default=False, metadata={
        "help": "create the repo as private (an existing repo keeps its visibility)"})
    token: str | None = field(default=None, metadata={
        "help": "Hub token with write access (if not given: HF_TOKEN or the token saved by `hf auth login`)"})
    message: str | None = field(default=None, metadata={"metavar": "TEXT",
        "help": "commit message (if not given: \"Upload valuemix head '<name>'\")"})
    revision: str | None = field(default=None, metadata={"help": "branch to commit to (if not given: main)"})


def make_push_parser():
    return make_parser("valuemix push", "Publish a head folder to the Hugging Face Hub in one commit; load it "
                                        "anywhere with bank.load_head(REPO_ID).", PushArgs,
                       positional=("directory", "repo_id"))


def push_main(argv=None) -> str:
    """Push a head folder to the Hub; returns the commit URL."""
    from valuemix.heads import hub

    (args,) = parse(make_push_parser(), argv, "push")
    url = hub.push_folder(args.directory, args.repo_id, private=args.private, token=args.token,
                          commit_message=args.message, revision=args.revision)
    print(f"Pushed {args.directory} to {args.repo_id}: {url}")
    return url


sample = Subcommand(make_sample_parser, sample_main)
score = Subcommand(make_score_parser, score_main)
train = Subcommand(make_train_parser, train_main)
push = Subcommand(make_push_parser, push_main)
