"""Unlearning: a value head that keeps an entity out of the replies, and what that costs in helpfulness.

    python recipes/unlearn.py                                          # Harry Potter; one 24-80 GB GPU, Hub
    python recipes/unlearn.py --entity Paris --topic-pattern 'paris|france|eiffel' --out runs/unlearn-paris
    python recipes/unlearn.py --topic-classifier ORG/TOPIC_MODEL --topic-label LABEL    # rule + classifier
    python recipes/unlearn.py --smoke --out /tmp/unlearn                # the same code on tiny models, CPU

Prompts: first human turns of Anthropic/hh-rlhf dialogues; a share of them (--on-topic-share) are picked by
--topic-pattern, prompts that lead the base to name the entity, the rest are any other prompts, to check that
the head leaves them alone. Base: Qwen/Qwen2.5-7B-Instruct in bf16 with its chat template; value backbone:
Qwen/Qwen2.5-0.5B-Instruct (the same tokenizer; both ungated).

Reward of the head `unlearn`: 1 when the reply names none of --entity (case-insensitive whole words), else 0;
with --topic-classifier, minus its probability of --topic-label too, to catch paraphrases ("the boy wizard").
Evaluation, at each β: `mention_rate`, the share of replies that still name the entity, and `helpfulness`,
the score of Ray2333/gpt2-large-helpful-reward_model on the HH dialogue, the price of forgetting; the run
prints and saves them (report.json "sweeps") next to the usual Best-of-N comparison.
"""

from __future__ import annotations

import re
from dataclasses import field

from valuemix import recipe, rewards
from valuemix.compose.pipeline import PipelineConfig, Task, classifier, load_texts, pick_prompts, reward_model

import hh_rlhf  # recipes/hh_rlhf.py, beside this script

ENTITY = ["Harry Potter", "Hogwarts", "Hermione", "Dumbledore", "Voldemort"]
TOPIC = r"harry potter|hogwarts|hermione|dumbledore|voldemort|rowling|wizards?|witchcraft"


@recipe.recipe_config
class UnlearnConfig(PipelineConfig):
    """Settings of the unlearning recipe (each is a flag)."""

    out: str = "runs/unlearn"
    base: str = "Qwen/Qwen2.5-7B-Instruct"
    backbone: str = "Qwen/Qwen2.5-0.5B-Instruct"
    dataset: str = "Anthropic/hh-rlhf"
    text_column: str = "chosen"
    chat_template: bool = True
    n_prompts: int = 1000
    entity: list[str] = field(default_factory=lambda: list(ENTITY), metadata={
        "help": "names of the entity to remove; any of them counts as a mention"})
    topic_pattern: str = field(default=TOPIC, metadata={
        "help": "regex (case-insensitive) that picks the on-topic prompts, those that make the base name the entity"})
    on_topic_share: float = field(default=0.75, metadata={
        "help": "share of the prompts, training and held-out, that are on-topic (fewer if the dataset has fewer)"})
    topic_classifier: str | None = field(default=None, metadata={"help": (
        "optional text classifier of the topic (Hub id or folder); its probability of --topic-label is "
        "subtracted from the reward"
    )})
    topic_label: str | None = field(default=None, metadata={"help": "the topic's label in --topic-classifier"})
    helpful_model: str = field(default="Ray2333/gpt2-large-helpful-reward_model", metadata={
        "help": "reward model of helpfulness measured at each β (Hub id or folder), fed HH dialogue text"})


class Forget(rewards.Reward):
    """1.0 when the completion names none of the entity's names, else 0.0; minus P(topic) with a classifier."""

    def __init__(self, names: list[str], topic=None):
        self.mentions, self.topic = rewards.Keywords(names), topic
        self.description = f"no mention of {names}" + (f" minus {topic.description}" if topic else "")

    def _score(self, prompts, completions):
        absent = [1.0 - m for m in self.mentions(prompts, completions)]
        if self.topic is None:
            return absent
        return [a - p for a, p in zip(absent, self.topic(prompts, completions))]


def first_turn(topic: re.Pattern, on_topic: bool):
    """dialogue -> its first human turn if that is (or, with on_topic=False, is not) on the topic, else None."""
    def make(dialogue: str) -> str | None:
        prompt = hh_rlhf.first_turn(dialogue)
        return prompt if bool(topic.search(prompt)) == on_topic else None

    return make


def prompts(config: UnlearnConfig, split: str, n: int) -> list[str]:
    """`n` prompts of `split`: about `on_topic_share` of them on-topic, the rest any other."""
    topic = re.compile(config.topic_pattern, re.IGNORECASE)
    texts = load_texts(config, split)
    on = pick_prompts(texts, round(n * config.on_topic_share), config.seed, first_turn(topic, True))
    if not on:
        raise ValueError(f"No prompt of {config.dataset} ({split}) matches --topic-pattern {config.topic_pattern!r}; "
                         "widen the pattern or use a dataset that talks about the entity.")
    off = pick_prompts(texts, n - len(on), config.seed, first_turn(topic, False))
    print(f"{split}: {len(on)} on-topic and {len(off)} other prompts")
    return on + off


def task(config: UnlearnConfig, tokenizer) -> Task:
    if config.topic_classifier and not config.topic_label:
        raise ValueError("--topic-classifier needs --topic-label: the classifier's label of the topic.")
    topic = None
    if config.topic_classifier:
        topic = classifier(config.topic_classifier, config.topic_label, config)
    measures = {"mention_rate": rewards.Keywords(config.entity),
                "helpfulness": hh_rlhf.HHDialogue(reward_model(config.helpful_model, config))}
    return Task(prompts(config, config.split, config.n_prompts),
                       prompts(config, config.eval_split, config.n_eval_prompts),
                       {"unlearn": Forget(config.entity, topic)}, measures=measures)


def smoke(config: UnlearnConfig, world: recipe.SmokeWorld) -> dict:
    rows = hh_rlhf.rows()
    models = {"base": world.causal_lm("base", "llama"), "backbone": world.causal_lm("backbone", "llama", seed=1),
              "dataset": world.dataset("hh-rlhf", {"train": rows[:7], "test": rows[7:]}),
              "helpful_model": world.classifier("helpful-rm", "gpt2")}
    if config.topic_classifier:
        models["topic_classifier"] = world.classifier("topic", "distilbert", ["other", config.topic_label])
    return models


def make_parser():
    return recipe.make_recipe_parser(UnlearnConfig, "recipes/unlearn.py", __doc__)


def main(argv=None) -> dict:
    return recipe.main(UnlearnConfig, task, smoke, argv, "recipes/unlearn.py", __doc__,
                       corpus=hh_rlhf.corpus())


if __name__ == "__main__":
    recipe.script(main, "recipes/unlearn.py")
