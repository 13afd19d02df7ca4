"""TD(λ) value regression for one head, from base samples scored with a reward.

For a sample (prompt x, completion y_1..y_T) with reward r, the states are the prefixes
s_t = x·y_1..y_t, t = 1..T. The head regresses V(s_t) onto the λ-return (γ = 1, no reward
before the end):
    G_T = r,        G_t = (1 − λ) V(s_{t+1}) + λ G_{t+1}        (t < T)
λ = 1 gives Monte Carlo (G_t = r); λ = 0 gives one-step TD. Loss: ½ · MSE over completion states.
Only the head's LoRA matrices and value layer are trained; the backbone and other heads stay bit-identical.

Data-parallel with accelerate: under `accelerate launch` each process takes its share of every batch,
the head's gradients are summed across processes (they are a few MB), and every process takes the
same optimiser step, so 1 or N processes, with or without gradient accumulation, fit the same head.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from valuemix.heads.atomic import atomic_directory
from valuemix.heads.bank import ADAPTER, VALUE, ValueBank
from valuemix.heads.compat import disable_checkpointing, enable_checkpointing
from valuemix.heads.fingerprint import describe_tokenizer, tokenizer_fingerprint
from valuemix.heads.loading import explain_out_of_memory
from valuemix.heads.sampling import load_samples
from valuemix.heads.tokens import retokenize_samples

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of `train_head`."""

    lam: float = field(default=0.95, metadata={
        "help": "TD(λ) λ in [0, 1]; 1.0 is Monte Carlo regression onto the final reward"})
    epochs: int = field(default=2, metadata={"help": "passes over the samples"})
    batch_size: int = field(default=8, metadata={
        "help": "samples per optimisation step, over all processes and accumulation steps together"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": (
        "split each process's share of a batch into this many forward/backward passes before the step "
        "(less activation memory, the same result)"
    )})
    gradient_checkpointing: bool = field(default=False, metadata={"help": (
        "recompute the backbone's activations in the backward pass (less memory, about a third more "
        "compute, the same result)"
    )})
    mixed_precision: str | None = field(default=None, metadata={"help": (
        "\"no\", \"bf16\" or \"fp16\" autocast for the backbone's forward; None keeps what `accelerate "
        "launch`/`accelerate config` set (default \"no\"). The head's weights stay float32. accelerate "
        "fixes it for the whole process at the first training"
    )})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate of the LoRA matrices"})
    value_learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the scalar value layer"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables it)"})
    max_length: int = field(default=1024, metadata={
        "help": "longest prompt + completion in tokens; longer ones lose prompt tokens on the left"})
    normalize_rewards: bool = field(default=True, metadata={
        "help": "train on (r − mean) / std so that β means the same for every head"})
    seed: int = field(default=0, metadata={
        "help": "seed of the sample order (and, in `valuemix train`, of the adapter's initialisation)"})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop after this many optimisation steps in total (None: run every epoch)"})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "folder for checkpoints (head, optimiser and progress, safetensors + JSON)"})
    checkpoint_every: int = field(default=100, metadata={
        "help": "steps between checkpoints (one is also written at the end)"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the checkpoint in `checkpoint_dir` if there is one"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})

    def __post_init__(self):
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1] (got {self.lam}); 0.95 is the usual choice, 1.0 is Monte Carlo.")
        if self.epochs < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError(f"epochs, batch_size and gradient_accumulation_steps must be at least 1 (got "
                             f"{self.epochs}, {self.batch_size}, {self.gradient_accumulation_steps}).")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16' (got {self.mixed_precision!r}).")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir: the folder the interrupted run checkpointed to.")


def td_targets(values: torch.Tensor, rewards: torch.Tensor, states: torch.Tensor, lam: float) -> torch.Tensor:
    """λ-returns (batch, seq) for every position; meaningful where `states` is True.

    values: (batch, seq) V of the prefix ending at each position (detached).
    rewards: (batch,) the completion's reward, the target of its last state.
    states: (batch, seq) bool, True on completion states (contiguous, the last one is the full sequence).
    Vectorised: with x_j = V_j on states and x_j = r after the last state,
        G_t = Σ_{j>t} (1 − λ) λ^(j−t−1) x_j + λ^(T−1−t) r,
    which equals the recursion G_t = (1 − λ) V_{t+1} + λ G_{t+1}, G_last = r.
    """
    seq = values.shape[1]
    x = torch.where(states, values, rewards[:, None].to(values.dtype))
    t = torch.arange(seq, device=values.device, dtype=values.dtype)
    gap = t[None, :] - t[:, None] - 1  # gap[t, j] = j − t − 1
    weights = torch.where(gap >= 0, (1 - lam) * lam ** gap.clamp_min(0), torch.zeros_like(gap))
    tail = lam ** (seq - 1 - t)
    return x @ weights.T + rewards[:, None].to(values.dtype) * tail[None, :]


def train_head(bank: ValueBank, name: str, samples, reward: str, config: TrainConfig | None = None,
               description: str | None = None, accelerator: Accelerator | None = None,
               base_tokenizer=None) -> dict:
    """Fit head `name` to the values of reward column `reward` of `samples` by TD(λ) regression.

    samples: a `datasets.Dataset` from `sample_base` + `score` (prompt_ids, completion_ids, reward column), or
        the folder it was saved to.
    accelerator: the `accelerate.Accelerator` to train with (default: one made from `config`); under
    `accelerate launch` every process calls train_head on the same samples and only the main process
    should save the head. Returns the training metrics (also stored in the head's config): loss per
    logged step, final loss, steps, seconds and states per second.
    base_tokenizer: the tokenizer of the base that made the samples, when it is not the backbone's: the samples
    are then retokenized as text (`heads.tokens.retokenize_samples`) and the head is recorded as made for that
    base (`HeadConfig.base_tokenizer`), for `Mixer(bank, weights, tokenizer=base_tokenizer)`.
    """
    config = config or TrainConfig()
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    bank.check_heads([name])
    samples = load_samples(samples)
    rewards, prompt_ids, completion_ids, base_fingerprint = _checked_data(bank, samples, reward, base_tokenizer)
    mean, std = _reward_stats(rewards) if config.normalize_rewards else (0.0, 1.0)
    targets = (rewards - mean) / std
    data = TrainingData(prompt_ids, completion_ids, targets)

    named = bank.head_parameters(name)
    params = list(named.values())
    lora = [p for key, p in named.items() if key.startswith(ADAPTER)]
    value = [p for key, p in named.items() if key.startswith(VALUE)]
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(
        [{"params": lora, "lr": config.learning_rate}, {"params": value, "lr": config.value_learning_rate}],
        weight_decay=config.weight_decay))  # prepared: fp16 loss scaling
    steps_per_epoch = math.ceil(len(targets) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    state = {"step": 0, "history": [], "states": 0, "seconds": 0.0}
    if config.resume:
        state = _restore(bank, name, optimizer, Path(config.checkpoint_dir), len(targets), state)

    start = time.perf_counter() - state["seconds"]
    bar = tqdm(total=total, initial=state["step"], desc=f"train {name}",
               disable=not (config.progress and accelerator.is_main_process))
    with bank.lock, _checkpointing(bank, config.gradient_checkpointing):
        bank.model.set_adapter(name)
        for p in params:
            p.requires_grad_(True)
        try:
            for epoch in range(config.epochs):
                order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(config.seed + epoch))
                for batch_index in range(steps_per_epoch):
                    step = epoch * steps_per_epoch + batch_index
                    if step < state["step"]:
                        continue  # done before the checkpoint we resumed from
                    if step >= total:
                        break
                    rows = order[batch_index * config.batch_size:(batch_index + 1) * config.batch_size].tolist()
                    with explain_out_of_memory(f"Training head '{name}' (batch_size {config.batch_size})"):
                        loss, n_states = _step(bank, name, optimizer, config, accelerator, data, rows)
                    state["step"] = step + 1
                    state["states"] += n_states
                    state["history"].append({"step": step + 1, "epoch": epoch, "loss": loss})
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if config.checkpoint_dir and state["step"] % config.checkpoint_every == 0:
                        state["seconds"] = time.perf_counter() - start
                        _checkpoint(bank, name, optimizer, Path(config.checkpoint_dir), len(targets), state,
                                    accelerator)
        finally:
            for p in params:
                p.requires_grad_(False)
            bar.close()
    state["seconds"] = time.perf_counter() - start
    if config.checkpoint_dir:
        _checkpoint(bank, name, optimizer, Path(config.checkpoint_dir), len(targets), state, accelerator)

    last = state["history"][-steps_per_epoch:]
    metrics = {"final_loss": sum(h["loss"] for h in last) / max(len(last), 1), "steps": state["step"],
               "seconds": round(state["seconds"], 2), "states_per_second": state["states"] / max(state["seconds"], 1e-9),
               "loss_history": [round(h["loss"], 6) for h in state["history"]]}
    head = bank.configs[name]
    head.reward, head.lam, head.data_size = description or reward, config.lam, len(targets)
    head.reward_mean, head.reward_std = mean, std
    head.base_model = samples[0]["base_model"] if "base_model" in samples.column_names else head.base_model
    head.base_tokenizer = base_fingerprint
    head.metrics = {k: v for k, v in metrics.items() if k != "loss_history"}
    logger.info("trained head %s: %s", name, head.metrics)
    return metrics


class TrainingData(NamedTuple):
    """A head's training rows: token ids without padding, and the standardised reward of each row."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    targets: torch.Tensor


def _step(bank, name: str, optimizer, config: TrainConfig, accelerator: Accelerator, data: TrainingData,
          rows: list[int]):
    """One optimisation step on the batch `rows` of `data`; returns (loss, number of states), over all processes.

    Each process takes every n-th row and splits them into `gradient_accumulation_steps` passes; the
    loss is ½ · the sum of squared errors / the batch's state count, so the summed gradients are
    exactly those of the whole batch in one pass.
    """
    mine = rows[accelerator.process_index::accelerator.num_processes]
    size = max(1, math.ceil(len(mine) / config.gradient_accumulation_steps))
    parts = [mine[i:i + size] for i in range(0, len(mine), size)]
    pad_id = bank.tokenizer.pad_token_id or 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    batches = [_collate([data.prompt_ids[i] for i in part], [data.completion_ids[i] for i in part], config.max_length,
                        pad_id) for part in parts]
    n_states = accelerator.reduce(torch.tensor(sum(int(b[2].sum()) for b in batches), device=bank.device), "sum")
    optimizer.zero_grad(set_to_none=True)
    squared_sum = torch.zeros((), device=bank.device)
    for part, batch in zip(parts, batches):
        input_ids, attention_mask, states = (t.to(bank.device) for t in batch)
        with accelerator.autocast():
            hidden = bank.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            values = bank.project(hidden[None], [name])[0].float()  # (batch, seq)
        returns = td_targets(values.detach(), data.targets[part].to(values), states, config.lam)
        squared = 0.5 * ((values - returns) ** 2 * states).sum()
        accelerator.backward(squared / n_states)
        squared_sum += squared.detach()
    _sum_gradients(params, accelerator)
    if config.max_grad_norm:
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    return (accelerator.reduce(squared_sum, "sum") / n_states).item(), int(n_states)


def _sum_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Sum the head's gradients over processes in one all-reduce (a process without rows adds zeros)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), "sum")
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


@contextmanager
def _checkpointing(bank: ValueBank, enabled: bool):
    """transformers' gradient checkpointing on the backbone's layers, for the duration of training.

    The backbone stays in eval mode (no dropout, as at decode time): only the layers' own `training`
    flag, which transformers checks before checkpointing, is set.
    """
    if not enabled:
        yield
        return
    layers = [m for m in bank.decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"The backbone {bank.backbone_id} does not support gradient checkpointing in transformers; "
                         "train without gradient_checkpointing.")
    enable_checkpointing(bank.decoder)
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
        disable_checkpointing(bank.decoder)


def _collate(prompts: list[list[int]], completions: list[list[int]], max_length: int, pad_id: int):
    """Right-padded (input_ids, attention_mask, completion-state mask), each (batch, seq)."""
    sequences, n_prompt = [], []
    for p, c in zip(prompts, completions):
        seq = (p + c)[-max_length:]
        sequences.append(seq)
        n_prompt.append(max(len(seq) - len(c), 0))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    states = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (seq, n) in enumerate(zip(sequences, n_prompt)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention_mask[i, :len(seq)] = 1
        states[i, n:len(seq)] = True
    return input_ids, attention_mask, states


def _checked_data(bank: ValueBank, samples, reward: str, base_tokenizer=None):
    """(rewards (n,), prompt ids, completion ids, the base tokenizer's fingerprint or None) after checking the
    samples fit the bank; samples of another tokenizer are retokenized with `base_tokenizer`."""
    missing = {"prompt_ids", "completion_ids", reward} - set(samples.column_names)
    if missing:
        raise ValueError(f"The samples have no column(s) {sorted(missing)}: make them with vm.sample_base and add "
                         f"the reward with vm.score(samples, {{'{reward}': reward_fn}}).")
    if len(samples) == 0:
        raise ValueError("The samples are empty: sample some completions with vm.sample_base first.")
    theirs = samples[0]["tokenizer_fingerprint"] if "tokenizer_fingerprint" in samples.column_names else None
    if base_tokenizer is not None and theirs is not None and tokenizer_fingerprint(base_tokenizer) != theirs:
        raise ValueError(f"base_tokenizer is {describe_tokenizer(base_tokenizer)} but the samples were tokenized with "
                         f"tokenizer {theirs}: pass the tokenizer of the base model that made the samples.")
    theirs = theirs or (tokenizer_fingerprint(base_tokenizer) if base_tokenizer is not None else bank.fingerprint)
    if theirs != bank.fingerprint and base_tokenizer is None:
        raise ValueError(f"The samples were tokenized with tokenizer {theirs} but the bank's backbone "
                         f"{bank.backbone_id} uses {bank.fingerprint}: pass train_head(..., base_tokenizer=<the base "
                         "model's tokenizer>) to retokenize them as text (a cross-tokenizer head), or sample with a "
                         "base model that shares the backbone's tokenizer.")
    rewards = torch.tensor(samples[reward], dtype=torch.float32)
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"Reward '{reward}' is not a finite number at row {int(bad[0])}: fix the reward function "
                         "and re-run vm.score.")
    prompt_ids, completion_ids = samples["prompt_ids"], samples["completion_ids"]
    cross = theirs != bank.fingerprint
    if cross:
        prompt_ids, completion_ids = retokenize_samples(bank.tokenizer, base_tokenizer, prompt_ids, completion_ids)
        seen = [i for i, c in enumerate(completion_ids) if c]
        if len(seen) < len(completion_ids):  # e.g. characters the backbone's tokenizer drops: nothing to value
            if not seen:
                raise ValueError(f"No sample's completion has a token in the backbone's tokenizer "
                                 f"({bank.fingerprint}): its vocabulary does not cover the base's text; pick a backbone "
                                 "whose tokenizer does (byte-level tokenizers cover any text).")
            logger.warning("%d of %d completions have no token in the backbone's tokenizer (it drops their text): "
                           "trained on the other %d.", len(completion_ids) - len(seen), len(completion_ids), len(seen))
            rewards = rewards[seen]
            prompt_ids, completion_ids = [prompt_ids[i] for i in seen], [completion_ids[i] for i in seen]
    empty = [i for i, c in enumerate(completion_ids) if not c]
    if empty:
        raise ValueError(f"Sample {empty[0]} has an empty completion: a value head needs completion tokens.")
    return rewards, prompt_ids, completion_ids, theirs if cross else None


def _reward_stats(rewards: torch.Tensor) -> tuple[float, float]:
    mean, std = rewards.mean().item(), rewards.std(unbiased=False).item()
    if std < 1e-8:
        logger.warning("Every sample has the same reward (%s): the head cannot learn anything from it.", mean)
        std = 1.0
    return mean, std


# ------------------------------------------------------------------ checkpoints
def _checkpoint(bank, name, optimizer, directory: Path, data_size: int, state: dict, accelerator) -> None:
    """Write head weights, optimiser state and progress atomically (safetensors + JSON, no pickle).

    Every process holds the same head and optimiser; the main process writes, the others wait for it.
    """
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{key}": value for pid, s in opt["state"].items() for key, value in s.items()}
    with atomic_directory(directory) as folder:
        tmp = Path(folder)
        save_file({k: v.contiguous() for k, v in bank.head_state(name).items()}, str(tmp / "head_state.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"head": name, "data_size": data_size, "param_groups": opt["param_groups"], **state}, indent=1))
    accelerator.wait_for_everyone()


def _restore(bank, name, optimizer, directory: Path, data_size: int, fresh: dict) -> dict:
    """Load a checkpoint written by `_checkpoint` into the head and optimiser; returns the progress."""
    state_file = directory / "trainer_state.json"
    if not state_file.exists():
        logger.info("No checkpoint in %s: starting from scratch.", directory)
        return fresh
    saved = json.loads(state_file.read_text())
    if saved["head"] != name or saved["data_size"] != data_size:
        raise ValueError(f"The checkpoint in {directory} is for head '{saved['head']}' on {saved['data_size']} "
                         f"samples, not head '{name}' on {data_size}: use another checkpoint_dir or resume=False.")
    bank.set_head_state(name, load_file(str(directory / "head_state.safetensors")))
    tensors = load_file(str(directory / "optimizer.safetensors"))
    opt_state: dict = {}
    for key, value in tensors.items():
        pid, field = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[field] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": saved["param_groups"]})
    logger.info("Resumed head %s from step %d (%s).", name, saved["step"], directory)
    return {k: saved[k] for k in fresh}
