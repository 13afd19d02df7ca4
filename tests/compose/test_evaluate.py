"""Evaluation against Best-of-N: the order-statistics estimator, the sweep, the report and its plots."""

import itertools
import json
import math

import numpy as np
import pytest
from conftest import build_model, build_tokenizer, make_bank

from valuemix.cli import main as cli
from valuemix.compose.evaluate import EvalConfig, best_of_n_kl, best_of_n_reward, evaluate
from valuemix.compose.plots import plot_report

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
                str(tmp_path / "prompts.txt"), "--reward", "concise=brevity", "--betas", "2", "--best-of", "4",
                "--samples-per-prompt", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "eval"),
                "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [s["weights"] for s in report["settings"]] == [{"concise": 0.0}, {"concise": 2.0}]
    assert (tmp_path / "eval" / "reward_vs_kl_concise.png").read_bytes().startswith(PNG_MAGIC)
