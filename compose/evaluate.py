"""Evaluation: reward vs KL of value mixing over a coefficient sweep, against Best-of-N.

π_ref is the base model under the mixer's own sampling settings with every β = 0 (the base
truncated to the mixer's candidate sets: the top-k, or its top-p nucleus), so that β = 0 costs KL 0. Best-of-N draws N samples from that same π_ref
and keeps the best by the reward; its KL from π_ref is log N − (N − 1)/N, and its mean reward is
computed exactly from M ≥ N samples per prompt with order statistics (no resampling noise).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm
from valuemix.heads.bank import ValueBank
from valuemix.compose.generate import generate
from valuemix.compose.mixer import DEFAULT_TOP_P, Mixer

Reward = Callable[[list[str], list[str]], Sequence[float]]


@dataclass
class EvalConfig:
    """Settings of `evaluate`."""

    betas: list[float] = field(default_factory=lambda: [-4.0, -2.0, 0.0, 1.0, 2.0, 4.0, 8.0], metadata={
        "help": "coefficients swept for each head (the others at 0)"})
    grid_heads: list[str] | None = field(default=None, metadata={
        "help": "two heads whose coefficients are swept jointly over `grid_betas` (a Pareto front)"})
    grid_betas: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0], metadata={
        "help": "coefficients of the two-head grid"})
    samples_per_prompt: int = field(default=4, metadata={"help": "completions per prompt for each coefficient setting"})
    best_of: int = field(default=64, metadata={
        "help": "the largest N of Best-of-N; N = 1, 2, 4, … up to it, from `best_of` samples per prompt"})
    max_new_tokens: int = field(default=48, metadata={"help": "sampling settings shared by the mixer and π_ref"})
    top_k: int = field(default=20, metadata={"help": "sampling settings shared by the mixer and π_ref"})
    top_p: float = field(default=DEFAULT_TOP_P, metadata={"help": "sampling settings shared by the mixer and π_ref"})
    temperature: float = field(default=1.0, metadata={"help": "sampling settings shared by the mixer and π_ref"})
    chat_template: bool = field(default=False, metadata={
        "help": "wrap each prompt as a user message with the tokenizer's chat template"})
    batch_size: int = field(default=32, metadata={"help": "prompts × samples decoded together"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


def best_of_n_per_prompt(rewards: np.ndarray, n: int) -> np.ndarray:
    """Expected max reward of N draws without replacement from each row's M samples: one value per row.

    rewards: (prompts, M). With the row sorted, the i-th smallest (1-based) is the max of a random
    N-subset with probability C(i−1, N−1) / C(M, N).
    """
    m = rewards.shape[1]
    ranks = np.arange(1, m + 1)
    weights = np.array([math.comb(i - 1, n - 1) for i in ranks], dtype=float) / math.comb(m, n)
    return (np.sort(rewards, axis=1) * weights).sum(axis=1)


def best_of_n_reward(rewards: np.ndarray, n: int) -> float:
    """Best-of-N's mean reward over prompts (see `best_of_n_per_prompt`)."""
    return float(best_of_n_per_prompt(rewards, n).mean())


def standard_error(per_prompt: np.ndarray) -> float:
    """Standard error of a mean over prompts, from one value per prompt (0 for a single prompt).

    Completions of the same prompt are correlated, so the prompt, not the completion, is the unit.
    """
    per_prompt = np.asarray(per_prompt, dtype=float)
    if len(per_prompt) < 2:
        return 0.0
    return float(per_prompt.std(ddof=1) / math.sqrt(len(per_prompt)))


def best_of_n_kl(n: int) -> float:
    """KL(π_BoN ‖ π_ref) in nats, the usual analytic value log N − (N − 1)/N."""
    return math.log(n) - (n - 1) / n


@dataclass
class Setting:
    """One point of the sweep: coefficients, mean reward per reward function (and its standard error over
    prompts), KL and cost."""

    weights: dict[str, float]
    rewards: dict[str, float]
    kl: float
    seconds_per_completion: float
    samples: list[str] = field(default_factory=list)
    reward_se: dict[str, float] = field(default_factory=dict)


def evaluate(base, tokenizer, bank: ValueBank, prompts: Sequence[str], rewards: Mapping[str, Reward],
             config: EvalConfig | None = None, heads: Sequence[str] | None = None, progress: bool = True) -> dict:
    """Sweep each head's coefficient (and a two-head grid) and compare with Best-of-N from π_ref.

    prompts: plain prompts (`config.chat_template` formats them for the model; rewards read them plain).
    rewards: name -> reward; a head
    is compared with Best-of-N on the reward of the same name. Returns a JSON-ready dict with
    `settings`, `best_of_n` (per reward: N, mean reward, KL, seconds per completion) and `summary`.
    """
    config = config or EvalConfig()
    heads = bank.check_heads(heads if heads is not None else [h for h in bank.heads if h in rewards])
    zero = {h: 0.0 for h in heads}
    settings = [zero] + [zero | {head: beta} for head in heads for beta in config.betas if beta != 0]
    if config.grid_heads:
        a, b = bank.check_heads(config.grid_heads)
        settings += [zero | {a: x, b: y} for x in config.grid_betas for y in config.grid_betas if x and y]

    bar = tqdm(total=len(settings) + 1, desc="eval", disable=not progress)
    results = []
    for weights in settings:
        bar.set_postfix_str(", ".join(f"{h}={b:g}" for h, b in weights.items() if b) or "base")
        results.append(measure_mix(base, tokenizer, bank, prompts, weights, rewards, config))
        bar.update(1)
    bar.set_postfix_str(f"Best-of-{config.best_of} from π_ref")
    best_of_n = _best_of_n(base, tokenizer, bank, prompts, rewards, config)
    bar.update(1)
    bar.close()
    report = {"config": asdict(config), "heads": heads, "prompts": len(prompts),
              "settings": [asdict(s) for s in results], "best_of_n": best_of_n}
    report["summary"] = summarize(report)
    return report


def measure_mix(base, tokenizer, bank: ValueBank, prompts: Sequence[str], weights: Mapping[str, float],
                rewards: Mapping[str, Reward], config: EvalConfig | None = None) -> Setting:
    """Decode `config.samples_per_prompt` completions per prompt under one mix; their mean rewards, KL and cost.

    The `Setting`'s `samples` hold the first completion of each prompt (every completion with one per prompt).
    """
    config = config or EvalConfig()
    n = config.samples_per_prompt
    mixer = Mixer(bank, weights, top_k=config.top_k, top_p=config.top_p, tokenizer=tokenizer)
    texts, kls, seconds = _sample(base, tokenizer, prompts, n, config, mixer)
    repeated = [p for p in prompts for _ in range(n)]
    scores = {name: np.asarray(fn(repeated, texts), dtype=float).reshape(len(prompts), -1)
              for name, fn in rewards.items()}
    return Setting(dict(weights), {name: float(s.mean()) for name, s in scores.items()}, float(np.mean(kls)), seconds,
                   texts[::n], {name: standard_error(s.mean(axis=1)) for name, s in scores.items()})


def _sample(base, tokenizer, prompts, n, config, mixer):
    """(texts, KL per completion, decode seconds per completion) for n completions of each prompt."""
    repeated = [p for p in prompts for _ in range(n)]
    texts, kls, seconds = [], [], 0.0
    for start in range(0, len(repeated), config.batch_size):
        batch = repeated[start:start + config.batch_size]
        began = time.perf_counter()
        out = generate(base, tokenizer, batch, mixer, max_new_tokens=config.max_new_tokens,
                       temperature=config.temperature, seed=config.seed + start, chat_template=config.chat_template)
        seconds += time.perf_counter() - began
        texts += out.texts
        kls += out.kl
    return texts, kls, seconds / len(repeated)


def _best_of_n(base, tokenizer, bank, prompts, rewards, config) -> dict:
    """Best-of-N curves for every reward from `best_of` π_ref samples per prompt."""
    m = config.best_of
    reference = Mixer(bank, {}, top_k=config.top_k, top_p=config.top_p, tokenizer=tokenizer)  # no head: π_ref
    texts, _, sample_seconds = _sample(base, tokenizer, prompts, m, config, reference)
    repeated = [p for p in prompts for _ in range(m)]
    curves = {}
    for name, fn in rewards.items():
        began = time.perf_counter()
        scores = np.asarray(fn(repeated, texts), dtype=float).reshape(len(prompts), m)
        reward_seconds = (time.perf_counter() - began) / len(repeated)
        ns = [2 ** i for i in range(int(math.log2(m)) + 1)]
        curves[name] = [{"n": n, "reward": best_of_n_reward(scores, n),
                         "reward_se": standard_error(best_of_n_per_prompt(scores, n)), "kl": best_of_n_kl(n),
                         "seconds_per_completion": n * (sample_seconds + reward_seconds)} for n in ns]
    return curves


def summarize(report: dict) -> dict:
    """Per head: the largest Best-of-N that some β reaches (at the lowest KL that does), at what KL and cost,
    and the gain at BoN-16's KL."""
    settings = report["settings"]
    base = next(s for s in settings if not any(s["weights"].values()))
    summary = {}
    for head in report["heads"]:
        if head not in report["best_of_n"]:
            continue
        sweep = [s for s in own_settings(settings, head) if s["weights"][head] > 0] or [base]
        curve = report["best_of_n"][head]
        reached = [(point, min((s for s in sweep if s["rewards"][head] >= point["reward"]),
                               key=lambda s: (s["kl"], s["seconds_per_completion"]), default=None))
                   for point in curve]  # of the βs that reach a Best-of-N, the one closest to the base
        reached = [(p, s) for p, s in reached if s is not None]
        bon16 = next((p for p in curve if p["n"] == 16), curve[-1])
        within = [s for s in sweep + [base] if s["kl"] <= bon16["kl"]]
        best_within = max(within, key=lambda s: s["rewards"][head]) if within else base
        entry = {"base_reward": base["rewards"][head], "base_reward_se": base["reward_se"].get(head),
                 **steering(settings, head),
                 "gain_at_best_of_16_kl": best_within["rewards"][head] - base["rewards"][head],
                 "beta_at_best_of_16_kl": best_within["weights"][head]}
        if bon16["n"] == 16:
            entry.update({"best_of_16_reward": bon16["reward"], "best_of_16_reward_se": bon16.get("reward_se")})
        if reached:
            point, setting = reached[-1]
            entry.update({"largest_best_of_n_reached": point["n"], "best_of_n_reward": point["reward"],
                          "best_of_n_reward_se": point.get("reward_se"),
                          "best_of_n_seconds": point["seconds_per_completion"], "beta": setting["weights"][head],
                          "vas_reward": setting["rewards"][head], "vas_reward_se": setting["reward_se"].get(head),
                          "vas_kl": setting["kl"],
                          "vas_seconds": setting["seconds_per_completion"]})
        summary[head] = entry
    return summary


def own_settings(settings: Sequence[dict], head: str) -> list[dict]:
    """The settings of `head`'s own sweep: every other head at β = 0 (the base included)."""
    return [s for s in settings if all(b == 0 for h, b in s["weights"].items() if h != head)]


def head_evaluation(report: dict, head: str) -> dict:
    """What an evaluation measured for one head, to record in its head_config.json and model card."""
    summary, config = report["summary"][head], report["config"]
    return {"working_beta_range": summary["working_beta_range"], "sweep": summary["sweep"],
            "prompts": report["prompts"], "samples_per_prompt": config["samples_per_prompt"],
            "max_new_tokens": config["max_new_tokens"], "top_k": config["top_k"],
            "top_p": config.get("top_p", 1.0),
            "largest_best_of_n_reached": summary.get("largest_best_of_n_reached")}


def steering(settings: Sequence[dict], head: str) -> dict:
    """The head's own sweep (every other β at 0) and the β range over which it steered as asked.

    `sweep`: [{beta, reward, kl}] by β. `working_beta_range`: [lo, hi], the widest range of swept βs
    around 0 over which the head's reward rises strictly with β at every step; an end is 0 when
    even the first step from 0 failed (e.g. the reward overshot or did not move).
    """
    rows = sorted(({"beta": s["weights"][head], "reward": s["rewards"][head], "kl": s["kl"]}
                   for s in own_settings(settings, head)), key=lambda r: r["beta"])
    zero = next(i for i, r in enumerate(rows) if r["beta"] == 0)

    def reach(step: int) -> float:
        end = zero
        while 0 <= end + step < len(rows) and step * (rows[end + step]["reward"] - rows[end]["reward"]) > 0:
            end += step
        return rows[end]["beta"]

    return {"sweep": rows, "working_beta_range": [reach(-1), reach(1)]}
