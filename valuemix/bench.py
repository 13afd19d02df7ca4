"""Decoding benchmark: plain sampling vs the reference VAS decoder vs valuemix with 1, 2 and 4 heads,
at the full top-k and with adaptive candidate sets (--top-p), in valuemix's loop and in `model.generate`.

    python -m valuemix.bench                      # SmolLM2-135M-shaped random models, batch 1
    python -m valuemix.bench --demo               # the demo world: SmolLM2-135M-Instruct and its heads
    python -m valuemix.bench --batch 1 4 --repeats 5 --markdown bench_out/bench.md

Everything runs in one process on the same models (float32, CPU by default). By default they are
randomly initialised: a base `LlamaForCausalLM` and a value backbone of the same shape (or shallower:
--backbone-layers), a word-level tokenizer with exactly --vocab tokens, and random prompts of
--prompt-tokens tokens. With --demo they are the demo world's (`valuemix.demo.load_demo`), its heads
and its held-out prompts in the chat template. EOS (and, on random models, every special token) is
masked out of the base logits, so every run generates exactly --new-tokens tokens per row.
Random models spread their probability thinly, so adaptive sets stay near the full top-k there;
the demo world shows what a real instruction model's confidence saves.

--cross-tokenizer (on by default) also times one head through the cross-tokenizer path
(`compose.cross_tokenizer`) on the same models: the base's tokenizer is given to the mixer with one
added token, so its fingerprint differs from the backbone's and every candidate is valued as text
retokenized by the backbone (the added token never occurs, so the text and its tokens are the same).

Reported per configuration: ms per generated token (median over --repeats runs after --warmup runs,
the configurations interleaved round by round), from the wall time of the whole call (tokenisation,
checks, prefill and decoding) divided by --new-tokens; the decoding loop alone is reported beside it
(for `model.generate`, the `generate` call). Adaptive rows also report the mean candidate set size.
Then the ratios reference / valuemix-1-head (target >= 5x), valuemix-4-heads / valuemix-1-head
(target <= 3x) and valuemix-1-head / plain; head training throughput (states per second of
`train_head`); and the bytes one head adds (its saved files, or its parameters).
Results go to stdout as Markdown, to --out as JSON (written atomically), and to --markdown if given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

from valuemix.heads.atomic import atomic_write_text
from valuemix.options import make_parser as make_options_parser
from valuemix.options import parse
from valuemix.tiny import build_model

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3


@dataclass
class BenchConfig:
    """Settings of one benchmark run (each is a flag of `python -m valuemix.bench`)."""

    layers: int = field(default=30, metadata={"help": "base model layers"})
    hidden: int = field(default=576, metadata={"help": "hidden size of the base and the backbone"})
    intermediate: int = field(default=1536, metadata={"help": "MLP size"})
    attention_heads: int = field(default=9, metadata={"help": "attention heads"})
    kv_heads: int = field(default=3, metadata={"help": "key/value heads (grouped-query attention)"})
    vocab: int = field(default=49152, metadata={"help": "vocabulary size"})
    backbone_layers: int | None = field(default=None, metadata={
        "help": "value backbone layers (None: the same as layers)"})
    top_k: int = field(default=20, metadata={"help": "candidates valued per step"})
    top_p: list[float] = field(default_factory=lambda: [0.8, 0.9], metadata={
        "help": "adaptive candidate sets timed with one head: the nucleus inside the top-k (none: skip)"})
    demo: bool = field(default=False, metadata={
        "help": "time the demo world (SmolLM2-135M-Instruct, its 12-layer backbone and heads) instead of random "
                "models; the shape flags are then ignored"})
    lora_layers: int = field(default=4, metadata={
        "help": "also time --heads shared-trunk heads with LoRA on this many top backbone layers (0: skip)"})
    cross_tokenizer: bool = field(default=True, metadata={
        "help": "also time one head through the cross-tokenizer path (candidates valued as retokenized text)"})
    hf_generate: bool = field(default=True, metadata={
        "help": "also time every configuration through transformers' model.generate(logits_processor=[mixer])"})
    new_tokens: int = field(default=32, metadata={"help": "tokens generated per run"})
    prompt_tokens: int = field(default=32, metadata={"help": "prompt length in tokens"})
    batch: list[int] = field(default_factory=lambda: [1], metadata={"help": "batch sizes to time"})
    heads: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "head counts to time valuemix with"})
    beta: float = field(default=1.0, metadata={"help": "coefficient of every head"})
    repeats: int = field(default=3, metadata={"help": "timed runs per configuration (the median is reported)"})
    warmup: int = field(default=1, metadata={"help": "untimed runs first"})
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads"})
    seed: int = field(default=0, metadata={"help": "random seed of the models and prompts"})
    reference: bool = field(default=True, metadata={"help": "also time the slow reference VAS decoding"})
    train: bool = field(default=True, metadata={"help": "also measure head training throughput"})
    train_prompts: int = field(default=4, metadata={"help": "prompts sampled for the training measurement"})
    train_per_prompt: int = field(default=2, metadata={"help": "samples per prompt for it"})
    train_prompt_tokens: int = field(default=16, metadata={"help": "their prompt length"})
    train_new_tokens: int = field(default=16, metadata={"help": "their completion length"})
    train_repeats: int = field(default=2, metadata={"help": "timed training runs (median)"})
    out: str = field(default="bench_out/bench.json", metadata={"help": "JSON results file"})
    markdown: str | None = field(default=None, metadata={"help": "also write the Markdown table to this file"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


# ------------------------------------------------------------------ models and data
def build_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer with exactly `vocab_size` tokens: 4 specials, then 'w4', 'w5', ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab must be larger than {len(SPECIAL_TOKENS)}, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.chat_template = ("{% for m in messages %}<s> {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<s>{% endif %}")
    return tokenizer


def build_models(cfg: BenchConfig):
    """(base, backbone): random Llama causal LMs of the configured shape (`valuemix.tiny.build_model`), float32."""
    shape = dict(intermediate_size=cfg.intermediate, num_attention_heads=cfg.attention_heads,
                 num_key_value_heads=cfg.kv_heads, tie_word_embeddings=True, max_position_embeddings=2048,
                 rope_theta=100000.0)
    base = build_model("llama", cfg.vocab, seed=cfg.seed, hidden=cfg.hidden, layers=cfg.layers, **shape)
    backbone = build_model("llama", cfg.vocab, seed=cfg.seed + 1, hidden=cfg.hidden,
                           layers=cfg.backbone_layers or cfg.layers, **shape)
    return base, backbone


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[str]:
    """`n` prompts of exactly `length` random non-special tokens each."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, (n, length), generator=generator)
    return [" ".join(f"w{i}" for i in row) for row in ids.tolist()]


def randomise_head(bank, name: str, seed: int, lora_scale: float = 0.02, value_scale: float | None = None) -> None:
    """Small random LoRA B matrices and value layer, so that the head's values are non-zero and differ per token."""
    generator = torch.Generator().manual_seed(seed)
    value_scale = bank.hidden_size ** -0.5 if value_scale is None else value_scale
    with torch.no_grad():
        for pname, param in bank.model.named_parameters():
            if f".lora_B.{name}." in pname:
                param.copy_(torch.randn(param.shape, generator=generator) * lora_scale)
        layer = bank.value_layers[name]
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * value_scale)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)


def make_bank(backbone, tokenizer, n_heads: int, seed: int):
    """A ValueBank on (a copy of) `backbone` with `n_heads` random heads h0, h1, ..."""
    from valuemix.heads.bank import ValueBank

    bank = ValueBank(backbone, tokenizer=tokenizer)
    for i in range(n_heads):
        bank.add_head(f"h{i}")
        randomise_head(bank, f"h{i}", seed=seed + 100 * i)
    return bank


# ------------------------------------------------------------------ measurements
def training_throughput(bank, samples, reward: str, repeats: int = 2, epochs: int = 1, seed: int = 0) -> dict:
    """States per second of `valuemix.heads.training.train_head` on `samples` (one warm-up run, then `repeats`).

    states = completion tokens × epochs. Each run trains a fresh head, removed afterwards.
    """
    from valuemix.heads.training import TrainConfig, train_head

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in dict(epochs=epochs, progress=False, seed=seed).items() if k in known}
    states = sum(len(c) for c in samples["completion_ids"]) * epochs
    seconds = []
    for run in range(1 + repeats):
        name = f"bench_train_{run}"
        bank.add_head(name)
        try:
            start = time.perf_counter()
            train_head(bank, name, samples, reward=reward, config=TrainConfig(**kwargs))
            elapsed = time.perf_counter() - start
        finally:
            bank.remove_head(name)
        if run:  # run 0 is the warm-up
            seconds.append(elapsed)
    median = statistics.median(seconds)
    return dict(states=states, samples=len(samples), epochs=epochs, seconds=seconds, median_seconds=median,
                states_per_second=states / median)


def head_bytes(bank, name: str) -> dict:
    """Bytes one head adds: the size of its saved adapter + value layer safetensors (bank.save_head) when
    that works, else the bytes of its parameters. Both numbers are given when available."""
    params = list(bank.head_parameters(name).values())
    out = dict(head=name, parameters=sum(p.numel() for p in params),
               parameter_bytes=sum(p.numel() * p.element_size() for p in params))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / name
            bank.save_head(name, directory)
            files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
        weight_files = {k: v for k, v in files.items() if k.endswith(".safetensors")}
        if not weight_files:
            raise FileNotFoundError(f"save_head wrote no .safetensors files ({sorted(files)})")
        out.update(method="save_head (safetensors on disk)", bytes=sum(weight_files.values()),
                   files=files, directory_bytes=sum(files.values()))
    except Exception as err:  # save_head not written yet, or failing: fall back to parameter bytes
        out.update(method="parameter bytes of bank.head_parameters (save_head unavailable)",
                   bytes=out["parameter_bytes"], save_error=f"{type(err).__name__}: {err}")
    return out


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other processes on the machine skew timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    import peft
    import transformers

    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                python=platform.python_version(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)


@dataclass
class BenchWorld:
    """What one run decodes with: base, tokenizer, a bank whose first `heads` (full depth) and `trunk_heads`
    (shared trunk) are timed, prompts by batch size, the processor that masks EOS (and specials), whether prompts
    go through the chat template, and in words."""

    base: object
    tokenizer: object
    bank: object
    heads: list[str]
    trunk_heads: list[str]
    prompts: dict[int, list[str]]
    ban: object
    chat_template: bool
    description: str


def random_world(cfg: BenchConfig) -> BenchWorld:
    """Random SmolLM2-shaped models (see `build_models`), with max(--heads) random heads h0, h1, ..."""
    tokenizer = build_tokenizer(cfg.vocab)
    base, backbone = build_models(cfg)
    bank = make_bank(backbone, tokenizer, max(cfg.heads), seed=cfg.seed)
    heads = bank.heads
    trunk_heads = add_trunk_heads(bank, cfg)
    prompts = {b: random_prompts(b, cfg.prompt_tokens, cfg.vocab, cfg.seed + b) for b in cfg.batch}
    ban = SuppressTokensLogitsProcessor(list(range(len(SPECIAL_TOKENS))))  # no EOS: every run is full length
    return BenchWorld(base, tokenizer, bank, heads, trunk_heads, prompts, ban, False,
                      f"random Llama, {cfg.layers} layers (backbone {cfg.backbone_layers or cfg.layers}), hidden "
                      f"{cfg.hidden}, intermediate {cfg.intermediate}, vocab {cfg.vocab}, float32; "
                      f"{cfg.prompt_tokens} random prompt tokens")


def demo_world(cfg: BenchConfig) -> BenchWorld:
    """The demo world: SmolLM2-135M-Instruct, its value backbone and shipped heads, the held-out prompts."""
    from valuemix.demo import BACKBONE_LAYERS, load_demo
    from valuemix.heads.tokens import eos_ids

    world = load_demo()
    heads = ["cheerful", "concise", "unlearn", "helpful", "harmless"]
    if max(cfg.heads) > len(heads):
        raise ValueError(f"--demo has {len(heads)} heads; --heads asks for {max(cfg.heads)}.")
    prompts = {b: [world.prompts[i % len(world.prompts)] for i in range(b)] for b in cfg.batch}
    ban = SuppressTokensLogitsProcessor(eos_ids(world.base, world.tokenizer))
    trunk_heads = add_trunk_heads(world.bank, cfg)  # random: their speed, not their values, is measured
    return BenchWorld(world.base, world.tokenizer, world.bank, heads, trunk_heads, prompts, ban, True,
                      f"demo world: SmolLM2-135M-Instruct (30 layers), its {BACKBONE_LAYERS}-layer value backbone and "
                      f"shipped heads ({', '.join(heads[:max(cfg.heads)])}), held-out prompts in the chat template")


def add_trunk_heads(bank, cfg: BenchConfig) -> list[str]:
    """max(--heads) random shared-trunk heads t0, t1, ... with LoRA on the top --lora-layers layers (0: none)."""
    if not cfg.lora_layers:
        return []
    names = [f"t{i}" for i in range(max(cfg.heads))]
    for i, name in enumerate(names):
        bank.add_head(name, layers=cfg.lora_layers)
        randomise_head(bank, name, seed=cfg.seed + 1000 + 100 * i)
    return names


class SetSizes:
    """A logits processor that only records the mixer's candidate set sizes (their mean is reported)."""

    def __init__(self, mixer):
        self.mixer, self.sizes = mixer, []

    def __call__(self, input_ids, scores):
        self.sizes += self.mixer.candidate_sets(scores)[2].sum(-1).tolist()
        return scores


def other_fingerprint(tokenizer):
    """A copy of `tokenizer` with one added token: it tokenizes every text as before, but its fingerprint differs."""
    import copy

    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<valuemix-bench-unused>"])
    return other


def hf_generate(world: BenchWorld, prompts, processors, new_tokens: int, seed: int, tokenizer=None):
    """`model.generate` with `processors` (sampling, no other warper); a `Generation` whose seconds time the call."""
    from valuemix.compose.generate import Generation
    from valuemix.heads.tokens import encode_prompts

    tokenizer = tokenizer or world.tokenizer
    texts, input_ids, attention_mask = encode_prompts(tokenizer, prompts, world.chat_template)
    device = world.base.device
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = world.base.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                              logits_processor=LogitsProcessorList(processors), do_sample=True, top_k=None,
                              top_p=None, temperature=1.0, max_new_tokens=new_tokens,
                              pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    return Generation(texts, [], out[:, input_ids.shape[1]:].tolist(), [], seconds)


def _decode_cases(cfg: BenchConfig, world: BenchWorld):
    """(row name, batch, n_heads, function(prompts) -> (Generation, wall seconds), `SetSizes` or None) per
    configuration: each in valuemix's loop, then (--hf-generate) in `model.generate`."""
    from valuemix.compose.generate import generate
    from valuemix.compose.mixer import Mixer
    from valuemix.compose.reference import reference_generate

    def timed(fn):
        def run(prompts):
            start = time.perf_counter()
            result = fn(prompts)
            return result, time.perf_counter() - start
        return run

    def both(name, batch, n_heads, mixer, tokenizer=world.tokenizer):
        sizes = SetSizes(mixer) if mixer is not None and mixer.top_p < 1 else None
        own = [world.ban] + ([sizes] if sizes else [])
        cases.append((name, batch, n_heads, timed(lambda p: generate(
            world.base, tokenizer, p, mixer, max_new_tokens=cfg.new_tokens, seed=cfg.seed,
            logits_processors=own, chat_template=world.chat_template)), sizes))
        if cfg.hf_generate:
            processors = [world.ban] + ([mixer] if mixer is not None else [])
            cases.append((f"{name} (model.generate)", batch, n_heads, timed(lambda p: hf_generate(
                world, p, processors, cfg.new_tokens, cfg.seed, tokenizer)), None))

    def mixer(n_heads, top_p=1.0, heads=world.heads, tokenizer=world.tokenizer):
        weights = {h: cfg.beta for h in heads[:n_heads]}
        return Mixer(world.bank, weights, top_k=cfg.top_k, top_p=top_p, tokenizer=tokenizer)

    other = other_fingerprint(world.tokenizer) if cfg.cross_tokenizer else None
    if other is not None:  # in memory only: the timed head is taken as made for that tokenizer
        from valuemix.heads.fingerprint import tokenizer_fingerprint

        world.bank.configs[world.heads[0]].base_tokenizer = tokenizer_fingerprint(other)

    cases = []
    for batch in cfg.batch:
        both("plain", batch, 0, None)
        if cfg.reference:
            cases.append(("reference VAS (1 head)", batch, 1, timed(lambda p: reference_generate(
                world.base, world.tokenizer, world.bank, world.heads[0], cfg.beta, p, top_k=cfg.top_k,
                max_new_tokens=cfg.new_tokens, seed=cfg.seed, logits_processors=[world.ban])), None))
        for n_heads in sorted(set(cfg.heads)):
            both(f"valuemix {n_heads} head{'s' if n_heads > 1 else ''}", batch, n_heads, mixer(n_heads))
        for n_heads in sorted(set(cfg.heads)) if world.trunk_heads else ():
            both(f"valuemix {n_heads} shared-trunk head{'s' if n_heads > 1 else ''}", batch, n_heads,
                 mixer(n_heads, heads=world.trunk_heads))
        for top_p in cfg.top_p:
            both(f"valuemix 1 head, top-p {top_p:g}", batch, 1, mixer(1, top_p))
        if other is not None:
            both("valuemix 1 head, cross-tokenizer path", batch, 1, mixer(1, tokenizer=other), other)
    return cases


def run(cfg: BenchConfig) -> dict:
    """Run the benchmark; returns the results (also what goes into the JSON file)."""
    torch.set_num_threads(cfg.threads)
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.new_tokens < 1 or cfg.prompt_tokens < 1 or min(cfg.batch) < 1:
        raise ValueError("need --repeats >= 1, --warmup >= 0, --new-tokens >= 1, --prompt-tokens >= 1, --batch >= 1")
    if not cfg.heads or min(cfg.heads) < 1:
        raise ValueError(f"--heads must list positive head counts, got {cfg.heads}")
    started = time.time()
    load_before = load_average()
    world = demo_world(cfg) if cfg.demo else random_world(cfg)
    cases = _decode_cases(cfg, world)
    train_steps = 1 if cfg.train and not cfg.demo else 0
    bar = tqdm(total=(cfg.warmup + cfg.repeats) * len(cases) + train_steps + 1, desc="bench",
               disable=not cfg.progress, file=sys.stderr)

    # Decoding: the configurations are interleaved round by round, so that load drifts hit them alike.
    timings = {i: dict(wall=[], loop=[]) for i in range(len(cases))}
    for round_ in range(cfg.warmup + cfg.repeats):
        for i, (name, batch, _, fn, _) in enumerate(cases):
            bar.set_postfix_str(f"{name} b{batch} {'warm-up' if round_ < cfg.warmup else 'round'} {round_ + 1}")
            result, wall = fn(world.prompts[batch])
            lengths = {len(t) for t in result.token_ids}
            if lengths != {cfg.new_tokens}:
                raise RuntimeError(f"{name}: generated {sorted(lengths)} tokens per row, expected {cfg.new_tokens}")
            if round_ >= cfg.warmup:
                timings[i]["wall"].append(wall)
                timings[i]["loop"].append(result.seconds)
            bar.update(1)

    rows = []
    for i, (name, batch, n_heads, _, sizes) in enumerate(cases):
        wall, loop = timings[i]["wall"], timings[i]["loop"]
        ms = [1000 * s / cfg.new_tokens for s in wall]
        rows.append(dict(name=name, batch=batch, heads=n_heads, ms_per_token=statistics.median(ms),
                         min_ms_per_token=min(ms), ms_per_token_runs=ms,
                         loop_ms_per_token=1000 * statistics.median(loop) / cfg.new_tokens,
                         call_overhead_ms=1000 * statistics.median(w - s for w, s in zip(wall, loop)),
                         tokens_per_second=batch * cfg.new_tokens / statistics.median(wall),
                         mean_set_size=statistics.mean(sizes.sizes) if sizes else None))
    ratios = []
    wanted = [("reference VAS (1 head)", "valuemix 1 head", ">= 5", lambda x: x >= 5),
              ("valuemix 4 heads", "valuemix 1 head", "<= 3", lambda x: x <= 3),
              ("valuemix 1 head", "plain", None, None)]
    n = max(cfg.heads)
    if cfg.lora_layers and n > 1:
        wanted += [(f"valuemix {n} shared-trunk heads", "valuemix 1 head", "<= 1.4", lambda x: x <= 1.4),
                   (f"valuemix {n} shared-trunk heads", "valuemix 1 shared-trunk head", None, None)]
    adaptive_target = ("<= 1.6", lambda x: x <= 1.6) if cfg.demo else (None, None)
    wanted += [(f"valuemix 1 head, top-p {p:g}", "plain", *adaptive_target) for p in cfg.top_p]
    wanted += [("valuemix 1 head, cross-tokenizer path", "valuemix 1 head", None, None)]
    if cfg.hf_generate:
        wanted += [(f"{name} (model.generate)", name, None, None)
                   for name in ("valuemix 1 head", *(f"valuemix 1 head, top-p {p:g}" for p in cfg.top_p))]
    for batch in cfg.batch:
        median = {r["name"]: r["ms_per_token"] for r in rows if r["batch"] == batch}
        best = {r["name"]: r["min_ms_per_token"] for r in rows if r["batch"] == batch}
        for top, bottom, target, check in wanted:
            if top in median and bottom in median:
                value = median[top] / median[bottom]
                ratios.append(dict(name=f"{top} / {bottom}", batch=batch, value=value,
                                   value_from_min=best[top] / best[bottom], target=target,
                                   met=None if check is None else bool(check(value))))
        pairs = [(name, name.removesuffix(" (model.generate)")) for name in median
                 if name.startswith("valuemix") and name.endswith(" (model.generate)")]
        if pairs:  # one row pair is within this VM's run-to-run noise (~10 %); their geometric mean is steadier
            value, from_min = (statistics.geometric_mean(m[a] / m[b] for a, b in pairs) for m in (median, best))
            ratios.append(dict(name=f"model.generate / own loop, geometric mean of the {len(pairs)} valuemix rows",
                               batch=batch, value=value, value_from_min=from_min, target="<= 1.05 (1, within noise)",
                               met=bool(value <= 1.05)))

    training = None
    if cfg.train and not cfg.demo:  # random prompts need the random word-level vocabulary
        bar.set_postfix_str("head training")
        training = _training_section(cfg, world.base, world.tokenizer, world.bank)
        bar.update(1)
    bar.set_postfix_str("head size")
    size = head_bytes(world.bank, world.heads[0])
    bar.update(1)
    bar.close()

    return dict(
        config=dataclasses.asdict(cfg), machine=machine_info(), rows=rows, ratios=ratios, training=training,
        head_size=size, notes=dict(
            ms_per_token="wall time of the whole call / new tokens, median over repeats (prefill included)",
            loop_ms_per_token="decoding loop only (Generation.seconds / new tokens), median",
            call_overhead_ms="per call, outside the decoding loop (tokenisation, checks): wall - loop, median",
            tree_masks_ok=world.bank.tree_masks_ok, world=world.description,
            mean_set_size="adaptive rows: mean size of the mixer's candidate sets over every step and row",
            load_before=load_before, load_after=load_average(),
        ),
        started=started, seconds=time.time() - started,
    )


def even_words(prompts: list[str], completions: list[str]) -> list[float]:
    """A trivial rule reward: the share of completion words with an even token number ('w6' yes, 'w7' no)."""
    words = [c.split() for c in completions]
    return [sum(int(w[1:]) % 2 == 0 for w in ws if w[1:].isdigit()) / max(1, len(ws)) for ws in words]


def _training_section(cfg: BenchConfig, base, tokenizer, bank) -> dict:
    """Samples from the bench base (few short prompts), a rule reward, then `training_throughput`."""
    from valuemix.heads.sampling import sample_base, score

    prompts = random_prompts(cfg.train_prompts, cfg.train_prompt_tokens, cfg.vocab, cfg.seed + 1000)
    try:
        samples = sample_base(base, tokenizer, prompts, n_per_prompt=cfg.train_per_prompt,
                              max_new_tokens=cfg.train_new_tokens, seed=cfg.seed, progress=False)
        samples = score(samples, {"even": even_words}, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft: "Adapter bench_train_0 was active which is now deleted"
            return dict(status="ok", **training_throughput(bank, samples, "even", repeats=cfg.train_repeats,
                                                           seed=cfg.seed))
    except ImportError as err:
        return dict(status=f"unavailable: {err}")
    except Exception as err:  # the trainer is young; a failure must not lose the decoding numbers
        return dict(status=f"failed: {type(err).__name__}: {err}")


# ------------------------------------------------------------------ output
def format_markdown(results: dict) -> str:
    cfg, m = results["config"], results["machine"]
    lines = [
        "## valuemix decoding benchmark",
        "",
        f"Models: {results['notes']['world']}. "
        f"top-k {cfg['top_k']}, {cfg['new_tokens']} new tokens, "
        f"shared-trunk heads: LoRA on the top {cfg['lora_layers']} layers, "
        f"median of {cfg['repeats']} runs after {cfg['warmup']} warm-up.",
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}.",
        "",
        f"Load average before/after: {results['notes']['load_before']} / {results['notes']['load_after']}.",
        "",
        "| configuration | batch | ms/token (median) | min | loop ms/token | tokens/s | mean set | runs (ms/token) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        runs = ", ".join(f"{x:.1f}" for x in r["ms_per_token_runs"])
        size = "" if r["mean_set_size"] is None else f"{r['mean_set_size']:.1f}"
        lines.append(f"| {r['name']} | {r['batch']} | {r['ms_per_token']:.1f} | {r['min_ms_per_token']:.1f} | "
                     f"{r['loop_ms_per_token']:.1f} | {r['tokens_per_second']:.1f} | {size} | {runs} |")
    lines += ["", "| ratio (ms/token) | batch | median-based | min-based | target | met (median) |",
              "|---|---:|---:|---:|---|---|"]
    for r in results["ratios"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['name']} | {r['batch']} | {r['value']:.2f}× | {r['value_from_min']:.2f}× | "
                     f"{r['target'] or ''} | {met} |")
    lines.append("")
    t = results["training"]
    if t is None:
        lines.append("Head training throughput: skipped.")
    elif t["status"] == "ok":
        lines.append(f"Head training throughput: {t['states_per_second']:.1f} states/s "
                     f"({t['states']} states = {t['samples']} samples × {t['epochs']} epoch, "
                     f"median {t['median_seconds']:.2f} s).")
    else:
        lines.append(f"Head training throughput: {t['status']}")
    s = results["head_size"]
    lines.append(f"Bytes a head adds: {s['bytes']:,} ({s['bytes'] / 2**20:.2f} MiB; {s['parameters']:,} parameters; "
                 f"{s['method']}).")
    overhead = ", ".join(f"{r['name']} (b{r['batch']}) {r['call_overhead_ms']:.1f}" for r in results["rows"])
    lines.append(f"Per-call overhead outside the decoding loop, ms: {overhead}.")
    return "\n".join(lines) + "\n"


def make_parser():
    return make_options_parser("python -m valuemix.bench", __doc__.split("\n\n")[0], BenchConfig)


def main(argv=None) -> dict:
    (cfg,) = parse(make_parser(), argv, "bench")
    results = run(cfg)
    table = format_markdown(results)
    print(table)
    atomic_write_text(cfg.out, json.dumps(results, indent=2, default=str) + "\n")
    if cfg.markdown:
        atomic_write_text(cfg.markdown, table)
    return results


if __name__ == "__main__":
    main()
