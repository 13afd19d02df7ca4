"""Bad input gets a clear error naming the problem and the fix, on every interface that accepts it, and loses nothing.

One parametrized test per interface: Python (vm.*), the command line (valuemix generate / train / score) and the
slider app's HTTP API (which keeps serving after each refusal). The cases are the same list on each.
"""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import build_model, build_tokenizer, randomize_heads

import valuemix as vm
from valuemix.cli import main as cli

LONG_PROMPT = "word " * 4000  # 20,000 characters: far past the tiny models' 256-token context
CONTEXT = "do not fit in the base model's context of 256 tokens"
NAN_REWARD = '''def reward(prompts, completions):
    return [float("nan")] * len(completions)
'''


def nan_reward(prompts, completions):
    return [float("nan")] * len(completions)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base/backbone folder, a head trained for it, damaged copies of the head, another backbone, samples."""
    root = tmp_path_factory.mktemp("bad-inputs")
    tokenizer = build_tokenizer()
    for name, seed in (("backbone", 0), ("other", 5)):
        build_model("llama", len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    bank = vm.ValueBank(str(root / "backbone"))
    bank.add_head("helpful")
    randomize_heads(bank)
    bank.save_head("helpful", root / "helpful")
    shutil.copytree(root / "helpful", root / "truncated")
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.copytree(root / "helpful", root / "not_json")
    (root / "not_json" / "head_config.json").write_text('{"name": "helpful", ')
    base = build_model("llama", len(tokenizer), seed=0)
    samples = vm.sample_base(base, tokenizer, ["hello world"], n_per_prompt=2, max_new_tokens=4, progress=False)
    samples.save_to_disk(root / "samples")
    (root / "nan_reward.py").write_text(NAN_REWARD)
    return {"root": root, "tokenizer": tokenizer, "base": base, "bank": bank, "samples": samples}


# case id -> (what is wrong, the message that must name it and the fix)
CASES = {
    "empty prompt": "Prompt 0 is empty ('')",
    "prompt past the context": CONTEXT,
    "unknown head": "Unknown head 'polite'",
    "nan coefficient": "Coefficient for head 'helpful' must be a finite number, got nan",
    "inf coefficient": "Coefficient for head 'helpful' must be a finite number, got inf",
    "-inf coefficient": "Coefficient for head 'helpful' must be a finite number, got -inf",
    "huge coefficient": "Coefficient 1000000000.0 for head 'helpful' is outside its range [-10.0, 10.0]",
    "zero max_new_tokens": "max_new_tokens must be at least 1, got 0",
    "negative max_new_tokens": "max_new_tokens must be at least 1, got -3",
    "huge max_new_tokens": "max_new_tokens is 1000000000: 1000000006 tokens " + CONTEXT,
    "text seed": "seed must be a whole number, got 'abc'",
    "fractional seed": "seed must be a whole number, got 1.5",
    "truncated adapter weights": "adapter_model.safetensors in folder {root}/truncated is corrupt or not a "
                                 "safetensors file",
    "head_config.json not JSON": "head_config.json in folder {root}/not_json is not valid JSON",
    "head on another backbone": "Head 'helpful' was trained for backbone {root}/backbone but the bank holds "
                                "{root}/other (their weights differ); load it with ValueBank('{root}/backbone')",
    "missing samples folder": "No samples at {root}/nowhere",
    "reward returns NaN": "reward 'r' returned nan for row 0",
}


def expected(case, world):
    return CASES[case].format(root=world["root"])


# --- Python ------------------------------------------------------------------------------------------------


def python_call(case, world):
    """The Python call that makes `case`'s mistake."""
    root, tokenizer, base, bank = world["root"], world["tokenizer"], world["base"], world["bank"]
    mixer = vm.Mixer(bank, {"helpful": 1.0}, tokenizer=tokenizer)
    weights = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 1e9}

    def run(prompt="hello world", max_new_tokens=4, seed=0):
        return vm.generate(base, tokenizer, [prompt], mixer, max_new_tokens=max_new_tokens, seed=seed)

    calls = {
        "empty prompt": lambda: run(prompt=""),
        "prompt past the context": lambda: run(prompt=LONG_PROMPT),
        "unknown head": lambda: vm.Mixer(bank, {"polite": 1.0}),
        "zero max_new_tokens": lambda: run(max_new_tokens=0),
        "negative max_new_tokens": lambda: run(max_new_tokens=-3),
        "huge max_new_tokens": lambda: run(max_new_tokens=10**9),
        "text seed": lambda: run(seed="abc"),
        "fractional seed": lambda: run(seed=1.5),
        "truncated adapter weights": lambda: bank.load_head(root / "truncated", name="copy"),
        "head_config.json not JSON": lambda: bank.load_head(root / "not_json", name="copy"),
        "head on another backbone": lambda: vm.ValueBank(str(root / "other")).load_head(root / "helpful"),
        "missing samples folder": lambda: vm.train_head(bank, "helpful", root / "nowhere", reward="r"),
        "reward returns NaN": lambda: vm.score(world["samples"], {"r": nan_reward}, progress=False),
    }
    for word, beta in weights.items():
        calls[f"{word} coefficient"] = lambda beta=beta: mixer.set_weights({"helpful": beta})
    return calls[case]


@pytest.mark.parametrize("case", CASES)
def test_python(world, case):
    bank = world["bank"]
    before = {k: v.clone() for k, v in bank.head_state("helpful").items()}
    with pytest.raises((ValueError, KeyError, FileNotFoundError)) as info:
        python_call(case, world)()
    message = info.value.args[0] if isinstance(info.value, KeyError) else str(info.value)
    assert expected(case, world) in message
    assert bank.heads == ["helpful"] and all(v.equal(before[k]) for k, v in bank.head_state("helpful").items())


# --- the command line --------------------------------------------------------------------------------------


def generate_args(root, prompt="hello world", mix="helpful=1", tokens="4", seed="0", heads="helpful",
                  backbone="backbone"):
    """`valuemix generate` on the tiny world, with one setting changed."""
    return ["generate", "--base", str(root / "backbone"), "--backbone", str(root / backbone), "--heads",
            str(root / heads), "--prompt", prompt, "--mix", mix, "--max-new-tokens", tokens, "--seed", seed]


def cli_args(case, world):
    """`valuemix ...` arguments that make `case`'s mistake."""
    root = world["root"]

    def run(**setting):
        return generate_args(root, **setting)

    return {
        "empty prompt": run(prompt=""),
        "prompt past the context": run(prompt=LONG_PROMPT),
        "unknown head": run(mix="polite=1"),
        "nan coefficient": run(mix="helpful=nan"),
        "inf coefficient": run(mix="helpful=inf"),
        "-inf coefficient": run(mix="helpful=-inf"),
        "huge coefficient": run(mix="helpful=1e9"),
        "zero max_new_tokens": run(tokens="0"),
        "negative max_new_tokens": run(tokens="-3"),
        "huge max_new_tokens": run(tokens="1000000000"),
        "text seed": run(seed="abc"),
        "fractional seed": run(seed="1.5"),
        "truncated adapter weights": run(heads="truncated"),
        "head_config.json not JSON": run(heads="not_json"),
        "head on another backbone": run(backbone="other"),
        "missing samples folder": ["train", "--backbone", str(root / "backbone"), "--samples", str(root / "nowhere"),
                                   "--reward", "r", "--out", str(root / "unused")],
        "reward returns NaN": ["score", "--samples", str(root / "samples"), "--reward",
                               f"r={root / 'nan_reward.py'}:reward", "--no-progress"],
    }[case]


# argparse refuses what is not an int before valuemix sees it; its message names the flag and the value
CLI_MESSAGES = {"text seed": "argument --seed: invalid int value: 'abc'",
                "fractional seed": "argument --seed: invalid int value: '1.5'"}


@pytest.mark.parametrize("case", CASES)
def test_command_line(world, case, capsys):
    samples = world["root"] / "samples"
    before = {name: (samples / name).read_bytes() for name in os.listdir(samples)}
    try:
        code = cli(cli_args(case, world))
    except SystemExit as exit:  # a usage error from argparse
        code = exit.code
    err = capsys.readouterr().err
    assert code in (1, 2)
    assert CLI_MESSAGES.get(case, expected(case, world)) in " ".join(err.split()), err
    assert "Traceback" not in err
    assert {name: (samples / name).read_bytes() for name in os.listdir(samples)} == before  # nothing lost


def test_the_command_line_generates_with_a_mix(world, capsys):
    """The same command with good input prints each reply and its KL (the refusals above are not the only path)."""
    assert cli(generate_args(world["root"], mix="helpful=2") + ["--json"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and '"prompt": "hello world"' in lines[0] and '"kl": ' in lines[0]


# --- the slider app's HTTP API -----------------------------------------------------------------------------

# The API takes a prompt, a mix (a JSON object string: JSON has no NaN, so NaN and ±Infinity are spelled as
# Python's json module reads them), max_new_tokens and a seed. Heads and samples are not part of a request.
API_CASES = {
    "empty prompt": ("", "{}", 4, 0, "The prompt is empty"),
    "prompt past the context": (LONG_PROMPT, "{}", 4, 0, "The prompt is 20000 characters long; the limit is 4000: "
                                                         "shorten it."),
    "unknown head": ("hello", '{"polite": 1}', 4, 0, "Unknown head 'polite'. Heads in this app: helpful."),
    "nan coefficient": ("hello", '{"helpful": NaN}', 4, 0, CASES["nan coefficient"]),
    "inf coefficient": ("hello", '{"helpful": Infinity}', 4, 0, CASES["inf coefficient"]),
    "-inf coefficient": ("hello", '{"helpful": -Infinity}', 4, 0, CASES["-inf coefficient"]),
    "huge coefficient": ("hello", '{"helpful": 1e9}', 4, 0, "Coefficient 1000000000.0 for head 'helpful' is "
                                                             "outside its range [-10.0, 10.0]"),
    "zero max_new_tokens": ("hello", "{}", 0, 0, "max_new_tokens must be between 1 and 256, got 0."),
    "negative max_new_tokens": ("hello", "{}", -3, 0, "max_new_tokens must be between 1 and 256, got -3."),
    "huge max_new_tokens": ("hello", "{}", 10**9, 0, "max_new_tokens must be between 1 and 256, got 1000000000."),
    "text seed": ("hello", "{}", 4, "abc", "seed must be a whole number, got 'abc'."),
    "fractional seed": ("hello", "{}", 4, 1.5, "seed must be a whole number, got 1.5."),
    "reward returns NaN": ("a NaN reward, please", "{}", 4, 0, "Reward 'flaky' returned nan; a reward must return "
                                                                "one finite number per reply"),
}


def flaky_reward(prompts, completions):
    return [float("nan") if "NaN reward" in p else 1.0 for p in prompts]


@pytest.fixture(scope="module")
def app_url(world):
    from conftest import serving

    from valuemix.ui.logic import AppParts

    parts = AppParts(world["base"], world["tokenizer"], world["bank"], {"flaky": flaky_reward})
    with serving(parts) as url:
        yield url


@pytest.mark.parametrize("case", API_CASES)
def test_http_api(app_url, case):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False)
    prompt, weights, tokens, seed, message = API_CASES[case]
    with pytest.raises(AppError) as info:
        client.predict(prompt, weights, tokens, seed, api_name="/generate")
    assert message in str(info.value)
    text, result = client.predict("hello", '{"helpful": 1}', 3, 0, api_name="/generate")  # still serving
    assert result["weights"] == {"helpful": 1.0} and isinstance(text, str)
