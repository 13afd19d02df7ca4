"""Recipes as scripts: the flags of a `PipelineConfig` subclass, `--smoke` worlds of tiny models, one-line errors.

A recipe in recipes/ is a settings dataclass (a `compose.pipeline.PipelineConfig` subclass decorated with
`@recipe_config`, so that `--help` documents every flag, inherited ones included) and two functions:

    task(config, tokenizer) -> Task         # its prompts and rewards, from the real models and dataset
    smoke(config, world) -> dict            # tiny stand-ins for them, built with a SmokeWorld

`main(Config, task, smoke, argv)` parses the flags (and `--config FILE`) and calls
`compose.pipeline.run_pipeline`. `--smoke` runs the same code on tiny models and a tiny dataset built in
OUT/smoke-world, saved the way the real ones are published (save_pretrained folders, data files read by
`datasets.load_dataset`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from valuemix import options
from valuemix.compose.pipeline import PipelineConfig, check_push_target, run_pipeline


def recipe_config(cls):
    """Make `cls` a dataclass whose redefined fields keep the help of the fields they override (for --help)."""
    return options.inherit_help(dataclass(cls))


SMOKE_SIZES = {"n_prompts": 4, "n_eval_prompts": 2, "n_per_prompt": 2, "max_new_tokens": 6, "sample_batch_size": 8,
               "device": "cpu", "dtype": "float32", "backbone_dtype": "float32", "epochs": 1, "batch_size": 4,
               "mixed_precision": None, "reward_batch_size": 8, "betas": [-2.0, 0.0, 2.0],
               "eval_samples_per_prompt": 2, "best_of": 4, "eval_batch_size": 8}


# ------------------------------------------------------------------------------------ command line
def make_recipe_parser(config_class, prog: str, description: str | None):
    """The recipe's parser: one flag per config field and --config FILE."""
    return options.make_parser(prog, description, config_class)


def main(config_class, task: Callable, smoke: Callable, argv=None, prog: str = "recipe",
         description: str | None = None, corpus: Sequence[str] = ()) -> dict:
    """Parse the flags into a `config_class` and run the pipeline; returns what `run_pipeline` returns.

    corpus: texts whose words the smoke world's tokenizer knows, besides its own.
    """
    name = Path(prog).stem
    (config,) = options.parse(make_recipe_parser(config_class, prog, description), argv, name)
    check_push_target(config.push_to)  # before the smoke world is built
    if config.smoke:
        config = smoke_config(config, smoke(config, SmokeWorld(Path(config.out) / "smoke-world", corpus)))
    return run_pipeline(config, task, name=name)


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



def smoke_config(config: PipelineConfig, models: dict) -> PipelineConfig:
    """`config` with tiny local models/datasets (`models`) and small sizes where the flags kept their defaults."""
    defaults = type(config)()
    sizes = {k: v for k, v in SMOKE_SIZES.items() if getattr(config, k) == getattr(defaults, k)}
    return dataclasses.replace(config, **{**sizes, "data_dir": None, **models})



# -------------------------------------------------------------------------------------- smoke world
class SmokeWorld:
    """Tiny stand-ins for a recipe's models and dataset, built in `folder` (emptied first), loaded by path.

    Models share one tokenizer built on the spot (`valuemix.tiny`), so a tiny base and backbone match unless one is
    given its own. Use the
    llama or gpt2 family for causal LMs: transformers loads a saved qwen2 folder's tokenizer as Qwen2Tokenizer,
    which adds a token the tiny model does not embed.
    """

    def __init__(self, folder, corpus: Sequence[str] = ()):
        import shutil

        from valuemix.tiny import CORPUS, build_tokenizer

        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.tokenizer = build_tokenizer(corpus=CORPUS + list(corpus))

    def causal_lm(self, name: str, family: str, seed: int = 0, tokenizer=None) -> str:
        """A tiny causal LM of `family` ('llama', 'gpt2', 'qwen2') saved with the world's tokenizer (or `tokenizer`,
        e.g. `valuemix.tiny.build_tokenizer(kind="word")` for a backbone of another tokenizer); returns its folder."""
        from valuemix.tiny import build_model

        tokenizer = tokenizer or self.tokenizer
        path = self.folder / name
        build_model(family, len(tokenizer), seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
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
