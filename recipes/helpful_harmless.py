"""Helpful and harmless: two value heads on Anthropic HH-RLHF prompts, mixed at decode time.

    python recipes/helpful_harmless.py                             # one 24-80 GB GPU and Hub access
    python recipes/helpful_harmless.py --push-to alice/vm-hh       # -> alice/vm-hh-helpful, alice/vm-hh-harmless
    python recipes/helpful_harmless.py --smoke --out /tmp/hh       # the same code on tiny local models, CPU

Prompts: the first human turn of Anthropic/hh-rlhf dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ..."), training
prompts from its train split, held-out ones from its test split. Base: Qwen/Qwen2.5-7B-Instruct in bf16 with
its chat template; value backbone: Qwen/Qwen2.5-0.5B-Instruct (the same tokenizer; both ungated).

Rewards: Ray2333/gpt2-large-helpful-reward_model and Ray2333/gpt2-large-harmless-reward_model, two GPT-2
large reward models trained on HH-RLHF's helpful and harmless preferences (the pair used for HH in
multi-objective alignment work such as Rewards-in-Context, Yang et al. 2024), with safetensors weights.
They read the dialogue as HH text, "\\n\\nHuman: {prompt}\\n\\nAssistant: {reply}" (their GPT-2 tokenizer adds
no special tokens), and that is what the recipe feeds them. Not OpenAssistant/reward-model-deberta-v3-large-v2:
it reads a (question, answer) tokenizer pair with separators between, and it is one score, so there would be
no separate harmlessness axis to mix.

Evaluation: each head's β swept alone against Best-of-N on its own reward, and a joint helpful × harmless
grid (pareto_helpful_harmless.png).
"""

from __future__ import annotations

from dataclasses import field

from valuemix import recipe
from valuemix.compose.pipeline import PipelineConfig, Task, load_texts, pick_prompts, reward_model

import hh_rlhf  # recipes/hh_rlhf.py, beside this script


@recipe.recipe_config
class HelpfulHarmlessConfig(PipelineConfig):
    """Settings of the helpful/harmless recipe (each is a flag)."""

    out: str = "runs/helpful_harmless"
    base: str = "Qwen/Qwen2.5-7B-Instruct"
    backbone: str = "Qwen/Qwen2.5-0.5B-Instruct"
    dataset: str = "Anthropic/hh-rlhf"
    text_column: str = "chosen"
    chat_template: bool = True
    helpful_model: str = field(default="Ray2333/gpt2-large-helpful-reward_model", metadata={
        "help": "reward model of helpfulness (Hub id or folder), fed HH dialogue text"})
    harmless_model: str = field(default="Ray2333/gpt2-large-harmless-reward_model", metadata={
        "help": "reward model of harmlessness (Hub id or folder), fed HH dialogue text"})
    grid_betas: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0], metadata={
        "help": "coefficients of the joint helpful × harmless grid"})


def task(config: HelpfulHarmlessConfig, tokenizer) -> Task:
    train = pick_prompts(load_texts(config, config.split), config.n_prompts, config.seed,
                                hh_rlhf.first_turn)
    held_out = pick_prompts(load_texts(config, config.eval_split), config.n_eval_prompts,
                                   config.seed, hh_rlhf.first_turn)
    heads = {"helpful": hh_rlhf.HHDialogue(reward_model(config.helpful_model, config)),
             "harmless": hh_rlhf.HHDialogue(reward_model(config.harmless_model, config))}
    return Task(train, held_out, heads, grid=("helpful", "harmless"), grid_betas=tuple(config.grid_betas))


def smoke(config: HelpfulHarmlessConfig, world: recipe.SmokeWorld) -> dict:
    rows = hh_rlhf.rows()
    return {"base": world.causal_lm("base", "llama"), "backbone": world.causal_lm("backbone", "llama", seed=1),
            "dataset": world.dataset("hh-rlhf", {"train": rows[:7], "test": rows[7:]}),
            "helpful_model": world.classifier("helpful-rm", "gpt2"),
            "harmless_model": world.classifier("harmless-rm", "gpt2", seed=1), "grid_betas": [0.0, 2.0]}


def make_parser():
    return recipe.make_recipe_parser(HelpfulHarmlessConfig, "recipes/helpful_harmless.py", __doc__)


def main(argv=None) -> dict:
    return recipe.main(HelpfulHarmlessConfig, task, smoke, argv, "recipes/helpful_harmless.py", __doc__,
                       corpus=hh_rlhf.corpus())


if __name__ == "__main__":
    recipe.script(main, "recipes/helpful_harmless.py")
