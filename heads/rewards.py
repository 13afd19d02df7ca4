"""Built-in rewards: rules (length, keywords, regex), lexicon/offline scorers (sentiment,
harmlessness) and models (classifier, reward model, embeddings).

A reward is any callable `(prompts: list[str], completions: list[str]) -> list[float]`, one
float per completion. The built-ins below are small classes with a `description` (stored in
head files) and a matching `repr`::

    >>> reward = Keywords(["Paris"], present=False)      # 1.0 when "paris" is absent
    >>> reward(["Capital of France?"], ["It is Paris."])
    [0.0]
    >>> reward.description
    "keywords absent: ['Paris'] (case-insensitive, whole words)"

Model rewards take a local folder, a Hugging Face Hub id (read from the local cache when
offline), a `(model, tokenizer)` pair, or a model object plus `tokenizer=`. Weights are read
from safetensors only and remote code is never run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification

from valuemix.heads.fingerprint import model_name
from valuemix.heads.loading import load_model

__all__ = [
    "Reward",
    "Length",
    "brevity",
    "Regex",
    "Keywords",
    "ClassifierProbability",
    "RewardModel",
    "EmbeddingSimilarity",
    "Sentiment",
    "Harmlessness",
]

ON = ("completion", "prompt+completion")


class Reward:
    """Base class: validates the inputs, then scores them with `_score`; `description` says what it is."""

    description: str = "reward"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One reward per completion: a list of `len(completions)` floats."""
        if isinstance(prompts, str) or isinstance(completions, str):
            raise TypeError("prompts and completions must be lists of strings, not a single string")
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(completions)} completions; "
                "pass one prompt per completion (repeat a prompt for each of its completions)"
            )
        if not completions:
            return []
        return [float(r) for r in self._score(prompts, completions)]

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


# --------------------------------------------------------------------------- rules


class Length(Reward):
    """Completion length: `sign * length / per`, or with `target`, `-|length - target| / per`.

    `unit` is "words" (whitespace-separated), "chars" or "tokens" (needs a `tokenizer`
    object; special tokens are not counted). `per` sets the scale: `per=10` counts tens of units.
    """

    def __init__(self, unit: str = "words", tokenizer=None, target: float | None = None,
                 sign: float = 1.0, per: float = 1.0):
        if unit not in ("words", "tokens", "chars"):
            raise ValueError(f"unit must be 'words', 'tokens' or 'chars', got {unit!r}")
        if unit == "tokens" and tokenizer is None:
            raise ValueError("Length(unit='tokens') needs tokenizer=<a tokenizer object>")
        self.unit, self.tokenizer, self.target, self.sign, self.per = unit, tokenizer, target, sign, per
        scale = f" / {per:g}" if per != 1 else ""
        if target is None:
            self.description = f"{'-' if sign < 0 else ''}length in {unit}{scale}"
        else:
            self.description = f"-|length in {unit} - {target:g}|{scale}"

    def length(self, text: str) -> int:
        """The length of one text in `unit`s."""
        if self.unit == "words":
            return len(text.split())
        if self.unit == "chars":
            return len(text)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _score(self, prompts, completions):
        lengths = [self.length(c) for c in completions]
        if self.target is None:
            return [self.sign * n / self.per for n in lengths]
        return [-abs(n - self.target) / self.per for n in lengths]


def brevity(unit: str = "words", per: float = 10.0, tokenizer=None) -> Length:
    """Shorter is better: minus the completion length in tens of words by default (50 words -> -5.0)."""
    return Length(unit=unit, tokenizer=tokenizer, sign=-1.0, per=per)


class Regex(Reward):
    """1.0 if `pattern` matches the completion (`re.search`), else 0.0; `present=False` inverts.

    With `count=True` the reward is the number of non-overlapping matches, negated when
    `present=False` (each occurrence costs 1).
    """

    def __init__(self, pattern: str | re.Pattern, present: bool = True, flags: int = 0, count: bool = False):
        self.pattern = re.compile(pattern, flags) if isinstance(pattern, str) else pattern
        self.present, self.count = present, count
        self.description = self._describe(f"r'{self.pattern.pattern}'", "regex")

    def _describe(self, what: str, kind: str) -> str:
        if self.count:
            return f"{'' if self.present else '-'}count of {kind} matches: {what}"
        return f"{kind} {'present' if self.present else 'absent'}: {what}"

    def _score(self, prompts, completions):
        if self.count:
            sign = 1.0 if self.present else -1.0
            return [sign * sum(1 for _ in self.pattern.finditer(c)) for c in completions]
        return [float((self.pattern.search(c) is not None) == self.present) for c in completions]


class Keywords(Regex):
    """1.0 if any of `words` occurs in the completion, else 0.0; `present=False` inverts (unlearning).

    Matching is case-insensitive unless `case_sensitive`; with `whole_word` a keyword must
    not touch a letter, digit or underscore on either side ("cat" does not match "concat").
    `count=True` counts occurrences, as in `Regex`.
    """

    def __init__(self, words: str | Sequence[str], present: bool = True, case_sensitive: bool = False,
                 whole_word: bool = True, count: bool = False):
        self.words = [words] if isinstance(words, str) else list(words)
        if not self.words:
            raise ValueError("Keywords needs at least one keyword")
        alternation = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        pattern = rf"(?<!\w)(?:{alternation})(?!\w)" if whole_word else f"(?:{alternation})"
        super().__init__(pattern, present=present, flags=0 if case_sensitive else re.IGNORECASE, count=count)
        options = f"{'case-sensitive' if case_sensitive else 'case-insensitive'}{', whole words' if whole_word else ''}"
        self.description = self._describe(f"{self.words} ({options})", "keywords")




def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _check_on(on: str) -> str:
    if on not in ON:
        raise ValueError(f"on must be one of {ON}, got {on!r}")
    return on


def _join(on: str, prompts: list[str], completions: list[str]) -> list[str]:
    """The texts to score: the completions, or each prompt followed by its completion."""
    return list(completions) if on == "completion" else [p + c for p, c in zip(prompts, completions)]


# --------------------------------------------------------------------------- model rewards


class ClassifierProbability(Reward):
    """The probability a text classifier gives `label` (a name from `config.id2label`, or an index).

    Softmax over the labels, or a per-label sigmoid when `config.problem_type` is
    "multi_label_classification". `on="prompt+completion"` classifies the concatenated text.
    Texts longer than `max_length` tokens are truncated at the end.
    """

    def __init__(self, model, label: str | int, on: str = "completion", batch_size: int = 32,
                 device: str = "cpu", max_length: int = 512, tokenizer=None):
        _check_on(on)
        self.model, self.tokenizer = load_model(model, AutoModelForSequenceClassification, tokenizer, device)
        self.on, self.batch_size, self.device, self.max_length = on, batch_size, device, max_length
        self.index = self._label_index(label)
        self.multi_label = self.model.config.problem_type == "multi_label_classification"
        self.description = f"P({self.model.config.id2label[self.index]!r} | {on}) from {model_name(self.model)}"

    def _label_index(self, label: str | int) -> int:
        id2label = {int(i): name for i, name in self.model.config.id2label.items()}
        if isinstance(label, int) and label in id2label:
            return label
        matches = [i for i, name in id2label.items() if str(label).lower() == str(name).lower()]
        exact = [i for i in matches if id2label[i] == label]
        if exact or len(matches) == 1:
            return (exact or matches)[0]
        raise ValueError(f"Unknown label {label!r} for {model_name(self.model)}; its labels are "
                         + ", ".join(f"{i}: {name!r}" for i, name in sorted(id2label.items())))

    @torch.inference_mode()
    def _score(self, prompts, completions):
        rewards = []
        for texts in _batches(_join(self.on, prompts, completions), self.batch_size):
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 padding_side="right", return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()
            probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
            rewards += probs[:, self.index].tolist()
        return rewards


class RewardModel(Reward):
    """The scalar score of a sequence-classification reward model for each (prompt, completion).

    If the reward model's tokenizer has a chat template, the pair is formatted as a user turn
    and an assistant turn with `apply_chat_template(tokenize=False)` and tokenized without
    extra special tokens; otherwise the text is `prompt + completion` with the tokenizer's own
    special tokens. Texts longer than `max_length` tokens keep their last `max_length` tokens
    (the score is read at the end). A missing pad token is set to EOS. With `num_labels > 1`,
    pass `index` to pick the logit that is the reward.
    """

    def __init__(self, model, batch_size: int = 16, device: str = "cpu", max_length: int = 1024,
                 tokenizer=None, index: int | None = None):
        self.model, self.tokenizer = load_model(model, AutoModelForSequenceClassification, tokenizer, device)
        self.batch_size, self.device, self.max_length = batch_size, device, max_length
        num_labels = self.model.config.num_labels
        if index is None and num_labels != 1:
            raise ValueError(f"{model_name(self.model)} has {num_labels} outputs, not a single score; "
                             "pass index=<the output that is the reward> or use ClassifierProbability")
        self.index = 0 if index is None else index
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the model finds each row's last token by it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.description = f"reward model score from {model_name(self.model)}"

    def format(self, prompt: str, completion: str) -> str:
        """The text the reward model reads for one pair (chat template when the tokenizer has one)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return prompt + completion
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.inference_mode()
    def _score(self, prompts, completions):
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        rewards = []
        for pairs in _batches(list(zip(prompts, completions)), self.batch_size):
            ids = self.tokenizer([self.format(p, c) for p, c in pairs],
                                 add_special_tokens=not templated)["input_ids"]
            enc = self.tokenizer.pad({"input_ids": [row[-self.max_length:] for row in ids]},
                                     padding=True, padding_side="right", return_tensors="pt").to(self.device)
            rewards += self.model(**enc).logits[:, self.index].float().tolist()
        return rewards


class EmbeddingSimilarity(Reward):
    """Cosine similarity of the completion's embedding to `description`'s (or to the prompt's).

    Embeddings are sentence-transformers style, computed with plain transformers: `AutoModel`
    last hidden states, mean-pooled over the attention mask, L2-normalised. With
    `description=None` the reward is prompt-completion relevance. A sentence-transformers
    folder works when its transformer sits at the root (the usual layout).
    """

    def __init__(self, model, description: str | None = None, on: str = "completion", batch_size: int = 64,
                 device: str = "cpu", max_length: int = 512, tokenizer=None):
        if _check_on(on) != "completion" and description is None:
            raise ValueError("on='prompt+completion' needs a description; without one the reward "
                             "compares the prompt with the completion")
        self.model, self.tokenizer = load_model(model, AutoModel, tokenizer, device)
        self.on, self.batch_size, self.device, self.max_length = on, batch_size, device, max_length
        self.target = description
        self.target_embedding = None if description is None else self.embed([description])[0]
        what = "the prompt" if description is None else repr(description)
        self.description = f"embedding similarity of the {on} to {what} ({model_name(self.model)})"

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised mean-pooled embeddings, `(len(texts), hidden)`."""
        out = []
        for batch in _batches(list(texts), self.batch_size):
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 padding_side="right", return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()         # (batch, seq, hidden)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled, dim=-1))
        return torch.cat(out)

    def _score(self, prompts, completions):
        texts = self.embed(_join(self.on, prompts, completions))
        targets = self.embed(prompts) if self.target_embedding is None else self.target_embedding
        return (texts * targets).sum(-1).tolist()


# --------------------------------------------------------------------------- offline scorers from PyPI


class Sentiment(Reward):
    """VADER compound sentiment of the completion, in [-1, 1] (cheerful > 0 > gloomy).

    Needs the PyPI package `vaderSentiment` (a rule-based lexicon, no model download), imported
    when the reward is created. `on="prompt+completion"` scores the concatenated text.
    """

    def __init__(self, on: str = "completion"):
        self.on = _check_on(on)
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as err:
            raise ImportError("Sentiment needs the VADER lexicon from the PyPI package vaderSentiment: "
                              "pip install vaderSentiment") from err
        self.analyzer = SentimentIntensityAnalyzer()
        self.description = f"VADER compound sentiment of the {on}, in [-1, 1] (vaderSentiment)"

    def _score(self, prompts, completions):
        return [self.analyzer.polarity_scores(text)["compound"] for text in _join(self.on, prompts, completions)]


class Harmlessness(Reward):
    """1 - the offensive-language probability of the completion, in [0, 1] (polite text near 1).

    Needs the PyPI package `alt-profanity-check` (module `profanity_check`: a linear SVM over
    TF-IDF features, scored in one batch), imported when the reward is created. That package
    loads its own shipped scikit-learn model with joblib (a pickle) at import time; valuemix
    itself never unpickles anything. `on="prompt+completion"` scores the concatenated text.
    """

    def __init__(self, on: str = "completion"):
        self.on = _check_on(on)
        try:
            import profanity_check
        except ImportError as err:
            raise ImportError("Harmlessness needs the offensive-language classifier from the PyPI package "
                              "alt-profanity-check: pip install alt-profanity-check") from err
        self.predict_prob = profanity_check.predict_prob
        self.description = (f"1 - offensive-language probability of the {on}, in [0, 1] "
                            "(alt-profanity-check)")

    def _score(self, prompts, completions):
        probs = self.predict_prob(_join(self.on, prompts, completions))
        return [1.0 - float(p) for p in probs]
