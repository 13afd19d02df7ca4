"""Training that scales: data-parallel sampling and training under `accelerate launch`, gradient
accumulation and gradient checkpointing all fit the same head as one plain process."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import make_bank
from safetensors.torch import load_file

from valuemix.cli import main as cli
from valuemix.heads.compat import is_checkpointing
from valuemix.heads.training import TrainConfig, train_head

SCRIPT = Path(__file__).with_name("dp_train_script.py")
HEAD_FILES = ("adapter_model.safetensors", "value_head.safetensors")


def accelerate_launch(processes: int, hostfile: Path, *program: str, precision: str = "no") -> None:
    """`accelerate launch --cpu` of a script or `-m module`; several CPU processes go through mpirun (Open MPI)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no"]
    if processes > 1:
        hostfile.write_text(f"localhost slots={processes}\n")
        command += ["--mpirun_hostfile", str(hostfile), "--main_process_port", str(free_port())]
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + list(program), env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def launch(out: Path, processes: int, accumulation: int = 1, precision: str = "no") -> dict:
    """The sample-and-train script under `accelerate launch`; returns its metrics."""
    accelerate_launch(processes, out.with_suffix(".hosts"), str(SCRIPT), str(out), str(accumulation),
                      precision=precision)
    return json.loads((out / "metrics.json").read_text())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


needs_mpirun = pytest.mark.skipif(
    shutil.which("mpirun") is None,
    reason="accelerate launches several CPU processes through mpirun: apt-get install openmpi-bin")


@needs_mpirun
def test_two_processes_sample_and_train_the_same_head_as_one(tmp_path):
    one = launch(tmp_path / "one", processes=1)
    two = launch(tmp_path / "two", processes=2, accumulation=2)
    assert (one["processes"], two["processes"]) == (1, 2)
    samples = [datasets.load_from_disk(str(tmp_path / run / "samples")) for run in ("one", "two")]
    assert samples[0].to_list() == samples[1].to_list()  # each batch has its own seed, wherever it is drawn
    assert one["steps"] == two["steps"] == 8
    assert two["loss_history"] == pytest.approx(one["loss_history"], rel=1e-5)
    for name in HEAD_FILES:
        a, b = (load_file(str(tmp_path / run / "head" / name)) for run in ("one", "two"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
        assert any(a[k].abs().sum() > 0 for k in a)  # the head did train


def test_bf16_mixed_precision_from_the_launcher_trains_close_to_float32(tmp_path):
    full = launch(tmp_path / "fp32", processes=1)
    mixed = launch(tmp_path / "bf16", processes=1, precision="bf16")
    assert mixed["loss_history"] != full["loss_history"]  # bf16 autocast did run...
    assert mixed["loss_history"] == pytest.approx(full["loss_history"], rel=0.05, abs=0.01)  # ...and fits the same
    value = load_file(str(tmp_path / "bf16" / "head" / "value_head.safetensors"))
    assert value["weight"].dtype == torch.float32  # the head's weights stay float32


@needs_mpirun
def test_valuemix_train_under_two_processes_saves_the_head_of_one(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe cat sat\na happy day\n")
    samples = tmp_path / "samples"
    assert cli(["sample", "--base", tiny_folder, "--prompts", str(prompts), "--n-per-prompt", "2",
                "--max-new-tokens", "6", "--out", str(samples), "--no-progress"]) == 0
    assert cli(["score", "--samples", str(samples), "--reward", "short=brevity", "--no-progress"]) == 0
    train = ["train", "--backbone", tiny_folder, "--samples", str(samples), "--reward", "short", "--batch-size", "4",
             "--epochs", "2", "--no-progress"]
    assert cli(train + ["--out", str(tmp_path / "one")]) == 0
    accelerate_launch(2, tmp_path / "hosts", "-m", "valuemix.cli", *train, "--out", str(tmp_path / "two"))
    for name in HEAD_FILES:
        a, b = (load_file(str(tmp_path / run / name)) for run in ("one", "two"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("one", "two"))) == ["one", "two"]


def trained(tokenizer, vowel_samples, **settings):
    bank = make_bank(tokenizer, heads=("vowels",))
    metrics = train_head(bank, "vowels", vowel_samples, reward="vowels",
                         config=TrainConfig(epochs=2, batch_size=6, progress=False, **settings))
    return bank, metrics


@pytest.mark.parametrize("accumulation", [2, 3, 6])
def test_gradient_accumulation_fits_the_same_head(tokenizer, vowel_samples, accumulation):
    plain, plain_metrics = trained(tokenizer, vowel_samples)
    split, split_metrics = trained(tokenizer, vowel_samples, gradient_accumulation_steps=accumulation)
    assert split_metrics["loss_history"] == pytest.approx(plain_metrics["loss_history"], rel=1e-5)
    for key, value in plain.head_state("vowels").items():
        torch.testing.assert_close(split.head_state("vowels")[key], value, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_recomputes_the_layers_and_fits_the_same_head(tokenizer, vowel_samples):
    calls, banks = {}, {}
    for checkpointing in (False, True):
        bank = make_bank(tokenizer, heads=("vowels",))  # the same seed: the same starting head
        mlp, layer_calls = bank.decoder.layers[0].mlp, []
        forward = mlp.forward  # counted on the instance: forward hooks do not fire when checkpointing recomputes
        mlp.forward = lambda *args, **kwargs: layer_calls.append(1) or forward(*args, **kwargs)
        train_head(bank, "vowels", vowel_samples, reward="vowels", config=TrainConfig(
            batch_size=6, max_steps=2, gradient_checkpointing=checkpointing, progress=False))
        del mlp.forward
        calls[checkpointing], banks[checkpointing] = len(layer_calls), bank
    assert calls[True] == 2 * calls[False] > 0  # every layer runs again in the backward pass
    for key, value in banks[False].head_state("vowels").items():
        torch.testing.assert_close(banks[True].head_state("vowels")[key], value, rtol=1e-5, atol=1e-7)
    assert not is_checkpointing(banks[True].decoder) and not banks[True].decoder.layers[0].training


def test_mixed_precision_can_be_chosen_after_sampling_in_the_same_process(tmp_path):
    """Sampling must not pin accelerate's per-process mixed precision before training picks it."""
    program = """
import torch, valuemix as vm
from valuemix.heads.training import TrainConfig
from valuemix.tiny import build_model, build_tokenizer
tok = build_tokenizer()
samples = vm.sample_base(build_model("llama", len(tok)), tok, ["hello world"], n_per_prompt=4, max_new_tokens=6,
                         progress=False)
samples = vm.score(samples, {"n": lambda p, c: [float(len(x)) for x in c]}, progress=False)
bank = vm.ValueBank(build_model("llama", len(tok)), tok)
bank.add_head("n", seed=0)
metrics = vm.train_head(bank, "n", samples, "n", TrainConfig(mixed_precision="bf16", epochs=1, progress=False))
print("steps", metrics["steps"])
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps 1" in done.stdout
