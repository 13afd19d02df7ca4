"""Tests for the `valuemix` command line (valuemix.cli, valuemix.commands, valuemix.options, valuemix.reward_specs).

The subcommands run in-process on a tiny llama saved to a folder, which serves as base and backbone.
"""

from __future__ import annotations

import argparse
import json

import datasets
import pytest
import yaml
from conftest import build_model, build_tokenizer

import valuemix as vm
from valuemix import cli, commands, reward_specs
from valuemix.heads import rewards
from valuemix.heads.training import TrainConfig

PROMPTS = ["the cat", "hello", "a happy"]
MINE = ("sample", "score", "train", "push", "generate")


@pytest.fixture
def tiny(tiny_folder):
    """The tiny llama folder: the base model and the value backbone."""
    return tiny_folder


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    return str(path)


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def sample_flags(tiny, prompts_file, out):
    return ["sample", "--base", tiny, "--prompts", prompts_file, "--n-per-prompt", 2, "--max-new-tokens", 5,
            "--out", out, "--no-progress"]


@pytest.fixture
def scored(tiny, prompts_file, tmp_path):
    """A samples folder with a 'short' (brevity) and a 'no_cat' (keywords) column."""
    out = tmp_path / "samples"
    assert run(*sample_flags(tiny, prompts_file, out)) == 0
    assert run("score", "--samples", out, "--reward", "short=brevity", "no_cat=keywords:cat,dog:absent",
               "--no-progress") == 0
    return out


# --- the workflow -----------------------------------------------------------------------------------


def test_sample_score_train_from_flags(tiny, scored, tmp_path):
    samples = datasets.load_from_disk(str(scored))
    assert len(samples) == len(PROMPTS) * 2 and samples["prompt"][::2] == PROMPTS
    assert {"short", "no_cat"} <= set(samples.column_names)
    head = tmp_path / "head"
    assert run("train", "--backbone", tiny, "--samples", scored, "--reward", "short", "--epochs", 1,
               "--batch-size", 4, "--lam", 0.9, "--no-progress", "--out", head) == 0
    bank = vm.ValueBank(tiny)
    assert bank.load_head(head) == "short"
    config = bank.configs["short"]
    assert config.reward == rewards.brevity().description
    assert (config.data_size, config.lam, config.metrics["steps"]) == (6, 0.9, 2)
    assert config.backbone == config.base_model == tiny
    # … and on to eval, still from the command line alone
    out = tmp_path / "eval"
    assert run("eval", "--base", tiny, "--heads", head, "--prompts", str(tmp_path / "prompts.txt"), "--reward",
               "short=brevity", "--betas", 2, "--best-of", 2, "--samples-per-prompt", 1, "--max-new-tokens", 4,
               "--out", out, "--no-progress") == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["weights"] for s in report["settings"]] == [{"short": 0.0}, {"short": 2.0}]
    assert (out / "reward_vs_kl_short.png").exists()


@pytest.fixture
def word_backbone(tmp_path):
    """A tiny GPT-2 with a word-level tokenizer: a value backbone that does not share the tiny base's tokenizer."""
    folder = tmp_path / "word-gpt2"
    tokenizer = build_tokenizer(kind="word")
    build_model("gpt2", len(tokenizer), seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_train_on_a_backbone_with_another_tokenizer_makes_a_cross_tokenizer_head(tiny, scored, word_backbone,
                                                                                 tmp_path, capsys):
    from transformers import AutoTokenizer

    from valuemix.heads.fingerprint import tokenizer_fingerprint

    head = tmp_path / "head"
    assert run("train", "--backbone", word_backbone, "--samples", scored, "--reward", "short", "--epochs", 1,
               "--batch-size", 4, "--no-progress", "--out", head) == 0  # the tokenizer: the samples' base model's
    assert f"for bases with the tokenizer of {tiny}" in capsys.readouterr().out
    bank = vm.ValueBank(word_backbone)
    bank.load_head(head)
    assert bank.configs["short"].base_tokenizer == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny))
    assert "another tokenizer than the backbone's" in (head / "README.md").read_text()
    rows = run_generate(tiny, word_backbone, head)
    assert all(r["kl"] > 0 for r in rows)  # steered: the mixed replies moved away from the base
    same = tmp_path / "same"  # --base-tokenizer named explicitly gives the same head
    assert run("train", "--backbone", word_backbone, "--samples", scored, "--reward", "short", "--epochs", 1,
               "--batch-size", 4, "--no-progress", "--out", same, "--base-tokenizer", tiny) == 0
    assert vm.ValueBank(word_backbone).load_head(same) == "short"
    assert (same / "value_head.safetensors").read_bytes() == (head / "value_head.safetensors").read_bytes()


def run_generate(base, backbone, head) -> list[dict]:
    from valuemix.generation import generate_main

    return generate_main(["--base", base, "--backbone", backbone, "--heads", str(head), "--mix", "short=4",
                          "--prompt", "the cat", "hello", "--max-new-tokens", "4", "--json"])


def test_cross_tokenizer_training_names_the_base_tokenizer_it_needs(tiny, scored, word_backbone, tmp_path, capsys):
    samples = datasets.load_from_disk(str(scored))
    orphan = tmp_path / "orphan"  # samples whose base model is gone
    samples.map(lambda row: {"base_model": str(tmp_path / "gone")}).save_to_disk(orphan)
    flags = ["--backbone", word_backbone, "--reward", "short", "--no-progress", "--out", tmp_path / "head"]
    assert run("train", "--samples", orphan, *flags) == 1
    error = capsys.readouterr().err
    assert f"the tokenizer of their base model '{tmp_path / 'gone'}' could not be loaded" in error
    assert "pass --base-tokenizer with the base model's folder or Hub id" in error
    assert run("train", "--samples", scored, *flags, "--base-tokenizer", word_backbone) == 1
    assert "but the samples were tokenized with tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "head").exists()


def test_the_same_from_one_yaml_file_with_flags_overriding_it(tiny, prompts_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "progress": False,  # shared by every subcommand
        "sample": {"base": tiny, "prompts": prompts_file, "n-per-prompt": 2, "max_new_tokens": 5,
                   "out": str(tmp_path / "samples")},
        "score": {"samples": str(tmp_path / "samples"), "reward": {"no_cat": "keywords:cat,dog:absent"}},
        "train": {"backbone": tiny, "samples": str(tmp_path / "samples"), "reward": "no_cat", "name": "tidy",
                  "epochs": 1, "batch-size": 3, "lam": 0.5, "lora-layers": 1, "out": str(tmp_path / "head")},
    }))
    for subcommand in ("sample", "score"):
        assert run(subcommand, "--config", config) == 0
    assert run("train", "--config", config, "--lam", 1.0) == 0  # the command line wins
    bank = vm.ValueBank(tiny)
    assert bank.load_head(tmp_path / "head") == "tidy"
    head = bank.configs["tidy"]
    assert head.reward == rewards.Keywords(["cat", "dog"], present=False).description
    assert (head.data_size, head.lam, head.metrics["steps"]) == (6, 1.0, 2)
    assert head.trunk_layers == bank.lora_start("tidy") == 1  # a shared-trunk head: LoRA on the top layer only


def test_flat_json_config(tiny, prompts_file, tmp_path):
    config = tmp_path / "sample.json"
    config.write_text(json.dumps({"base": tiny, "prompts": prompts_file, "n_per_prompt": 1, "max-new-tokens": "3",
                                  "out": str(tmp_path / "s"), "--progress": "false"}))
    assert commands.sample_main(["--config", str(config), "--seed", "7"]) == str(tmp_path / "s")
    samples = datasets.load_from_disk(str(tmp_path / "s"))
    assert len(samples) == 3 and set(samples["max_new_tokens"]) == {3} and set(samples["seed"]) == {7}


def test_score_in_place_keeps_earlier_rewards_and_train_uses_their_description(tiny, scored, tmp_path):
    assert run("score", "--samples", scored, "--reward", "dots=regex:\\.", "--no-progress") == 0
    described = json.loads((scored / commands.REWARDS_FILE).read_text())
    assert sorted(described) == ["dots", "no_cat", "short"]
    assert described["dots"] == {"spec": "regex:\\.", "description": "regex present: r'\\.'"}
    assert run("train", "--backbone", tiny, "--samples", scored, "--reward", "no_cat", "--epochs", 1,
               "--no-progress", "--out", tmp_path / "head", "--max-steps", 1) == 0
    config = json.loads((tmp_path / "head" / "head_config.json").read_text())
    assert config["reward"] == described["no_cat"]["description"] and config["metrics"]["steps"] == 1


def test_score_to_another_folder_leaves_the_samples(scored, tmp_path):
    before = datasets.load_from_disk(str(scored)).column_names
    assert run("score", "--samples", scored, "--reward", "long=length:chars", "--out", tmp_path / "long",
               "--no-progress") == 0
    assert datasets.load_from_disk(str(scored)).column_names == before
    assert "long" in datasets.load_from_disk(str(tmp_path / "long")).column_names


def test_train_resumes_from_its_checkpoint(tiny, scored, tmp_path):
    flags = ["train", "--backbone", tiny, "--samples", scored, "--reward", "short", "--epochs", 2, "--batch-size", 3,
             "--checkpoint-dir", tmp_path / "ckpt", "--no-progress"]
    assert run(*flags, "--max-steps", 2, "--out", tmp_path / "a") == 0
    assert run(*flags, "--resume", "--out", tmp_path / "b") == 0
    state = json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_push_subcommand(tmp_path, monkeypatch, capsys):
    calls = []

    def push_folder(directory, repo_id, **kwargs):
        calls.append((directory, repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr("valuemix.heads.hub.push_folder", push_folder)
    assert run("push", tmp_path, "alice/vm-short", "--private", "--token", "hf_x", "--message", "first") == 0
    assert calls == [(str(tmp_path), "alice/vm-short",
                      dict(private=True, token="hf_x", commit_message="first", revision=None))]
    assert "https://huggingface.co/alice/vm-short/commit/abc" in capsys.readouterr().out


# --- errors -----------------------------------------------------------------------------------------


def test_missing_required_flag(prompts_file, capsys):
    with pytest.raises(SystemExit) as exit:
        run("sample", "--prompts", prompts_file, "--out", "x")
    assert exit.value.code == 2
    assert "--base is required (on the command line or as 'base' in the --config file)" in capsys.readouterr().err


def test_unknown_key_in_config_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("base: x\nn_per_promt: 2\n")
    with pytest.raises(SystemExit):
        run("sample", "--config", config)
    assert "sets --n-per-promt, which `valuemix sample` does not have" in capsys.readouterr().err


def test_bad_value_in_config_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: two\n")
    with pytest.raises(SystemExit):
        run("train", "--config", config)
    assert "--epochs: invalid value 'two'" in capsys.readouterr().err


def test_invalid_training_setting_is_a_usage_error(tiny, scored, capsys):
    with pytest.raises(SystemExit):
        run("train", "--backbone", tiny, "--samples", scored, "--reward", "short", "--out", "x", "--lam", 2)
    assert "lam must be in [0, 1]" in capsys.readouterr().err


def test_unknown_reward_column_is_reported_without_a_traceback(tiny, scored, tmp_path, capsys):
    code = run("train", "--backbone", tiny, "--samples", scored, "--reward", "polite", "--out", tmp_path / "h")
    assert code == 1
    err = capsys.readouterr().err
    assert "valuemix train: error: The samples in" in err and "reward columns: no_cat, short" in err
    assert not (tmp_path / "h").exists()


def test_missing_samples_folder(tmp_path, capsys):
    assert run("score", "--samples", tmp_path / "nope", "--reward", "a=brevity") == 1
    assert "No samples at" in capsys.readouterr().err


def test_out_folder_that_is_not_a_dataset_is_refused(tiny, prompts_file, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert run(*sample_flags(tiny, prompts_file, tmp_path / "mine")) == 1
    assert "not a saved dataset" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- prompts files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text", [
    ("p.txt", "the cat\n\n  \nhello\n"),
    ("p.jsonl", '{"prompt": "the cat", "id": 1}\n\n"hello"\n'),
    ("p.json", '["the cat", {"prompt": "hello"}]'),
    ("p.json", '{"prompts": ["the cat", "hello"]}'),
])
def test_prompts_files(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert commands.read_prompts(str(tmp_path / name)) == ["the cat", "hello"]


@pytest.mark.parametrize("name, text, error", [
    ("p.jsonl", '{"prompt": "a"}\n{oops\n', "line 2: not valid JSON"),
    ("p.json", '[{"text": "a"}]', "item 1: expected a non-empty string"),
    ("p.txt", "\n\n", "holds no prompts"),
])
def test_bad_prompts_files(tmp_path, name, text, error):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=error):
        commands.read_prompts(str(tmp_path / name))


# --- reward specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("brevity", rewards.brevity()),
    ("brevity:chars:100", rewards.brevity(unit="chars", per=100)),
    ("length:words", rewards.Length(unit="words")),
    ("length:words:12", rewards.Length(unit="words", target=12)),
    ("keywords:Paris,London:absent", rewards.Keywords(["Paris", "London"], present=False)),
    ("keywords:Paris:count", rewards.Keywords(["Paris"], count=True)),
    ("regex:(?:yes|no)!", rewards.Regex("(?:yes|no)!")),
    ("regex:a:b:absent", rewards.Regex("a:b", present=False)),
])
def test_built_in_reward_specs(spec, expected):
    name, reward, description = reward_specs.parse_reward(f"r={spec}")
    assert (name, type(reward), description) == ("r", type(expected), expected.description)
    texts = ["Paris, yes! a:b", "London is big", "no! Paris and Paris"]
    assert reward(["p"] * 3, texts) == expected(["p"] * 3, texts)


def test_length_in_tokens_loads_the_samples_tokenizer(tiny, scored):
    from transformers import AutoTokenizer

    assert run("score", "--samples", scored, "--reward", "tokens=length:tokens", "--no-progress") == 0
    samples = datasets.load_from_disk(str(scored))
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert samples["tokens"] == [len(tokenizer(c, add_special_tokens=False)["input_ids"])
                                 for c in samples["completion"]]


def test_model_reward_specs(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    for name, labels in (("clf", {0: "neg", 1: "pos"}), ("rm", {0: "score"})):
        model = LlamaForSequenceClassification(LlamaConfig(**common, id2label=labels, label2id={v: k for k, v in
                                                                                              labels.items()}))
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    texts = ["the cat sat", "hello"]
    _, clf, description = reward_specs.parse_reward(f"p=classifier:{tmp_path / 'clf'}:pos")
    assert description.startswith("P('pos' | completion)") and all(0 < v < 1 for v in clf(texts, texts))
    _, rm, description = reward_specs.parse_reward(f"q=reward-model:{tmp_path / 'rm'}")
    assert description.startswith("reward model score") and len(rm(texts, texts)) == 2
    _, emb, description = reward_specs.parse_reward(f"e=embedding:{tmp_path / 'rm'}:a calm reply")
    assert "'a calm reply'" in description and all(-1 <= v <= 1 for v in emb(texts, texts))


def test_reward_from_a_module_and_from_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def exclaim(prompts, completions):\n    return [float(c.count('!')) for c in completions]\n\n"
        "class Loud:\n    description = 'upper-case letters'\n"
        "    def __call__(self, prompts, completions):\n        return [float(sum(map(str.isupper, c))) for c in "
        "completions]\n")
    monkeypatch.chdir(tmp_path)
    _, from_module, description = reward_specs.parse_reward("x=my_rewards:exclaim")
    assert description == "my_rewards:exclaim" and from_module(["p"], ["hi!!"]) == [2.0]
    _, from_file, description = reward_specs.parse_reward(f"y={tmp_path / 'my_rewards.py'}:Loud")
    assert description == "upper-case letters" and from_file(["p"], ["HeLLo"]) == [3.0]


@pytest.mark.parametrize("text, error", [
    ("brevity", "is not NAME=SPEC"),
    ("a=sparkle", "Unknown reward 'sparkle'"),
    ("a=length:furlongs", "unit must be"),
    ("a=keywords:", "keywords needs a list of words"),
    ("a=classifier:model-without-label", "write classifier:MODEL:LABEL"),
    ("a=no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
])
def test_bad_reward_specs(text, error):
    with pytest.raises((ValueError, ImportError), match=error):
        reward_specs.parse_reward(text)


# --- help -------------------------------------------------------------------------------------------


def test_top_level_help_lists_every_subcommand(capsys):
    assert run("--help") == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.SUBCOMMANDS)


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_help_of_every_subcommand_mentions_every_flag(name, capsys):
    with pytest.raises(SystemExit) as exit:
        run(name, "--help")
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for action in cli.load(name).make_parser()._actions:
        for flag in action.option_strings or [action.metavar or action.dest]:
            assert flag in out, flag


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_boolean_flags_read_as_a_person_types_them(name):
    """A switch is --x/--no-x: never a generated --no-no-x, and a --no-x given alone turns x off."""
    parser = cli.load(name).make_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert not any(flag.startswith("--no-no-") for flag in flags), flags
    for action in parser._actions:
        negative = [flag for flag in action.option_strings if flag.startswith("--no-")]
        if negative:
            assert "--" + negative[0][len("--no-"):] in flags, action.option_strings
            parsed = argparse.Namespace()
            action(parser, parsed, [], negative[0])  # what argparse does when it meets the flag alone
            assert getattr(parsed, action.dest) is False


@pytest.mark.parametrize("name", MINE)
def test_every_flag_has_help_text(name):
    for action in cli.load(name).make_parser()._actions:
        assert action.help and len(action.help) > 10 and "(undocumented)" not in action.help, action.dest


def test_sample_defaults_are_sample_bases():
    import inspect

    from valuemix.heads.sampling import sample_base

    defaults = {n: p.default for n, p in inspect.signature(sample_base).parameters.items() if p.default is not p.empty}
    args = commands.SampleArgs(base="b", prompts="p", out="o")
    assert {n: getattr(args, n) for n in defaults if hasattr(args, n)} == {n: defaults[n] for n in defaults
                                                                            if hasattr(args, n)}


def test_train_has_a_flag_for_every_train_config_field():
    dests = {a.dest for a in commands.make_train_parser()._actions}
    assert {f for f in TrainConfig.__dataclass_fields__} <= dests
    assert {"--checkpoint-dir", "--resume", "--max-steps"} <= {
        s for a in commands.make_train_parser()._actions for s in a.option_strings}


def test_score_help_lists_the_reward_specs(capsys):
    with pytest.raises(SystemExit):
        run("score", "--help")
    out = capsys.readouterr().out
    assert all(kind in out for kind in reward_specs.BUILT_INS) and "module:function" in out

