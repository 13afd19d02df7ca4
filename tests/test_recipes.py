"""The recipes in recipes/: each runs end to end in --smoke mode, and its --help documents every setting."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

import valuemix as vm
from valuemix.recipe import SMOKE_SIZES

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("helpful_harmless", "style", "unlearn", "sentiment")
HEADS = {"helpful_harmless": ["helpful", "harmless"], "style": ["formality"], "unlearn": ["unlearn"],
         "sentiment": ["positive"]}
EXTRA = {"unlearn": ["--topic-classifier", "org/topic-model", "--topic-label", "wizardry"]}  # its classifier path too
SMOKE_BETAS = SMOKE_SIZES["betas"]


def load(name: str):
    """recipes/<name>.py as a module (recipes/ is a folder of scripts, not a package: like `python recipes/x.py`,
    its folder is on sys.path for the modules the scripts share)."""
    if str(ROOT / "recipes") not in sys.path:
        sys.path.insert(0, str(ROOT / "recipes"))
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """smoke_run(name) -> (module, out folder, result) of the one --smoke run of that recipe in this module."""
    runs = {}

    def get(name: str):
        if name not in runs:
            module, out = load(name), tmp_path_factory.mktemp(name)
            argv = ["--smoke", "--out", str(out), "--no-progress", *EXTRA.get(name, [])]
            runs[name] = module, out, module.main(argv)
        return runs[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_help_lists_every_setting_with_its_documentation(name, capsys):
    module = load(name)
    config_class = next(v for k, v in vars(module).items() if k.endswith("Config") and dataclasses.is_dataclass(v))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(config_class):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert "undocumented" not in text
    assert "--config FILE" in text and "--smoke" in text


@pytest.mark.parametrize("name", NAMES)
def test_smoke_trains_heads_that_load_onto_a_bank(smoke_run, name):
    _, out, result = smoke_run(name)
    assert sorted(result["heads"]) == sorted(HEADS[name])
    bank = vm.ValueBank(str(out / "smoke-world" / "backbone"))
    for head, folder in result["heads"].items():
        assert Path(folder) == out / "heads" / head
        assert bank.load_head(folder) == head
        config = bank.configs[head]
        assert config.data_size == SMOKE_SIZES["n_prompts"] * SMOKE_SIZES["n_per_prompt"]
        assert config.metrics["steps"] >= 1
        # the evaluation's measurements are recorded in the head, as `valuemix eval --record-in-heads` does
        assert [row["beta"] for row in config.evaluation["sweep"]] == SMOKE_BETAS
        low, high = config.evaluation["working_beta_range"]
        assert low <= 0 <= high


@pytest.mark.parametrize("name", NAMES)
def test_smoke_report_has_the_sweep_best_of_n_and_plots(smoke_run, name):
    _, out, result = smoke_run(name)
    report = json.loads((out / "eval" / "report.json").read_text())
    assert result["report"] == str(out / "eval" / "report.json")
    assert report["heads"] == HEADS[name]
    assert report["prompts"] == SMOKE_SIZES["n_eval_prompts"]
    swept = {(h, s["weights"][h]) for s in report["settings"] for h in report["heads"]
             if all(b == 0 for g, b in s["weights"].items() if g != h)}
    assert swept == {(h, b) for h in HEADS[name] for b in SMOKE_BETAS}
    for head in HEADS[name]:
        assert [p["n"] for p in report["best_of_n"][head]] == [1, 2, 4]
        assert [row["beta"] for row in report["sweeps"][head]] == SMOKE_BETAS
        assert (out / "eval" / f"reward_vs_kl_{head}.png").stat().st_size > 0
        assert "working_beta_range" in report["summary"][head]
    if name == "helpful_harmless":  # the joint grid and its Pareto plot
        assert any(all(s["weights"].values()) for s in report["settings"])
        assert (out / "eval" / "pareto_helpful_harmless.png").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["smoke"] is True and run["timings_s"]["total"] > 0
    assert run["config"]["base"] == str(out / "smoke-world" / "base")


def test_unlearn_reports_mention_rate_and_helpfulness_at_each_beta(smoke_run):
    _, out, _ = smoke_run("unlearn")
    report = json.loads((out / "eval" / "report.json").read_text())
    for row in report["sweeps"]["unlearn"]:
        assert {"beta", "kl", "unlearn", "mention_rate", "helpfulness"} <= set(row)
        assert 0.0 <= row["mention_rate"] <= 1.0
        # reward = 1[no mention] − P(topic) ≤ 1 − mention rate (the topic classifier only takes away)
        assert row["unlearn"] <= 1.0 - row["mention_rate"] + 1e-9
    head = json.loads((out / "heads" / "unlearn" / "head_config.json").read_text())
    assert "no mention of" in head["reward"] and "minus P('wizardry'" in head["reward"]


def test_sentiment_prompts_are_review_starts_of_2_to_8_tokens(smoke_run):
    module, out, _ = smoke_run("sentiment")
    config = module.SentimentConfig(dataset=str(out / "smoke-world" / "imdb"))
    tokenizer = vm.ValueBank(str(out / "smoke-world" / "backbone")).tokenizer
    prompts = module.review_starts(config, tokenizer, "train", 4)
    assert len(prompts) == 4
    for prompt in prompts:
        assert 2 <= len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 8


def test_a_recipe_on_a_backbone_with_another_tokenizer_trains_and_evaluates_cross_tokenizer_heads(tmp_path):
    from transformers import AutoTokenizer

    from valuemix import recipe
    from valuemix.heads.fingerprint import tokenizer_fingerprint
    from valuemix.tiny import CORPUS, build_tokenizer

    style = load("style")
    corpus = CORPUS + style.hh_rlhf.corpus()

    def smoke(config, world):  # the recipe's world, with a SentencePiece-style backbone
        return style.smoke(config, world) | {"backbone": world.causal_lm(
            "backbone", "gpt2", seed=1, tokenizer=build_tokenizer(kind="unigram", corpus=corpus))}

    result = recipe.main(style.StyleConfig, style.task, smoke, ["--smoke", "--out", str(tmp_path), "--no-progress"],
                         "recipes/style.py", corpus=style.hh_rlhf.corpus())
    base_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "smoke-world" / "base")
    bank = vm.ValueBank(str(tmp_path / "smoke-world" / "backbone"))
    assert not bank.same_tokenizer(base_tokenizer)
    assert bank.load_head(result["heads"]["formality"]) == "formality"
    config = bank.configs["formality"]
    assert config.base_tokenizer == tokenizer_fingerprint(base_tokenizer)
    assert [row["beta"] for row in config.evaluation["sweep"]] == SMOKE_BETAS  # evaluated through the cross path
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    steered = [s["kl"] for s in report["settings"] if s["weights"]["formality"] != 0]
    assert steered and all(kl > 0 for kl in steered)


def test_config_file_drives_a_recipe_and_push_publishes_the_head(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("recipes_fake_hub", ROOT / "tests" / "heads" / "test_hub.py")
    hub_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub_tests)
    monkeypatch.setenv("HF_TOKEN", hub_tests.TOKEN)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = hub_tests.FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    settings = tmp_path / "style.yaml"
    settings.write_text("style: conciseness\nn_prompts: 3\nbetas: [0, 1]\nprogress: false\n"
                        "push_to: alice/vm-concise\n")
    try:
        result = load("style").main(["--config", str(settings), "--smoke", "--out", str(tmp_path / "run")])
    finally:
        server.close()
    assert list(result["heads"]) == ["conciseness"]
    head = json.loads((tmp_path / "run" / "heads" / "conciseness" / "head_config.json").read_text())
    assert head["data_size"] == 3 * SMOKE_SIZES["n_per_prompt"]
    assert [row["beta"] for row in head["evaluation"]["sweep"]] == [0.0, 1.0]
    [commit] = server.commits
    assert commit["repo"] == "alice/vm-concise" and result["pushed"]["conciseness"].startswith(server.url)
    assert json.loads(commit["files"]["head_config.json"])["evaluation"] == head["evaluation"]


def test_a_bad_push_target_stops_the_run_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="not a Hub repo id"):
        load("sentiment").main(["--smoke", "--out", str(tmp_path), "--push-to", "no-slash"])
    assert not any(tmp_path.iterdir())  # not even the smoke world was built
