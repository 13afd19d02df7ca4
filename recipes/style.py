"""Style: one value head for a style of reply, formality (a public classifier) or conciseness (a rule).

    python recipes/style.py                                   # formality, one 24-80 GB GPU and Hub access
    python recipes/style.py --style conciseness               # shorter replies: no reward model at all
    python recipes/style.py --push-to alice/vm-formal         # publish the head
    python recipes/style.py --smoke --out /tmp/style          # the same code on tiny local models, CPU

Prompts: the first human turn of Anthropic/hh-rlhf dialogues, everyday requests whose replies can be
formal or casual, long or short. Base: Qwen/Qwen2.5-7B-Instruct in bf16 with its chat template; value
backbone: Qwen/Qwen2.5-0.5B-Instruct (the same tokenizer; both ungated).

--style formality: the reward is P("formal" | reply) from s-nlp/roberta-base-formality-ranker, a RoBERTa
classifier trained on GYAFC and the Pavlick-Tetreault formality corpus (labels informal/formal; safetensors).
A negative β makes the replies casual instead. The evaluation also measures the reply length in words, since
formality and length often move together.
--style conciseness: the reward is minus the reply length in tens of words (`rewards.brevity`).
"""

from __future__ import annotations

from dataclasses import field

from valuemix import recipe, rewards
from valuemix.compose.pipeline import PipelineConfig, Task, classifier, load_texts, pick_prompts

import hh_rlhf  # recipes/hh_rlhf.py, beside this script

STYLES = ("formality", "conciseness")


@recipe.recipe_config
class StyleConfig(PipelineConfig):
    """Settings of the style recipe (each is a flag)."""

    out: str = "runs/style"
    base: str = "Qwen/Qwen2.5-7B-Instruct"
    backbone: str = "Qwen/Qwen2.5-0.5B-Instruct"
    dataset: str = "Anthropic/hh-rlhf"
    text_column: str = "chosen"
    chat_template: bool = True
    style: str = field(default="formality", metadata={"choices": STYLES, "help": (
        "the head to train: formality (a classifier's probability of formal text) or conciseness (minus "
        "the length in tens of words); the head is named after it"
    )})
    formality_model: str = field(default="s-nlp/roberta-base-formality-ranker", metadata={
        "help": "text classifier of formality (Hub id or folder); it reads the reply alone"})
    formality_label: str = field(default="formal", metadata={"help": "its label of formal text"})


def task(config: StyleConfig, tokenizer) -> Task:
    train = pick_prompts(load_texts(config, config.split), config.n_prompts, config.seed,
                                hh_rlhf.first_turn)
    held_out = pick_prompts(load_texts(config, config.eval_split), config.n_eval_prompts,
                                   config.seed, hh_rlhf.first_turn)
    if config.style == "conciseness":
        return Task(train, held_out, {"conciseness": rewards.brevity()})
    formal = classifier(config.formality_model, config.formality_label, config)
    return Task(train, held_out, {"formality": formal}, measures={"words": rewards.Length("words")})


def smoke(config: StyleConfig, world: recipe.SmokeWorld) -> dict:
    rows = hh_rlhf.rows()
    return {"base": world.causal_lm("base", "llama"), "backbone": world.causal_lm("backbone", "llama", seed=1),
            "dataset": world.dataset("hh-rlhf", {"train": rows[:7], "test": rows[7:]}),
            "formality_model": world.classifier("formality", "roberta", ["informal", config.formality_label])}


def make_parser():
    return recipe.make_recipe_parser(StyleConfig, "recipes/style.py", __doc__)


def main(argv=None) -> dict:
    return recipe.main(StyleConfig, task, smoke, argv, "recipes/style.py", __doc__,
                       corpus=hh_rlhf.corpus())


if __name__ == "__main__":
    recipe.script(main, "recipes/style.py")
