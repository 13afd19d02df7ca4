"""Evaluation against Best-of-N: the order-statistics estimator, the sweep, the report and its plots."""

import itertools
import json
import math

import numpy as np
import pytest
from conftest import build_model, build_tokenizer, make_bank

from valuemix.cli import main as cli
import valuemix as vm
from valuemix.compose.evaluate import (EvalConfig, best_of_n_kl, best_of_n_per_prompt, best_of_n_reward, evaluate,
                                       standard_error, steering)
from valuemix.compose.report import plot_report, summary_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def vowels(prompts, completions):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def words(prompts, completions):
    return [-len(c.split()) for c in completions]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_best_of_n_reward_equals_enumerating_every_subset(n):
    rewards = np.random.default_rng(0).normal(size=(3, 5))
    expected = np.mean([np.mean([max(row[list(s)]) for s in itertools.combinations(range(5), n)]) for row in rewards])
    assert best_of_n_reward(rewards, n) == pytest.approx(expected)


def test_standard_error_is_the_spread_of_prompt_means_over_root_prompts():
    per_prompt = best_of_n_per_prompt(np.random.default_rng(1).normal(size=(6, 8)), 4)
    expected = math.sqrt(sum((x - per_prompt.mean()) ** 2 for x in per_prompt) / 5) / math.sqrt(6)
    assert standard_error(per_prompt) == pytest.approx(expected)
    assert standard_error(np.array([0.7])) == 0.0  # one prompt: no spread to measure


class Recording:
    """A reward that keeps what it returned, call by call, to check the report's statistics against."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions):
        scores = vowels(prompts, completions)
        self.calls.append((list(prompts), scores))
        return scores


def test_standard_errors_are_over_prompts_for_every_setting_and_best_of_n():
    tok = build_tokenizer()
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok, heads=("helpful",))
    prompts, reward = ["hello world", "the cat", "a dog ran"], Recording()
    config = EvalConfig(betas=(2.0,), samples_per_prompt=2, best_of=4, max_new_tokens=5, top_k=5, batch_size=8)
    report = evaluate(base, tok, bank, prompts, {"helpful": reward}, config, progress=False)
    for setting, (_, scores) in zip(report["settings"], reward.calls):
        means = np.asarray(scores).reshape(3, 2).mean(axis=1)
        assert setting["rewards"]["helpful"] == pytest.approx(means.mean())
        assert setting["reward_se"]["helpful"] == pytest.approx(means.std(ddof=1) / math.sqrt(3))
    best_of = np.asarray(reward.calls[-1][1]).reshape(3, 4)  # the last call scores the Best-of-N samples
    for point in report["best_of_n"]["helpful"]:
        maxima = [np.mean([max(row[list(s)]) for s in itertools.combinations(range(4), point["n"])]) for row in best_of]
        assert point["reward_se"] == pytest.approx(np.std(maxima, ddof=1) / math.sqrt(3))
    summary = report["summary"]["helpful"]
    assert summary["base_reward_se"] == report["settings"][0]["reward_se"]["helpful"] > 0
    row = summary_table(report).splitlines()[2]
    assert row.startswith(f"| helpful | {summary['base_reward']:.3f} ± {summary['base_reward_se']:.3f} |  | ")  # no BoN-16


def test_best_of_n_kl_is_zero_for_one_and_grows():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    assert all(best_of_n_kl(2 ** i) < best_of_n_kl(2 ** (i + 1)) for i in range(6))


@pytest.fixture(scope="module")
def report():
    tok = build_tokenizer()
    base, bank = build_model("llama", len(tok), seed=0), make_bank(tok, heads=("helpful", "concise"))
    config = EvalConfig(betas=(-2.0, 0.0, 2.0), grid_heads=("helpful", "concise"), grid_betas=(0.0, 2.0),
                        samples_per_prompt=2, best_of=8, max_new_tokens=5, top_k=5, batch_size=8)
    return evaluate(base, tok, bank, ["hello world", "the cat"], {"helpful": vowels, "concise": words}, config,
                    progress=False)


def test_the_sweep_covers_every_setting_and_beta_zero_costs_no_kl(report):
    weights = [s["weights"] for s in report["settings"]]
    assert weights[0] == {"helpful": 0.0, "concise": 0.0}
    assert {"helpful": 2.0, "concise": 0.0} in weights and {"helpful": 0.0, "concise": -2.0} in weights
    assert {"helpful": 2.0, "concise": 2.0} in weights
    assert len(weights) == 1 + 2 * 2 + 1
    assert report["settings"][0]["kl"] == 0.0
    assert all(s["kl"] > 0 for s in report["settings"][1:])
    curve = report["best_of_n"]["helpful"]
    assert [p["n"] for p in curve] == [1, 2, 4, 8]
    assert all(a["reward"] <= b["reward"] + 1e-12 for a, b in zip(curve, curve[1:]))  # more samples, better best
    json.dumps(report)


def test_plots_are_png_files(report, tmp_path):
    paths = plot_report(report, tmp_path)
    assert sorted(p.name for p in paths) == ["pareto_helpful_concise.png", "reward_vs_kl_concise.png",
                                             "reward_vs_kl_helpful.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 5000 for p in paths)


def test_valuemix_eval_runs_end_to_end_from_the_command_line(tmp_path):
    tok = build_tokenizer()
    folder = tmp_path / "tiny"
    build_model("llama", len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    bank = make_bank(tok, heads=("concise",), seed=0)  # the same backbone weights as the folder
    bank.save_head("concise", tmp_path / "concise")
    (tmp_path / "prompts.txt").write_text("hello world\nthe cat\n")
    code = cli(["eval", "--base", str(folder), "--heads", str(tmp_path / "concise"), "--prompts",
                str(tmp_path / "prompts.txt"), "--reward", "concise=brevity", "--betas", "-2", "2",
                "--best-of", "4", "--samples-per-prompt", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "eval"),
                "--record-in-heads", "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [s["weights"] for s in report["settings"]] == [{"concise": 0.0}, {"concise": -2.0}, {"concise": 2.0}]
    assert (tmp_path / "eval" / "reward_vs_kl_concise.png").read_bytes().startswith(PNG_MAGIC)
    # --record-in-heads: the head folder now carries what was measured, in its config and its card
    summary = report["summary"]["concise"]
    recorded = json.loads((tmp_path / "concise" / "head_config.json").read_text())["evaluation"]
    assert recorded["working_beta_range"] == summary["working_beta_range"]
    assert recorded["sweep"] == summary["sweep"] and [r["beta"] for r in recorded["sweep"]] == [-2.0, 0.0, 2.0]
    assert (recorded["prompts"], recorded["samples_per_prompt"], recorded["max_new_tokens"]) == (2, 2, 4)
    card = (tmp_path / "concise" / "README.md").read_text()
    low, high = summary["working_beta_range"]
    worked = f"β from {low:g} to {high:g}" if low < high else "none: no measured β moved the reward as asked"
    assert f"| Coefficient range that worked | {worked}" in card
    assert "## Evaluation" in card and f"| 2 | {summary['sweep'][2]['reward']:.4g} |" in card
    reloaded = vm.ValueBank(str(folder))
    reloaded.load_head(tmp_path / "concise")
    assert reloaded.configs["concise"].evaluation == recorded


def sweep(*points, other=0.0):
    """Settings of a one-head sweep: (β, reward) pairs, plus a setting where another head is on."""
    settings = [{"weights": {"h": beta, "g": 0.0}, "rewards": {"h": reward}, "kl": abs(beta)} for beta, reward in points]
    return settings + [{"weights": {"h": 4.0, "g": 1.0}, "rewards": {"h": 99.0}, "kl": 1.0}]


@pytest.mark.parametrize("points, expected", [
    ([(-4, 0.1), (-2, 0.2), (0, 0.5), (2, 0.6), (4, 0.7), (8, 0.9)], [-4, 8]),  # monotone all the way
    ([(-2, 0.2), (0, 0.5), (2, 0.9), (4, 0.8), (8, 0.95)], [-2, 2]),  # overshoots after 2: the range stops there
    ([(-2, 0.6), (0, 0.5), (2, 0.5)], [0, 0]),  # neither direction moved it as asked
    ([(0, 0.5), (1, 0.6)], [0, 1]),  # no negative β swept
])
def test_working_beta_range_stops_where_the_reward_stops_following_beta(points, expected):
    result = steering(sweep(*points), "h")
    assert result["working_beta_range"] == expected
    assert [r["beta"] for r in result["sweep"]] == sorted(b for b, _ in points)  # the two-head setting is left out


def test_card_says_the_range_was_not_measured_until_an_evaluation_is_recorded(tmp_path):
    tok = build_tokenizer()
    bank = make_bank(tok, heads=("concise",))
    bank.save_head("concise", tmp_path / "concise")
    card = (tmp_path / "concise" / "README.md").read_text()
    assert "| Coefficient range that worked | not measured yet" in card and "## Evaluation" not in card


def test_card_states_the_recorded_working_range_and_sweep():
    from dataclasses import replace

    from valuemix.heads.files import head_card
    from valuemix.heads.head_config import HeadConfig

    rows = [{"beta": -2.0, "reward": 0.25, "kl": 1.5}, {"beta": 0.0, "reward": 0.5, "kl": 0.0},
            {"beta": 4.0, "reward": 0.875, "kl": 3.25}]
    evaluation = {"working_beta_range": [-2.0, 4.0], "sweep": rows, "prompts": 15, "samples_per_prompt": 2,
                  "max_new_tokens": 32, "top_k": 20, "largest_best_of_n_reached": 16}
    card = str(head_card(replace(HeadConfig("cheerful"), evaluation=evaluation)))
    assert "| Coefficient range that worked | β from -2 to 4: the reward rose with β" in card
    assert "on 15 held-out prompts × 2 completions\nof 32 tokens per β (top-k 20" in card
    assert "matches Best-of-16 sampling" in card
    assert "| -2 | 0.25 | 1.5 |\n| 0 | 0.5 | 0 |\n| 4 | 0.875 | 3.25 |" in card
    assert "{'cheerful': 1.0})  # β from -2 to 4 worked" in card
