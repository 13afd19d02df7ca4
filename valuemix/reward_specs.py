"""Rewards named on the command line: `NAME=SPEC`, where SPEC is a built-in or an importable function.

    brevity[:UNIT[:PER]]               shorter is better: -length / PER (default words, per 10)
    length[:UNIT[:TARGET]]             length in UNIT (words, chars, tokens), or -|length - TARGET|
    keywords:W1,W2[:absent][:count]    1.0 if a keyword occurs (absent: if none does; count: occurrences)
    regex:PATTERN[:absent][:count]     1.0 if PATTERN matches the completion (same options)
    classifier:MODEL:LABEL             probability of LABEL from a text classifier (folder or Hub id)
    reward-model:MODEL                 score of a sequence-classification reward model
    embedding:MODEL[:DESCRIPTION]      cosine similarity to DESCRIPTION's embedding (or to the prompt's)
    module:function                    any importable reward `(prompts, completions) -> list[float]`
    path/to/file.py:function           the same, from a Python file

Built-in names win over modules of the same name. A class named by `module:Class` is instantiated
without arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

from valuemix.heads import rewards

SPECS = __doc__.split("\n\n")[1]
BUILT_INS = ("brevity", "length", "keywords", "regex", "classifier", "reward-model", "embedding")
_OPTIONS = ("absent", "present", "count")


def parse_reward(text: str, tokenizer: Callable[[], object] | None = None, device: str = "cpu"):
    """`NAME=SPEC` -> (name, reward callable, description). `tokenizer` loads one for `length:tokens`."""
    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise ValueError(f"--reward {text!r} is not NAME=SPEC: write e.g. short=brevity or "
                         "polite=classifier:MODEL:LABEL.")
    reward = reward_from_spec(spec, tokenizer=tokenizer, device=device)
    return name, reward, getattr(reward, "description", None) or spec


def reward_from_spec(spec: str, tokenizer: Callable[[], object] | None = None, device: str = "cpu"):
    """The reward callable a SPEC names (see the module docstring for the forms)."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    try:
        if kind in ("brevity", "length"):
            parts = rest.split(":") if rest else []
            if len(parts) > 2:
                raise ValueError("too many ':' fields")
            unit = parts[0] if parts else "words"
            tok = tokenizer() if unit == "tokens" and tokenizer is not None else None
            if kind == "brevity":
                return rewards.brevity(unit=unit, per=float(parts[1]) if len(parts) > 1 else 10.0, tokenizer=tok)
            return rewards.Length(unit=unit, tokenizer=tok, target=float(parts[1]) if len(parts) > 1 else None)
        if kind in ("keywords", "regex"):
            body, options = _split_options(rest)
            if not body:
                raise ValueError(f"{kind} needs a {'list of words' if kind == 'keywords' else 'pattern'}")
            present, count = "absent" not in options, "count" in options
            if kind == "keywords":
                return rewards.Keywords([w.strip() for w in body.split(",") if w.strip()], present=present,
                                        count=count)
            return rewards.Regex(body, present=present, count=count)
        if kind == "classifier":
            model, _, label = rest.rpartition(":")
            if not model or not label:
                raise ValueError("write classifier:MODEL:LABEL")
            return rewards.ClassifierProbability(model, label=int(label) if label.isdigit() else label, device=device)
        if kind == "reward-model":
            if not rest:
                raise ValueError("write reward-model:MODEL")
            return rewards.RewardModel(rest, device=device)
        if kind == "embedding":
            model, _, description = rest.partition(":")
            if not model:
                raise ValueError("write embedding:MODEL or embedding:MODEL:DESCRIPTION")
            return rewards.EmbeddingSimilarity(model, description=description or None, device=device)
    except (ValueError, TypeError) as err:
        raise ValueError(f"Reward spec {spec!r} is not valid: {err}.\nSpecs:\n{SPECS}") from err
    if ":" in spec:
        return import_reward(spec)
    raise ValueError(f"Unknown reward {spec!r}: use a built-in ({', '.join(BUILT_INS)}) or module:function.\n"
                     f"Specs:\n{SPECS}")


def import_reward(spec: str):
    """The callable named by `module:function` or `path/to/file.py:function` (a class is instantiated)."""
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py") or os.sep in where or "/" in where:
        if not os.path.isfile(where):
            raise FileNotFoundError(f"Reward {spec!r}: no Python file at {where}.")
        module_name = f"valuemix_reward_{os.path.splitext(os.path.basename(where))[0]}"
        module_spec = importlib.util.spec_from_file_location(module_name, where)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        added = os.getcwd() not in sys.path
        if added:  # as `python -m` does: modules beside the user are importable
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            raise ImportError(f"Reward {spec!r}: cannot import module {where!r} ({err}). Put it on PYTHONPATH, "
                              f"or name a file: path/to/{where}.py:{attr}.") from err
        finally:
            if added:
                sys.path.remove(os.getcwd())
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ImportError(f"Reward {spec!r}: {where} has no attribute {attr!r}.")
        target = getattr(target, part)
    if isinstance(target, type):
        target = target()
    if not callable(target):
        raise TypeError(f"Reward {spec!r} is a {type(target).__name__}, not a callable "
                        "(prompts, completions) -> list[float].")
    return target


def _split_options(rest: str) -> tuple[str, set[str]]:
    """'Paris,London:absent:count' -> ('Paris,London', {'absent', 'count'}); options are peeled off the end."""
    options: set[str] = set()
    while True:
        head, sep, tail = rest.rpartition(":")
        if not sep or tail.strip().lower() not in _OPTIONS:
            return rest, options
        options.add(tail.strip().lower())
        rest = head
