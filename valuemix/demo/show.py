"""`valuemix demo`: the offline demo world — SmolLM2-135M-Instruct steered by its five shipped heads.

Starts the slider app on http://127.0.0.1:7860 (needs the `ui` extra: pip install 'valuemix[ui]').
With --no-ui, prints instead, for a few held-out prompts, the base model's reply and the reply under
several mixes, with every reward and the KL from the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from valuemix.commands import Subcommand
from valuemix.compose.mixer import DEFAULT_TOP_P
from valuemix.options import make_parser, parse
from valuemix.ui_command import ServeArgs

MIXES = ({}, {"helpful": 4.0}, {"harmless": 4.0}, {"cheerful": 4.0}, {"concise": 4.0}, {"unlearn": 6.0},
         {"cheerful": -4.0}, {"cheerful": 3.0, "concise": 3.0})


@dataclass
class DemoArgs:
    """Settings of `valuemix demo`."""

    ui: bool = field(default=True, metadata={
        "help": "start the slider app (the default); --no-ui prints a table of replies and rewards instead"})
    prompts: int = field(default=3, metadata={"help": "how many held-out prompts the table shows"})
    max_new_tokens: int = field(default=48, metadata={
        "help": "longest reply, in tokens (in the app: the length slider's starting value)"})
    top_k: int = field(default=20, metadata={"help": "the most candidates valued per step"})
    top_p: float = field(default=DEFAULT_TOP_P, metadata={
        "help": "value only the smallest leading set of the top-k holding this much base probability (1: all k)"})
    seed: int = field(default=0, metadata={
        "help": "sampling seed of the table (the same for every mix, so replies differ only by the mix)"})


def make_demo_parser():
    return make_parser("valuemix demo", __doc__, DemoArgs, ServeArgs)


def demo_main(argv=None) -> list[dict] | None:
    """Load the demo world and serve the slider app on it, or (--no-ui) print the table of mixes."""
    from valuemix.demo import load_demo

    args, serving = parse(make_demo_parser(), argv, "demo")
    if not args.ui:
        return print_table(load_demo(), args)
    from valuemix.ui_command import require_gradio, serve

    try:
        require_gradio()  # before loading the models
    except ImportError as err:
        raise ImportError(f"{err} (or run `valuemix demo --no-ui` for the table of replies).") from err
    serve(load_demo(), serving, args.max_new_tokens, args.top_k, args.top_p)
    return None


def print_table(world, args: DemoArgs) -> list[dict]:
    """Generate every mix of MIXES on the first held-out prompts; print rewards, KL and replies."""
    from valuemix.compose.evaluate import EvalConfig, measure_mix

    prompts = world.prompts[:args.prompts]
    sampling = EvalConfig(samples_per_prompt=1, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, chat_template=True)
    rows = []
    for mix in MIXES:
        measured = measure_mix(world.base, world.tokenizer, world.bank, prompts, mix, world.rewards, sampling)
        rows.append({"mix": mix, "rewards": measured.rewards, "kl": measured.kl, "texts": measured.samples})
    print(render(rows, prompts))
    return rows


def render(rows: list[dict], requests: list[str]) -> str:
    """Mean rewards and KL per mix, then every reply per prompt."""
    names = list(rows[0]["rewards"])
    lines = ["mix".ljust(34) + "".join(n[:9].rjust(10) for n in names) + "KL nats".rjust(9)]
    for row in rows:
        label = ", ".join(f"{h}={b:g}" for h, b in row["mix"].items()) or "base (all β = 0)"
        lines.append(label.ljust(34) + "".join(f"{row['rewards'][n]:10.3f}" for n in names) + f"{row['kl']:9.2f}")
    for i, request in enumerate(requests):
        lines += ["", f"### {request}"]
        for row in rows:
            label = ", ".join(f"{h}={b:g}" for h, b in row["mix"].items()) or "base"
            lines.append(f"[{label}] {' '.join(row['texts'][i].split())}")
    return "\n".join(lines)


demo = Subcommand(make_demo_parser, demo_main)
