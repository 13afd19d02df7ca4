"""The slider app's logic as plain functions, testable without a browser (the page is `ui/app.py`).

    parts = AppParts(base, tokenizer, bank, rewards={"short": brevity()})
    request = validate_request(parts, "Tell me about cats", {"helpful": 1.5}, max_new_tokens=48, seed=0)
    for partial in run_mix(parts, request):        # base and mixed text grow token by token
        print(partial.base_text, "|", partial.mixed_text)
    outcome = partial.outcome                       # texts, token ids, every reward, KL from the base
    history = record(history, outcome)              # points for the trade-off plot
    rows = explain_step(parts, outcome, step=3)     # "why this token": top-k with each head's share

The base output is the mix with every β = 0 (the top-k truncated base, π_ref) under the same seed,
so the two outputs differ only by the mix. Every request builds its own `Mixer`: concurrent requests
never share coefficients or caches (the bank's lock serialises the backbone's forwards).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

import torch

from valuemix.compose.api_generate import api_generate
from valuemix.compose.generate import generate
from valuemix.compose.mixer import DEFAULT_TOP_P, Mixer, read_mix
from valuemix.compose.remote import ServedModel
from valuemix.heads.api import APIBase
from valuemix.heads.tokens import encode_prompts

MAX_NEW_TOKENS = 256  # longest reply a request may ask for
MAX_PROMPT_CHARS = 4000
MAX_HISTORY = 200  # points kept per session for the trade-off plot
KL_AXIS = "KL from base (nats)"


class RequestError(ValueError):
    """A request the app refuses; its message says what was wrong and what to do (shown in the page)."""


@dataclass
class AppParts:
    """What the app steers.

    Attributes:
        base: the base causal LM, or an `heads.api.APIBase` (a base behind an OpenAI-compatible server, steered
            here step by step); None when `bank` is a served model.
        tokenizer: its tokenizer (shared with the value backbone).
        bank: the value bank with the heads the sliders drive, or a `compose.remote.ServedModel` (a model
            served with its heads by `valuemix serve`), which then generates every reply.
        rewards: reward name -> callable `(prompts, completions) -> list[float]`; may be empty.
        examples: example prompts offered under the prompt box (plain requests).
        chat_template: wrap each prompt as a user message with the tokenizer's chat template.
        top_k: the most candidates valued per step.
        top_p: value only the smallest leading set of the top-k holding this much base probability (1: all k).
    """

    base: object
    tokenizer: object
    bank: object
    rewards: dict[str, Callable] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    chat_template: bool = False
    top_k: int = 20
    top_p: float = DEFAULT_TOP_P
    base_cache: OrderedDict = field(default_factory=OrderedDict, repr=False)  # base outputs by request
    cache_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def heads(self) -> list[str]:
        return self.bank.heads


def as_parts(world, top_k: int = 20, top_p: float = DEFAULT_TOP_P) -> AppParts:
    """`AppParts` from itself, or from any world that builds its own with `world.app_parts(top_k=..., top_p=...)`
    (the demo's `DemoWorld` does)."""
    return world if isinstance(world, AppParts) else world.app_parts(top_k=top_k, top_p=top_p)


# ------------------------------------------------------------------------------------------- mixes
def beta_range(bank, head: str) -> tuple[float, float]:
    low, high = bank.configs[head].beta_range
    return float(low), float(high)


def default_weights(bank) -> dict[str, float]:
    """Every head at β = 0 (or at the end of its range nearest 0 when the range excludes 0)."""
    return {h: min(max(0.0, beta_range(bank, h)[0]), beta_range(bank, h)[1]) for h in bank.heads}


def parse_weights(bank, weights) -> dict[str, float]:
    """Coefficients for every head from a dict or a JSON object string (heads left out get β = 0).

    Raises `RequestError` naming every unknown head and every coefficient outside its head's range.
    """
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        weights = {}
    try:
        given = read_mix(weights, bank.configs, "weights", "in this app")
    except ValueError as err:
        raise RequestError(str(err)) from None
    out = default_weights(bank) | given
    return out


def mix_label(weights: Mapping[str, float]) -> str:
    """'helpful=1.5, concise=-0.5' (heads at 0 left out), or 'base (all β = 0)'."""
    return ", ".join(f"{h}={b:g}" for h, b in weights.items() if b != 0) or "base (all β = 0)"


def mix_to_query(weights: Mapping[str, float]) -> str:
    """The mix as a URL query string: '?helpful=1.5&concise=-0.5' (heads at 0 left out; '' for the base)."""
    pairs = [(h, repr(float(b))) for h, b in weights.items() if b != 0]
    return "?" + urlencode(pairs) if pairs else ""


def mix_from_query(bank, query, strict: bool = True) -> dict[str, float]:
    """Coefficients for every head from a query string ('?helpful=1.5&concise=-0.5') or its parsed mapping.

    With `strict=False`, keys that name no head (e.g. gradio's own `__theme`) are ignored.
    """
    if isinstance(query, str):
        pairs = parse_qsl(query.lstrip("?"), keep_blank_values=True)
    else:
        pairs = list(query.items())
    if not strict:
        pairs = [(k, v) for k, v in pairs if k in bank.heads]
    heads = [k for k, _ in pairs]
    if len(set(heads)) != len(heads):
        raise RequestError(f"A head appears twice in the query string: {sorted(heads)}.")
    return parse_weights(bank, dict(pairs))


def save_preset(presets: Mapping[str, dict], name: str, weights: Mapping[str, float]) -> dict[str, dict]:
    """A new presets dict with `name` -> the mix (an existing preset of that name is replaced)."""
    name = (name or "").strip()
    if not name:
        raise RequestError("Give the preset a name before saving it.")
    return {**presets, name: dict(weights)}


def load_preset(presets: Mapping[str, dict], name: str) -> dict[str, float]:
    if name not in presets:
        raise RequestError(f"No preset named {name!r}; saved presets: {', '.join(presets) or 'none yet'}.")
    return dict(presets[name])


# ---------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class MixRequest:
    """A validated request: the prompt as typed, a coefficient for every head, a length and a seed."""

    prompt: str
    weights: dict
    max_new_tokens: int
    seed: int


def _integer(name: str, value, low: int, high: int, problems: list[str]) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{name} must be a whole number, got {value!r}.")
        return low
    if not low <= value <= high:
        problems.append(f"{name} must be between {low} and {high}, got {value}.")
    return value


def validate_request(parts: AppParts, prompt, weights, max_new_tokens=64, seed=0,
                     limit: int = MAX_NEW_TOKENS) -> MixRequest:
    """Check a request; raises `RequestError` listing every problem in words (no traceback needed)."""
    problems = []
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("The prompt is empty: type a request (or pick an example).")
    elif len(prompt) > MAX_PROMPT_CHARS:
        problems.append(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}: shorten it.")
    tokens = _integer("max_new_tokens", max_new_tokens, 1, limit, problems)
    seed = _integer("seed", seed, 0, 2**63 - 1, problems)
    try:
        weights = parse_weights(parts.bank, weights)
    except RequestError as err:
        problems.append(str(err))
    if problems:
        raise RequestError("\n".join(problems))
    return MixRequest(prompt, weights, tokens, seed)


# -------------------------------------------------------------------------------------- generation
@dataclass
class Output:
    """One generated reply: text, token ids (up to and including EOS), KL from the base (nats), rewards."""

    text: str
    token_ids: list[int]
    kl: float
    rewards: dict[str, float]


@dataclass
class Outcome:
    """Base and mixed outputs of one request (same seed)."""

    request: MixRequest
    base: Output
    mixed: Output

    def summary(self) -> dict:
        """The JSON the API returns: the mix, the mixed reply's rewards and KL, and the base's."""
        return {"weights": self.request.weights, "seed": self.request.seed, "rewards": self.mixed.rewards,
                "kl": self.mixed.kl, "base": {"text": self.base.text, "rewards": self.base.rewards,
                                              "kl": self.base.kl}}


@dataclass
class Partial:
    """Texts so far; the last one of a run carries the finished `Outcome`."""

    base_text: str
    mixed_text: str
    outcome: Outcome | None = None


def score_outputs(rewards: Mapping[str, Callable], prompt: str, texts: list[str]) -> list[dict[str, float]]:
    """Every reward on every text (one call per reward): [{name: score} per text]."""
    scores = [{} for _ in texts]
    for name, fn in rewards.items():
        try:
            values = fn([prompt] * len(texts), list(texts))
        except Exception as err:  # a reward is user code: say which one failed
            raise RuntimeError(f"Reward '{name}' failed: {type(err).__name__}: {err}") from err
        for row, value in zip(scores, values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RuntimeError(f"Reward '{name}' returned {value!r}; a reward must return one finite number per "
                                   "reply: fix the reward function (or leave it out of the app).")
            row[name] = float(value)
    return scores


def _stream(parts: AppParts, request: MixRequest, weights: Mapping[str, float]):
    if isinstance(parts.base, APIBase):
        mixer = Mixer(parts.bank, weights, top_k=parts.top_k, top_p=parts.top_p, tokenizer=parts.tokenizer)
        return api_generate(parts.base, [request.prompt], mixer, max_new_tokens=request.max_new_tokens,
                            seed=request.seed, chat_template=parts.chat_template, stream=True)
    if isinstance(parts.bank, ServedModel):
        return parts.bank.generate([request.prompt], weights, max_new_tokens=request.max_new_tokens, seed=request.seed,
                                   top_k=parts.top_k, top_p=parts.top_p, chat_template=parts.chat_template,
                                   stream=True)
    mixer = Mixer(parts.bank, weights, top_k=parts.top_k, top_p=parts.top_p, tokenizer=parts.tokenizer)  # per request
    return generate(parts.base, parts.tokenizer, [request.prompt], mixer, max_new_tokens=request.max_new_tokens,
                    seed=request.seed, chat_template=parts.chat_template, stream=True)


def run_mix(parts: AppParts, request: MixRequest) -> Iterator[Partial]:
    """Generate base (all β = 0) and mixed replies for the same seed, one token of each per step.

    Yields `Partial` texts as they grow; the last one holds the `Outcome` (texts, rewards, KL).
    The base reply of a (prompt, length, seed) is cached, so moving a slider only decodes the mix.
    """
    key = (request.prompt, request.max_new_tokens, request.seed, parts.top_k, parts.top_p)
    with parts.cache_lock:
        cached = parts.base_cache.get(key)
    streams = [None if cached else _stream(parts, request, {}), _stream(parts, request, request.weights)]
    texts = [cached.text if cached else "", ""]
    pieces = [iter(s) if s is not None else None for s in streams]
    while any(p is not None for p in pieces):
        for i, it in enumerate(pieces):
            piece = next(it, None) if it is not None else None
            if piece is None:
                pieces[i] = None
            else:
                texts[i] += piece.text
        yield Partial(texts[0], texts[1])
    mixed_gen = streams[1].result
    if cached:
        base = cached
        (mixed_scores,) = score_outputs(parts.rewards, request.prompt, [mixed_gen.texts[0]])
    else:
        base_gen = streams[0].result
        base_scores, mixed_scores = score_outputs(parts.rewards, request.prompt,
                                                  [base_gen.texts[0], mixed_gen.texts[0]])
        base = Output(base_gen.texts[0], base_gen.token_ids[0], base_gen.kl[0], base_scores)
        with parts.cache_lock:
            parts.base_cache[key] = base
            while len(parts.base_cache) > 64:
                parts.base_cache.popitem(last=False)
    mixed = Output(mixed_gen.texts[0], mixed_gen.token_ids[0], mixed_gen.kl[0], mixed_scores)
    yield Partial(base.text, mixed.text, Outcome(request, base, mixed))


def run_mix_once(parts: AppParts, request: MixRequest) -> Outcome:
    """`run_mix` without streaming: the finished `Outcome`."""
    for partial in run_mix(parts, request):
        pass
    return partial.outcome


# ----------------------------------------------------------------------------------------- history
def record(history: list[dict], outcome: Outcome) -> list[dict]:
    """A new history with this outcome's mix (and its base, once per prompt and seed) as trade-off points."""
    request = outcome.request
    where = {"prompt": request.prompt, "seed": request.seed, "max_new_tokens": request.max_new_tokens}
    points = list(history)
    if not any(p["kind"] == "base" and all(p[k] == v for k, v in where.items()) for p in points):
        points.append({"kind": "base", "label": "base (all β = 0)", "weights": {h: 0.0 for h in request.weights},
                       "kl": outcome.base.kl, "rewards": dict(outcome.base.rewards), **where})
    points.append({"kind": "mix", "label": mix_label(request.weights), "weights": dict(request.weights),
                   "kl": outcome.mixed.kl, "rewards": dict(outcome.mixed.rewards), **where})
    return points[-MAX_HISTORY:]


def axis_choices(parts: AppParts) -> list[str]:
    """Axes the trade-off plot offers: KL, each reward, each head's coefficient."""
    return [KL_AXIS] + [f"reward: {r}" for r in parts.rewards] + [f"β {h}" for h in parts.heads]


def default_axes(parts: AppParts) -> tuple[str, str]:
    """(x, y): KL vs the first reward, or KL vs the first head's coefficient when there are no rewards."""
    choices = axis_choices(parts)
    return KL_AXIS, choices[1] if len(choices) > 1 else KL_AXIS


def axis_value(point: dict, axis: str) -> float:
    if axis == KL_AXIS:
        return point["kl"]
    if axis.startswith("reward: "):
        return point["rewards"].get(axis[len("reward: "):], math.nan)
    if axis.startswith("β "):
        return point["weights"].get(axis[len("β "):], 0.0)
    raise RequestError(f"Unknown plot axis {axis!r}.")


def trade_off_rows(history: list[dict], x: str, y: str) -> list[dict]:
    """Plot rows {x, y, point, mix}: point is 'base', 'tried' or 'current' (the latest mix)."""
    last_mix = max((i for i, p in enumerate(history) if p["kind"] == "mix"), default=-1)
    return [{"x": axis_value(p, x), "y": axis_value(p, y), "mix": p["label"],
             "point": "base" if p["kind"] == "base" else "current" if i == last_mix else "tried"}
            for i, p in enumerate(history)]


# ------------------------------------------------------------------------------------ why this token
def token_label(tokenizer, token_id: int) -> str:
    return repr(tokenizer.decode([token_id], skip_special_tokens=False))


def step_choices(tokenizer, token_ids: list[int]) -> list[tuple[str, int]]:
    """(label, step) for every generated token: '3: ' the''."""
    return [(f"{i}: {token_label(tokenizer, t)}", i) for i, t in enumerate(token_ids)]


def first_divergence(base_ids: list[int], mixed_ids: list[int]) -> int:
    """The first step where the mixed reply picked another token than the base (0 if they agree)."""
    return next((i for i, (a, b) in enumerate(zip(base_ids, mixed_ids)) if a != b), 0)


@torch.inference_mode()
def explain_step(parts: AppParts, outcome: Outcome, step: int) -> list[dict]:
    """Why the mixed reply chose its token at `step`: the top-k candidates at that prefix, best first.

    Each row: rank, token, chosen (the token the reply took), base logit, each head's contribution
    β_h·(V_h(s·a) − mean_a' V_h(s·a')), final logit (the mixer's output), and probabilities under the
    base top-k (π_ref) and under the mix. final − base = Σ contributions.
    """
    if isinstance(parts.bank, ServedModel):
        raise RequestError(f"'Why this token' needs the heads in this process; this app generates on the server at "
                           f"{parts.bank.url}. Run `valuemix ui` without --server to see each head's share.")
    ids = outcome.mixed.token_ids
    if not isinstance(step, int) or not 0 <= step < len(ids):
        raise RequestError(f"Step {step!r} is not a step of the mixed reply (0 to {len(ids) - 1}).")
    _, prompt_ids, _ = encode_prompts(parts.tokenizer, [outcome.request.prompt], parts.chat_template)
    prefix = torch.cat([prompt_ids, torch.tensor([ids[:step]], dtype=prompt_ids.dtype)], dim=1)
    if isinstance(parts.base, APIBase):  # the base's top-k log-probabilities are all the API gives
        top, logprobs = parts.base.top_logprobs(prefix[0].tolist(), parts.top_k)
        scores = torch.full((1, len(parts.tokenizer)), -math.inf)
        scores[0, top] = torch.tensor(logprobs)
    else:
        prefix = prefix.to(parts.base.device)
        scores = parts.base(input_ids=prefix, attention_mask=torch.ones_like(prefix)).logits[:, -1].float()
    weights = outcome.request.weights
    mixer = Mixer(parts.bank, weights, top_k=parts.top_k, top_p=parts.top_p, tokenizer=parts.tokenizer)
    candidates, base_logits, in_set, values = mixer.candidate_values(prefix, scores)
    final = mixer(prefix, scores).gather(-1, candidates)[0]
    contributions = {h: torch.zeros_like(base_logits[0]) for h in parts.heads}
    if values is not None:
        contributions.update(zip(mixer.active_heads, mixer.contributions(values, in_set)[:, 0]))
    p_base = torch.softmax(mixer.reference(scores).gather(-1, candidates)[0], -1)
    p_mixed = torch.softmax(final, -1)
    rows = []
    for rank, token in enumerate(candidates[0].tolist()):
        rows.append({"rank": rank + 1, "token": token_label(parts.tokenizer, token), "token_id": token,
                     "chosen": token == ids[step], "base_logit": float(base_logits[0, rank]),
                     "contributions": {h: float(c[rank]) for h, c in contributions.items()},
                     "final_logit": float(final[rank]), "p_base": float(p_base[rank]),
                     "p_mixed": float(p_mixed[rank])})
    return sorted(rows, key=lambda r: -r["final_logit"])
