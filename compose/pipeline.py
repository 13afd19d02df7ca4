"""The recipes' pipeline as one function: prompts → base samples → rewards → heads → evaluation → Hub.

    config = PipelineConfig(out="runs/short", base=BASE, backbone=BACKBONE, chat_template=True)
    run_pipeline(config, lambda config, tokenizer: Task(train_prompts, eval_prompts, {"short": brevity()}))

`run_pipeline(config, task)` runs, in `config.out`:

1. sample the base once on the training prompts (`sample_base`, cached in OUT/samples);
2. score the samples with every head's reward (`score`);
3. train one head per reward on the value backbone (`train_head`), saved to OUT/heads/<name>;
4. sweep each head's β against Best-of-N on held-out prompts (`evaluate`): OUT/eval/report.json and
   PNG plots, and the β range that worked is recorded in each head folder (as `valuemix eval
   --record-in-heads` does);
5. push each head to the Hub, only with `push_to`.

The recipes in recipes/ are thin scripts over it (valuemix/recipe.py parses their flags and builds their
`--smoke` worlds); `load_texts`, `pick_prompts`, `reward_model` and `classifier` help them build a Task.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from valuemix.compose.evaluate import EvalConfig, Reward, evaluate
from valuemix.compose.mixer import DEFAULT_TOP_P
from valuemix.compose.report import record_in_heads, report_text, write_report
from valuemix.heads.atomic import atomic_write_text
from valuemix.heads.bank import ValueBank
from valuemix.heads.loading import load_base, load_model
from valuemix.heads.processes import resolve_device
from valuemix.heads.rewards import ClassifierProbability, RewardModel
from valuemix.heads.sampling import sample_base, score
from valuemix.heads.training import TrainConfig, train_head

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PipelineConfig:
    """Settings of `run_pipeline`: every recipe's flags (a recipe subclasses it to add its own and change defaults)."""

    out: str = field(default="runs/recipe", metadata={"metavar": "DIR", "help": (
        "folder for everything the run writes: samples/ (base samples, cached), heads/<name>/, eval/ "
        "(report.json and plots) and run.json"
    )})
    smoke: bool = field(default=False, metadata={"help": (
        "run the same pipeline on tiny models and a tiny dataset built in OUT/smoke-world (seconds on a "
        "CPU; what CI runs); the sizes left at their defaults shrink too"
    )})
    base: str = field(default="", metadata={"metavar": "ID_OR_PATH",
        "help": "the frozen base model: a Hub id or a local folder"})
    backbone: str = field(default="", metadata={"metavar": "ID_OR_PATH",
        "help": ("the value backbone: a causal LM (Hub id or folder); with another tokenizer than the base model's, "
                 "the heads are trained on the samples' text and value text (cross-tokenizer heads)")})
    dataset: str = field(default="", metadata={"metavar": "ID_OR_PATH", "help": (
        "where the prompts come from: a Hub dataset id or a local folder of data files, read with "
        "datasets.load_dataset"
    )})
    data_dir: str | None = field(default=None, metadata={
        "help": "subfolder of the dataset to read (e.g. harmless-base of Anthropic/hh-rlhf); if not given: all"})
    text_column: str = field(default="text", metadata={"help": "the dataset column the prompts are made from"})
    split: str = field(default="train", metadata={"help": "dataset split of the training prompts"})
    eval_split: str = field(default="test", metadata={"help": "dataset split of the held-out evaluation prompts"})
    n_prompts: int = field(default=2000, metadata={
        "help": "training prompts, drawn at random (with --seed) from the split"})
    n_eval_prompts: int = field(default=64, metadata={"help": "held-out prompts of the evaluation"})
    chat_template: bool = field(default=False, metadata={
        "help": "wrap each prompt as a user message with the base tokenizer's chat template"})
    n_per_prompt: int = field(default=4, metadata={"help": "base completions sampled per training prompt"})
    max_new_tokens: int = field(default=128, metadata={
        "help": "longest completion in tokens, in sampling and in the evaluation"})
    top_k: int = field(default=20, metadata={
        "help": "top-k of the base samples and of the mixer (π_ref is the base truncated to its top-k)"})
    top_p: float = field(default=DEFAULT_TOP_P, metadata={
        "help": "the mixer's nucleus inside the top-k in the evaluation (π_ref truncated the same way)"})
    sample_batch_size: int = field(default=64, metadata={"help": "rows sampled together"})
    device: str = field(default="auto", metadata={
        "help": "device of the base, the backbone and the reward models; auto: the first GPU, else the CPU"})
    dtype: str = field(default="bfloat16", metadata={"choices": DTYPES,
        "help": "dtype of the base model and of the reward models"})
    backbone_dtype: str = field(default="float32", metadata={"choices": DTYPES,
        "help": "dtype of the value backbone (the heads stay float32)"})
    lam: float = field(default=0.95, metadata={"help": "TD(λ) λ (1.0 is Monte Carlo)"})
    epochs: int = field(default=2, metadata={"help": "training passes over the samples"})
    batch_size: int = field(default=32, metadata={"help": "samples per optimisation step"})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate of the heads' LoRA matrices"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of each head (alpha = 2 r)"})
    lora_layers: int = field(default=0, metadata={
        "help": "LoRA on the top N backbone layers only: shared-trunk heads (0: every layer)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the backbone's activations in the backward pass (less memory)"})
    mixed_precision: str | None = field(default="bf16", metadata={"choices": ("no", "bf16", "fp16"),
        "help": "autocast of the backbone's forward in training (no, bf16 or fp16; the heads stay float32)"})
    reward_batch_size: int = field(default=32, metadata={"help": "completions per reward-model call"})
    betas: list[float] = field(default_factory=lambda: [-4.0, -2.0, 0.0, 1.0, 2.0, 4.0, 8.0], metadata={
        "help": "coefficients swept for each head in the evaluation, the other heads at 0"})
    eval_samples_per_prompt: int = field(default=4, metadata={"help": "completions per held-out prompt at each β"})
    best_of: int = field(default=64, metadata={
        "help": "largest N of the Best-of-N baseline (N = 1, 2, 4, ... up to it)"})
    eval_batch_size: int = field(default=32, metadata={"help": "prompts × samples decoded together in the evaluation"})
    push_to: str | None = field(default=None, metadata={"metavar": "USER/REPO", "help": (
        "publish the heads to this Hub repo, USER/REPO (with several heads, USER/REPO-<head>); nothing is"
        " pushed without it"
    )})
    private: bool = field(default=False, metadata={"help": "create the Hub repos as private"})
    seed: int = field(default=0, metadata={"help": "seed of the prompt choice, sampling, training and evaluation"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


# What --smoke shrinks, unless the flag was set to something other than its default.

@dataclass
class Task:
    """What a recipe trains and measures.

    Attributes:
        prompts: training prompts, plain text (the chat template is applied when sampling).
        eval_prompts: held-out prompts of the evaluation.
        heads: one head per reward, named after it.
        measures: more rewards measured at every β but not trained (e.g. a mention rate).
        grid: two heads whose βs the evaluation also sweeps jointly over `grid_betas` (a Pareto front).
    """

    prompts: list[str]
    eval_prompts: list[str]
    heads: dict[str, Reward]
    measures: dict[str, Reward] = field(default_factory=dict)
    grid: tuple[str, str] | None = None
    grid_betas: tuple[float, ...] = (0.0, 2.0, 4.0)



def run_pipeline(config: PipelineConfig, task: Callable, name: str = "pipeline") -> dict:
    """prompts → base samples → rewards → heads → evaluation → (Hub), all in `config.out`.

    task(config, tokenizer) -> Task: the prompts and rewards (it gets the base's tokenizer). Returns the
    folders, timings, Hub URLs and the evaluation's summary, also written to OUT/run.json.
    """
    check_push_target(config.push_to)
    out = Path(config.out)
    config = dataclasses.replace(config, device=resolve_device(config.device))
    clock = _Clock()

    base, tokenizer = load_base(config.base, device=config.device, dtype=config.dtype)
    work = task(config, tokenizer)
    if not (work.prompts and work.eval_prompts):
        raise ValueError(f"{name} found no {'training' if not work.prompts else 'held-out'} prompts in "
                         f"{config.dataset} ({config.split if not work.prompts else config.eval_split}); "
                         "check --dataset, --split/--eval-split and --text-column.")
    print(f"{name}: {len(work.prompts)} training and {len(work.eval_prompts)} held-out prompts; "
          f"heads {list(work.heads)}, measured too {list(work.measures)}")
    clock.lap("load")

    samples = sample_base(base, tokenizer, work.prompts, n_per_prompt=config.n_per_prompt,
                          max_new_tokens=config.max_new_tokens, top_k=config.top_k, seed=config.seed,
                          batch_size=config.sample_batch_size, chat_template=config.chat_template,
                          cache_dir=out / "samples", progress=config.progress)
    clock.lap("sample")
    samples = score(samples, work.heads, batch_size=config.reward_batch_size, progress=config.progress)
    clock.lap("score")

    backbone = str(Path(config.backbone).resolve()) if Path(config.backbone).is_dir() else config.backbone
    bank = ValueBank(backbone, dtype=getattr(torch, config.backbone_dtype), device=config.device)
    train = TrainConfig(lam=config.lam, epochs=config.epochs, batch_size=config.batch_size,
                        learning_rate=config.learning_rate, gradient_checkpointing=config.gradient_checkpointing,
                        mixed_precision=config.mixed_precision, seed=config.seed, progress=config.progress)
    base_tokenizer = None if bank.same_tokenizer(tokenizer) else tokenizer  # cross-tokenizer heads
    folders = {}
    for head, reward in work.heads.items():
        bank.add_head(head, lora={"r": config.lora_r, "lora_alpha": 2 * config.lora_r}, seed=config.seed,
                      layers=config.lora_layers or None, base_model=config.base)
        metrics = train_head(bank, head, samples, reward=head, config=train,
                             description=getattr(reward, "description", head), base_tokenizer=base_tokenizer)
        folders[head] = Path(bank.save_head(head, out / "heads" / head))
        print(f"Trained head '{head}' on {len(samples)} samples (final loss {metrics['final_loss']:.4g}): "
              f"{folders[head]}")
    clock.lap("train")

    report = evaluate_heads(config, base, tokenizer, bank, work, folders, out / "eval")
    clock.lap("eval")
    pushed = {}
    if config.push_to:
        for head in folders:
            repo = config.push_to if len(folders) == 1 else f"{config.push_to}-{head}"
            pushed[head] = bank.push_head(head, repo, private=config.private)
            print(f"Pushed head '{head}' to {repo}: {pushed[head]}")
        clock.lap("push")

    result = {"recipe": name, "smoke": config.smoke, "config": dataclasses.asdict(config),
              "heads": {h: str(f) for h, f in folders.items()}, "report": str(out / "eval" / "report.json"),
              "timings_s": clock.laps, "pushed": pushed, "summary": report["summary"]}
    atomic_write_text(out / "run.json", json.dumps(result, indent=1))
    print(f"{name} done in {clock.laps['total']:.1f} s: {clock.laps}")
    return result


def evaluate_heads(config, base, tokenizer, bank, work: Task, folders: dict, out: Path) -> dict:
    """Sweep each head's β against Best-of-N (and the grid), write report.json + plots, record β ranges."""
    eval_config = EvalConfig(betas=tuple(config.betas), grid_heads=work.grid, grid_betas=work.grid_betas,
                             samples_per_prompt=config.eval_samples_per_prompt, best_of=config.best_of,
                             max_new_tokens=config.max_new_tokens, top_k=config.top_k, top_p=config.top_p,
                             chat_template=config.chat_template, batch_size=config.eval_batch_size, seed=config.seed)
    report = evaluate(base, tokenizer, bank, work.eval_prompts, {**work.heads, **work.measures}, eval_config,
                      heads=list(work.heads),
                      progress=config.progress)
    print(report_text(report, write_report(report, out)))
    print("\n".join(record_in_heads(bank, report, folders)))
    return report


def check_push_target(repo: str | None) -> None:
    """Fail before hours of work, not after: a repo id and a token are needed to push."""
    if not repo:
        return
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ValueError(f"--push-to {repo!r} is not a Hub repo id: write USER/REPO (or ORG/REPO).")
    from huggingface_hub import get_token

    if get_token() is None:
        raise PermissionError(f"--push-to {repo} needs a Hugging Face token with write access: log in with "
                              "`hf auth login` or set HF_TOKEN, then run again.")


class _Clock:
    """Seconds per stage (`lap(name)`) and in total."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 2)
        self.laps["total"] = round(now - self.start, 2)
        self.last = now



# ------------------------------------------------------------------------------ prompts and rewards
def load_texts(config: PipelineConfig, split: str) -> list[str]:
    """The `text_column` of one split of the recipe's dataset (Hub id or local folder), via load_dataset."""
    import datasets

    try:
        data = datasets.load_dataset(config.dataset, data_dir=config.data_dir, split=split)
    except (OSError, ValueError) as err:
        raise OSError(f"Could not load split {split!r} of dataset {config.dataset!r}: {err}\nGive a Hub id "
                      "that is reachable or cached, or a local folder of data files (train.jsonl, test.jsonl, "
                      "...).") from err
    if config.text_column not in data.column_names:
        raise ValueError(f"Dataset {config.dataset!r} ({split}) has no column {config.text_column!r}; its columns: "
                         f"{', '.join(data.column_names)}. Pick one with --text-column.")
    return list(data[config.text_column])


def pick_prompts(texts: Sequence[str], n: int, seed: int, make: Callable[[str], str | None] = str.strip) -> list[str]:
    """Up to `n` distinct prompts `make(text)` from the texts in a seeded random order (None or "" skips one)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    prompts: dict[str, None] = {}
    for i in order:
        if len(prompts) >= n:
            break
        prompt = make(texts[i])
        if prompt:
            prompts[prompt] = None
    return list(prompts)


def reward_model(source, config: PipelineConfig, **kwargs):
    """A `rewards.RewardModel` (Hub id, folder or loaded (model, tokenizer) pair) in the recipe's dtype and device."""
    return RewardModel(_classifier(source, config), batch_size=config.reward_batch_size, device=config.device,
                       **kwargs)


def classifier(source: str, label: str, config: PipelineConfig, **kwargs):
    """A `rewards.ClassifierProbability` of `label`, loaded in the recipe's dtype on its device."""
    return ClassifierProbability(_classifier(source, config), label, batch_size=config.reward_batch_size,
                                 device=config.device, **kwargs)


def _classifier(source, config: PipelineConfig):
    return load_model(source, AutoModelForSequenceClassification, device=config.device,
                      dtype=getattr(torch, config.dtype))


