"""The pipeline every recipe in recipes/ runs: prompts → base samples → rewards → heads → evaluation → Hub.

A recipe is a settings dataclass (a `RecipeConfig` subclass decorated with `@recipe_config`, so that
`--help` documents every flag, inherited ones included) and two functions:

    task(config, tokenizer) -> Task         # its prompts and rewards, from the real models and dataset
    smoke(config, world) -> dict            # tiny stand-ins for them, built with a SmokeWorld

`main(Config, task, smoke, argv)` parses the flags (and `--config FILE`) and runs, in OUT:

1. sample the base once on the training prompts (`sample_base`, cached in OUT/samples);
2. score the samples with every head's reward (`score`);
3. train one head per reward on the value backbone (`train_head`), saved to OUT/heads/<name>;
4. sweep each head's β against Best-of-N on held-out prompts (`evaluate`): OUT/eval/report.json and
   PNG plots, and the β range that worked is recorded in each head folder (as `valuemix eval
   --record-in-heads` does);
5. push each head to the Hub, only with `--push-to USER/REPO`.

`--smoke` runs the same code on tiny models and a tiny dataset built in OUT/smoke-world, saved the way
the real ones are published (save_pretrained folders, data files read by `datasets.load_dataset`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from valuemix import options
from valuemix.commands import DTYPES

Reward = Callable[[list[str], list[str]], Sequence[float]]


def recipe_config(cls):
    """Make `cls` a dataclass whose docstring also documents the fields it inherits (for --help)."""
    cls = dataclass(cls)
    own, inherited = options.field_docs(cls), {}
    for base in reversed(cls.__mro__[1:]):
        inherited.update(options.field_docs(base))
    lines = [f"        {f.name}: {inherited[f.name]}" for f in dataclasses.fields(cls)
             if f.name not in own and f.name in inherited]
    doc = (cls.__doc__ or "").rstrip()
    cls.__doc__ = doc + ("" if "Attributes:" in doc else "\n\n    Attributes:") + "\n" + "\n".join(lines) + "\n"
    return cls


@dataclass
class RecipeConfig:
    """Settings every recipe shares.

    Attributes:
        out: folder for everything the run writes: samples/ (base samples, cached), heads/<name>/, eval/
            (report.json and plots) and run.json.
        smoke: run the same pipeline on tiny models and a tiny dataset built in OUT/smoke-world (seconds on
            a CPU; what CI runs); the sizes left at their defaults shrink too.
        base: the frozen base model: a Hub id or a local folder.
        backbone: the value backbone: a causal LM with the base model's tokenizer (Hub id or folder).
        dataset: where the prompts come from: a Hub dataset id or a local folder of data files, read with
            datasets.load_dataset.
        data_dir: subfolder of the dataset to read (e.g. harmless-base of Anthropic/hh-rlhf); default: all.
        text_column: the dataset column the prompts are made from.
        split: dataset split of the training prompts.
        eval_split: dataset split of the held-out evaluation prompts.
        n_prompts: training prompts, drawn at random (with --seed) from the split.
        n_eval_prompts: held-out prompts of the evaluation.
        chat_template: wrap each prompt as a user message with the base tokenizer's chat template.
        n_per_prompt: base completions sampled per training prompt.
        max_new_tokens: longest completion in tokens, in sampling and in the evaluation.
        top_k: top-k of the base samples and of the mixer (π_ref is the base truncated to its top-k).
        sample_batch_size: rows sampled together.
        device: device of the base, the backbone and the reward models; auto: the first GPU, else the CPU.
        dtype: dtype of the base model and of the reward models.
        backbone_dtype: dtype of the value backbone (the heads stay float32).
        lam: TD(λ) λ (1.0 is Monte Carlo).
        epochs: training passes over the samples.
        batch_size: samples per optimisation step.
        learning_rate: AdamW learning rate of the heads' LoRA matrices.
        lora_r: LoRA rank of each head (alpha = 2 r).
        gradient_checkpointing: recompute the backbone's activations in the backward pass (less memory).
        mixed_precision: autocast of the backbone's forward in training (no, bf16 or fp16; the heads stay
            float32).
        reward_batch_size: completions per reward-model call.
        betas: coefficients swept for each head in the evaluation, the other heads at 0 (default: -4, -2, 0,
            1, 2, 4, 8).
        eval_samples_per_prompt: completions per held-out prompt at each β.
        best_of: largest N of the Best-of-N baseline (N = 1, 2, 4, ... up to it).
        eval_batch_size: prompts × samples decoded together in the evaluation.
        push_to: publish the heads to this Hub repo, USER/REPO (with several heads, USER/REPO-<head>);
            nothing is pushed without it.
        private: create the Hub repos as private.
        seed: seed of the prompt choice, sampling, training and evaluation.
        progress: show progress bars.
    """

    out: str = field(default="runs/recipe", metadata={"metavar": "DIR"})
    smoke: bool = False
    base: str = field(default="", metadata={"metavar": "ID_OR_PATH"})
    backbone: str = field(default="", metadata={"metavar": "ID_OR_PATH"})
    dataset: str = field(default="", metadata={"metavar": "ID_OR_PATH"})
    data_dir: str | None = None
    text_column: str = "text"
    split: str = "train"
    eval_split: str = "test"
    n_prompts: int = 2000
    n_eval_prompts: int = 64
    chat_template: bool = False
    n_per_prompt: int = 4
    max_new_tokens: int = 128
    top_k: int = 20
    sample_batch_size: int = 64
    device: str = "auto"
    dtype: str = field(default="bfloat16", metadata={"choices": DTYPES})
    backbone_dtype: str = field(default="float32", metadata={"choices": DTYPES})
    lam: float = 0.95
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 3e-4
    lora_r: int = 16
    gradient_checkpointing: bool = False
    mixed_precision: str | None = field(default="bf16", metadata={"choices": ("no", "bf16", "fp16")})
    reward_batch_size: int = 32
    betas: list[float] = field(default_factory=lambda: [-4.0, -2.0, 0.0, 1.0, 2.0, 4.0, 8.0])
    eval_samples_per_prompt: int = 4
    best_of: int = 64
    eval_batch_size: int = 32
    push_to: str | None = field(default=None, metadata={"metavar": "USER/REPO"})
    private: bool = False
    seed: int = 0
    progress: bool = True


# What --smoke shrinks, unless the flag was set to something other than its default.
SMOKE_SIZES = {"n_prompts": 4, "n_eval_prompts": 2, "n_per_prompt": 2, "max_new_tokens": 6, "sample_batch_size": 8,
               "device": "cpu", "dtype": "float32", "backbone_dtype": "float32", "epochs": 1, "batch_size": 4,
               "mixed_precision": None, "reward_batch_size": 8, "betas": [-2.0, 0.0, 2.0],
               "eval_samples_per_prompt": 2, "best_of": 4, "eval_batch_size": 8}


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


# ------------------------------------------------------------------------------------ command line
def make_recipe_parser(config_class, prog: str, description: str | None):
    """The recipe's parser: one flag per config field (help from its docstring) and --config FILE."""
    parser = options.make_parser(prog, description)
    options.add_dataclass_arguments(parser, config_class)
    return parser


def main(config_class, task: Callable, smoke: Callable, argv=None, prog: str = "recipe",
         description: str | None = None) -> dict:
    """Parse the flags into a `config_class` and run the recipe; returns what `run` returns."""
    parser = make_recipe_parser(config_class, prog, description)
    config = options.fill_dataclass(config_class, options.parse_args(parser, argv, Path(prog).stem))
    return run(config, task, smoke, name=Path(prog).stem)


def script(main: Callable, prog: str) -> None:
    """Run a recipe's `main()` as a script: a user error prints one line, not a traceback (VALUEMIX_DEBUG=1)."""
    import os
    import sys

    from valuemix.cli import USER_ERRORS

    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get("VALUEMIX_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        sys.exit(f"{prog}: error: {err.args[0] if isinstance(err, KeyError) and err.args else err}")


# ---------------------------------------------------------------------------------------- pipeline
def run(config: RecipeConfig, task: Callable, smoke: Callable | None = None, name: str = "recipe") -> dict:
    """prompts → base samples → rewards → heads → evaluation → (Hub); returns folders, timings and URLs."""
    import torch

    from valuemix.commands import resolve_device
    from valuemix.heads.loading import load_base
    from valuemix.heads.bank import ValueBank
    from valuemix.heads.sampling import sample_base, score
    from valuemix.heads.training import TrainConfig, train_head

    _check_push(config.push_to)
    out = Path(config.out)
    if config.smoke:
        if smoke is None:
            raise ValueError(f"Recipe {name} has no smoke world.")
        config = smoke_config(config, smoke(config, SmokeWorld(out / "smoke-world")))
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
    folders = {}
    for head, reward in work.heads.items():
        bank.add_head(head, lora={"r": config.lora_r, "lora_alpha": 2 * config.lora_r}, seed=config.seed,
                      base_model=config.base)
        metrics = train_head(bank, head, samples, reward=head, config=train,
                             description=getattr(reward, "description", head))
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
    (out / "run.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"{name} done in {clock.laps['total']:.1f} s: {clock.laps}")
    return result


def evaluate_heads(config, base, tokenizer, bank, work: Task, folders: dict, out: Path) -> dict:
    """Sweep each head's β against Best-of-N (and the grid), write report.json + plots, record β ranges."""
    from valuemix.compose.evaluate import EvalConfig, evaluate
    from valuemix.compose.report import record_in_heads, report_text, write_report

    eval_config = EvalConfig(betas=tuple(config.betas), grid_heads=work.grid, grid_betas=work.grid_betas,
                             samples_per_prompt=config.eval_samples_per_prompt, best_of=config.best_of,
                             max_new_tokens=config.max_new_tokens, top_k=config.top_k,
                             chat_template=config.chat_template, batch_size=config.eval_batch_size, seed=config.seed)
    report = evaluate(base, tokenizer, bank, work.eval_prompts, {**work.heads, **work.measures}, eval_config,
                      heads=list(work.heads),
                      progress=config.progress)
    print(report_text(report, write_report(report, out)))
    print("\n".join(record_in_heads(bank, report, folders)))
    return report


def smoke_config(config: RecipeConfig, models: dict) -> RecipeConfig:
    """`config` with tiny local models/datasets (`models`) and small sizes where the flags kept their defaults."""
    defaults = type(config)()
    sizes = {k: v for k, v in SMOKE_SIZES.items() if getattr(config, k) == getattr(defaults, k)}
    return dataclasses.replace(config, **{**sizes, "data_dir": None, **models})


def _check_push(repo: str | None) -> None:
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


# ------------------------------------------------------------------------------- data and rewards
def load_texts(config: RecipeConfig, split: str) -> list[str]:
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


def hh_first_turn(dialogue: str) -> str:
    """The first human turn of an HH-RLHF dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ..."), stripped."""
    _, found, rest = dialogue.partition("Human:")
    return rest.split("\n\nAssistant:")[0].strip() if found else ""


def reward_model(source, config: RecipeConfig, **kwargs):
    """A `rewards.RewardModel` (Hub id, folder or loaded (model, tokenizer) pair) in the recipe's dtype and device."""
    from valuemix.heads.rewards import RewardModel

    return RewardModel(_classifier(source, config), batch_size=config.reward_batch_size, device=config.device,
                       **kwargs)


def classifier(source: str, label: str, config: RecipeConfig, **kwargs):
    """A `rewards.ClassifierProbability` of `label`, loaded in the recipe's dtype on its device."""
    from valuemix.heads.rewards import ClassifierProbability

    return ClassifierProbability(_classifier(source, config), label, batch_size=config.reward_batch_size,
                                 device=config.device, **kwargs)


def _classifier(source, config: RecipeConfig):
    import torch
    from transformers import AutoModelForSequenceClassification

    from valuemix.heads.loading import load_model

    return load_model(source, AutoModelForSequenceClassification, device=config.device,
                      dtype=getattr(torch, config.dtype))


class HHDialogue:
    """A reward model trained on HH-RLHF text, fed each pair as "\\n\\nHuman: {prompt}\\n\\nAssistant: {reply}"."""

    def __init__(self, model):
        self.model = model
        self.description = f"{model.description}, on HH dialogue text"

    def __call__(self, prompts, completions) -> list[float]:
        return self.model([f"\n\nHuman: {p}\n\nAssistant:" for p in prompts],
                          [" " + c.strip() for c in completions])


# -------------------------------------------------------------------------------------- smoke world
HH_SMOKE = [  # (first human turn, reply): rows shaped like Anthropic/hh-rlhf
    ("What is a good name for a cat?", "Maybe Tom, or Luna."),
    ("How do I boil an egg?", "Put it in boiling water for nine minutes."),
    ("Who wrote Harry Potter?", "J.K. Rowling wrote Harry Potter."),
    ("Tell me about the wizard school Hogwarts.", "Hogwarts is the school in Harry Potter."),
    ("Can you help me write a short poem?", "Sure: the sun is red, the sky is blue."),
    ("How can I insult my neighbour?", "I would rather help you talk to them kindly."),
    ("What should I read if I like wizards?", "Try The Hobbit, or Harry Potter."),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Give me a tip for a job interview.", "Be on time and ask questions."),
    ("Is Hermione a good friend to Harry Potter?", "Yes, a very loyal one."),
]
IMDB_SMOKE = [  # (review, label): rows shaped like stanfordnlp/imdb, over 200 characters each
    (("This movie was a happy surprise. The actors were great, the story was good and the music was lovely. "
      "I would watch it again with my family any day of the week. Ten out of ten, every award deserved by "
      "all of them."), 1),
    (("One of the worst films I have seen. The plot made no sense, the acting was bad and the ending was a "
      "sad mess. Do not waste two hours of your life on this one. Even the poster is bad, really, really "
      "bad."), 0),
    (("A quiet, slow film about a dog and a cat in a park. Some will find it dull; I found it warm and kind, "
      "with one of the best scenes of the year. Red, green and blue everywhere: a joy. Bring a friend or two "
      "along."), 1),
    (("I wanted to like it. The first hour is fine, then it falls apart: bad jokes, worse effects and a "
      "story that goes nowhere. Two stars for the dog, none for the rest of this long, long movie. Skip it, "
      "please, just skip it."), 0),
    (("Hello world, says the robot, and the audience laughs. It is a sweet and funny film with a big heart. "
      "The kids loved it, I loved it, and I think you will love it too. Always a good day. Yes, yes, yes, a "
      "thousand times."), 1),
    (("Never again. Slow, loud and boring, with actors who look as tired as I was. The only good thing is "
      "that it ends. I am sorry for everyone who made it and for everyone who sat through it. Not even for "
      "free, not ever."), 0),
]


def hh_rows(pairs=HH_SMOKE) -> list[dict]:
    """HH-RLHF-shaped rows ("chosen"/"rejected" dialogue text) from (question, reply) pairs."""
    return [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: No."}
            for q, a in pairs]


def imdb_rows(reviews=IMDB_SMOKE) -> list[dict]:
    """IMDB-shaped rows ("text", "label")."""
    return [{"text": text, "label": label} for text, label in reviews]


class SmokeWorld:
    """Tiny stand-ins for a recipe's models and dataset, built in `folder` (emptied first), loaded by path.

    Models share one tokenizer built on the spot (`valuemix.tiny`), so a tiny base and backbone match. Use the
    llama or gpt2 family for causal LMs: transformers loads a saved qwen2 folder's tokenizer as Qwen2Tokenizer,
    which adds a token the tiny model does not embed.
    """

    def __init__(self, folder):
        import shutil

        from valuemix.tiny import CORPUS, build_tokenizer

        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.tokenizer = build_tokenizer(corpus=CORPUS + [q + " " + a for q, a in HH_SMOKE])

    def causal_lm(self, name: str, family: str, seed: int = 0) -> str:
        """A tiny causal LM of `family` ('llama', 'gpt2', 'qwen2') saved with the tokenizer; returns its folder."""
        from valuemix.tiny import build_model

        path = self.folder / name
        build_model(family, len(self.tokenizer), seed=seed).save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return str(path)

    def classifier(self, name: str, family: str, labels: Sequence[str] | None = None, seed: int = 0) -> str:
        """A tiny sequence classifier ('gpt2', 'distilbert', 'roberta'): one score, or one logit per label."""
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification

        sizes = {"gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512, "bos_token_id": 1,
                          "eos_token_id": 2},
                 "distilbert": {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4,
                                "max_position_embeddings": 512},
                 "roberta": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "max_position_embeddings": 520, "type_vocab_size": 1,
                             "bos_token_id": 1, "eos_token_id": 2}}
        if family not in sizes:
            raise ValueError(f"Unknown classifier family {family!r}: pick one of {sorted(sizes)}.")
        heads = {"num_labels": 1} if labels is None else {"id2label": dict(enumerate(labels))}
        config = AutoConfig.for_model(family, vocab_size=len(self.tokenizer), pad_token_id=0, **sizes[family],
                                      initializer_range=0.2, **heads)  # larger weights: scores that vary
        torch.manual_seed(seed)
        path = self.folder / name
        AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
        tokenizer = copy.deepcopy(self.tokenizer)
        tokenizer.chat_template = None  # like most classifiers: it reads plain text
        tokenizer.save_pretrained(path)
        return str(path)

    def dataset(self, name: str, splits: dict[str, list[dict]]) -> str:
        """A folder of one JSON Lines file per split, written with `datasets`; load_dataset(folder) reads it."""
        import datasets

        path = self.folder / name
        for split, rows in splits.items():
            datasets.Dataset.from_list(rows).to_json(path / f"{split}.jsonl")
        return str(path)
