"""Sample, score and train a head on a tiny llama; run by test_scaling.py under `accelerate launch`.

    accelerate launch --cpu --num_processes 2 dp_train_script.py OUT [ACCUMULATION]

Every process runs the same code; the main process saves the samples, the head and the metrics to OUT.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import valuemix as vm
from valuemix.heads.training import TrainConfig
from valuemix.tiny import build_model, build_tokenizer

PROMPTS = ["hello world", "the cat sat", "a happy day", "one two three", "red green blue", "please write",
           "tell me", "why is"]


def vowel_share(prompts, completions):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def main(out: Path, accumulation: int) -> None:
    state = Accelerator()  # reads the launcher's settings (e.g. --cpu)
    tokenizer = build_tokenizer()
    base = build_model("llama", len(tokenizer), seed=0)
    samples = vm.sample_base(base, tokenizer, PROMPTS, n_per_prompt=3, max_new_tokens=8, batch_size=5, seed=0,
                             progress=False)
    samples = vm.score(samples, {"vowels": vowel_share}, progress=False)
    torch.manual_seed(0)  # the LoRA matrices' initialisation
    bank = vm.ValueBank(base, tokenizer)
    bank.add_head("vowels")
    config = TrainConfig(epochs=2, batch_size=6, gradient_accumulation_steps=accumulation, progress=False)
    metrics = vm.train_head(bank, "vowels", samples, reward="vowels", config=config)
    if state.is_main_process:
        samples.save_to_disk(str(out / "samples"))
        bank.save_head("vowels", out / "head")
        (out / "metrics.json").write_text(json.dumps({**metrics, "processes": state.num_processes}))
    state.wait_for_everyone()
    state.end_training()  # closes the process group, so no process exits while another still uses it


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
