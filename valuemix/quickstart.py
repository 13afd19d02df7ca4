"""The whole VAS workflow in under a minute on a tiny model built on the spot (no download).

A tiny Llama learns a toy corpus, its samples are scored with two rule rewards, one value head
is trained per reward on one shared backbone, and the heads are mixed at several coefficients.
Run it with `valuemix quickstart`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from valuemix.compose.evaluate import EvalConfig, measure_mix
from valuemix.heads import rewards
from valuemix.heads.bank import ValueBank
from valuemix.heads.sampling import sample_base, score
from valuemix.heads.training import TrainConfig, train_head
from valuemix.options import make_parser as make_options_parser
from valuemix.options import parse
from valuemix.tiny import build_model, build_tokenizer, pretrain

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]


@dataclass
class QuickstartConfig:
    """Settings of the quick-start run (each is a flag of `valuemix quickstart`)."""

    samples_per_prompt: int = field(default=32, metadata={"help": "base samples per training prompt"})
    new_tokens: int = field(default=12, metadata={"help": "tokens per completion"})
    epochs: int = field(default=6, metadata={"help": "TD(λ) training epochs per head"})
    top_k: int = field(default=10, metadata={"help": "candidates valued per step when mixing"})
    seed: int = field(default=0, metadata={"help": "random seed of sampling and training"})


def make_parser():
    return make_options_parser("valuemix quickstart", __doc__, QuickstartConfig)


def main(argv=None) -> list[dict]:
    """Run the quick start; print and return one row per coefficient setting."""
    (config,) = parse(make_parser(), argv, "quickstart")
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    base = pretrain(build_model("llama", len(tokenizer), hidden=64, layers=2), tokenizer, steps=150)
    prompts = ["the", "a happy", "hello", "one two", "red", "please", "i am", "the dog"]
    reward_fns = {"colours": rewards.Keywords(COLOURS, count=True), "concise": rewards.brevity(per=1)}
    samples = score(sample_base(base, tokenizer, prompts, n_per_prompt=config.samples_per_prompt,
                                max_new_tokens=config.new_tokens, seed=config.seed), reward_fns)
    bank = ValueBank(base, tokenizer)  # the base doubles as the value backbone (the bank keeps a copy)
    for name in reward_fns:
        bank.add_head(name)
        train_head(bank, name, samples, reward=name, config=TrainConfig(epochs=config.epochs, batch_size=32))
    held_out = ["the cat", "a sad", "how are", "blue"] * 4
    sampling = EvalConfig(samples_per_prompt=1, max_new_tokens=config.new_tokens, top_k=config.top_k,
                          seed=config.seed + 1)
    rows = []
    for weights in ({}, {"colours": 4.0}, {"colours": -4.0}, {"concise": 4.0}, {"concise": -4.0},
                    {"colours": 4.0, "concise": 4.0}):
        mix = measure_mix(base, tokenizer, bank, held_out, weights, reward_fns, sampling)
        rows.append({"weights": weights or "base (β = 0)", "kl": mix.kl, "sample": mix.samples[3], **mix.rewards})
    print(f"\nvaluemix quickstart ({time.perf_counter() - start:.0f} s): mean reward over {len(held_out)} "
          "held-out completions\n")
    print(f"{'coefficients':34} {'colours':>8} {'concise':>8} {'KL nats':>8}  sample")
    for row in rows:
        print(f"{str(row['weights']):34} {row['colours']:8.2f} {row['concise']:8.2f} {row['kl']:8.2f}  "
              f"{row['sample']!r}")
    return rows
