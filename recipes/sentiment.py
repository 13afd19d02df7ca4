"""Positive IMDB continuations: the classic sentiment task of TRL's PPO example, done with a value head.

    python recipes/sentiment.py                               # one GPU (any size: the models are 124M/66M)
    python recipes/sentiment.py --push-to alice/vm-imdb-positive
    python recipes/sentiment.py --smoke --out /tmp/sentiment  # the same code on tiny local models, CPU

The setup of TRL's gpt2-sentiment notebook (examples/notebooks/gpt2-sentiment.ipynb): prompts are the first
2-8 tokens of stanfordnlp/imdb reviews longer than 200 characters, the base is lvwerra/gpt2-imdb (GPT-2
fine-tuned on IMDB), completions have up to 16 new tokens, and the reward comes from lvwerra/distilbert-imdb
reading prompt + completion. The head learns P(POSITIVE); the evaluation also reports the raw POSITIVE logit,
`positive_logit`, the score TRL's notebook reports: on 16 train-split queries it gives a mean of 0.59 for
gpt2-imdb and 2.24 after PPO (lvwerra/gpt2-imdb-pos-v2). Compare those with the β = 0 and β > 0 rows of the
`positive` sweep (report.json "sweeps"). Two differences: π_ref here is the base truncated to its top-20
tokens (the mixer values k = 20 candidates; TRL samples the full distribution with top_k=0), and the
held-out prompts come from the test split. The value backbone is gpt2-imdb itself.

Only safetensors are read. The two lvwerra repos keep pickle weights on main; transformers then loads the
Hub's safetensors conversion of them (a refs/pr branch, requested if missing) by itself when online. If that
fails, convert them once into folders and pass --base/--backbone/--classifier FOLDER.
"""

from __future__ import annotations

import random
from dataclasses import field

from valuemix import recipe
from valuemix.compose.pipeline import PipelineConfig, Task, classifier, load_texts, pick_prompts, reward_model


@recipe.recipe_config
class SentimentConfig(PipelineConfig):
    """Settings of the IMDB sentiment recipe (each is a flag)."""

    out: str = "runs/sentiment"
    base: str = "lvwerra/gpt2-imdb"
    backbone: str = "lvwerra/gpt2-imdb"
    dataset: str = "stanfordnlp/imdb"
    n_prompts: int = 4096
    n_eval_prompts: int = 256
    max_new_tokens: int = 16
    sample_batch_size: int = 256
    dtype: str = "float32"
    batch_size: int = 64
    reward_batch_size: int = 128
    eval_batch_size: int = 256
    classifier: str = field(default="lvwerra/distilbert-imdb", metadata={
        "help": "sentiment classifier (Hub id or folder); it reads prompt + completion, as in TRL"})
    positive_label: str = field(default="POSITIVE", metadata={"help": "its label of positive reviews"})
    prompt_min_tokens: int = field(default=2, metadata={
        "help": "each prompt is the first N base tokens of a review, N drawn uniformly from this range (TRL: 2 to 8)"})
    prompt_max_tokens: int = field(default=8, metadata={
        "help": "each prompt is the first N base tokens of a review, N drawn uniformly from this range (TRL: 2 to 8)"})
    min_review_chars: int = field(default=200, metadata={
        "help": "reviews of this many characters or fewer are skipped (TRL: 200)"})


def review_starts(config: SentimentConfig, tokenizer, split: str, n: int) -> list[str]:
    """`n` prompts: the first N tokens of distinct long-enough reviews, N ~ U{prompt_min_tokens..prompt_max_tokens}."""
    lengths = random.Random(config.seed)

    def start(review: str) -> str | None:
        if len(review) <= config.min_review_chars:
            return None
        ids = tokenizer(review, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:lengths.randint(config.prompt_min_tokens, config.prompt_max_tokens)])

    return pick_prompts(load_texts(config, split), n, config.seed, start)


def task(config: SentimentConfig, tokenizer) -> Task:
    positive = classifier(config.classifier, config.positive_label, config, on="prompt+completion")
    logit = reward_model((positive.model, positive.tokenizer), config, index=positive.index,
                                max_length=512)  # TRL's score, from the same model
    return Task(review_starts(config, tokenizer, config.split, config.n_prompts),
                       review_starts(config, tokenizer, config.eval_split, config.n_eval_prompts),
                       {"positive": positive}, measures={"positive_logit": logit})


def smoke(config: SentimentConfig, world: recipe.SmokeWorld) -> dict:
    rows = imdb_rows()
    return {"base": world.causal_lm("base", "gpt2"), "backbone": world.causal_lm("backbone", "gpt2", seed=1),
            "dataset": world.dataset("imdb", {"train": rows[:4], "test": rows[4:]}),
            "classifier": world.classifier("distilbert-imdb", "distilbert", ["NEGATIVE", config.positive_label])}


SMOKE_REVIEWS = [  # (review, label): rows shaped like stanfordnlp/imdb, over 200 characters each
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



def imdb_rows(reviews=SMOKE_REVIEWS) -> list[dict]:
    """IMDB-shaped rows ("text", "label")."""
    return [{"text": text, "label": label} for text, label in reviews]


def make_parser():
    return recipe.make_recipe_parser(SentimentConfig, "recipes/sentiment.py", __doc__)


def main(argv=None) -> dict:
    return recipe.main(SentimentConfig, task, smoke, argv, "recipes/sentiment.py", __doc__,
                       corpus=[text for text, _ in SMOKE_REVIEWS])


if __name__ == "__main__":
    recipe.script(main, "recipes/sentiment.py")
