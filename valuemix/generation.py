"""`valuemix generate`: replies of a base model steered by a mix of value heads, from the command line.

    valuemix generate --base HuggingFaceTB/SmolLM2-135M-Instruct --backbone HuggingFaceTB/SmolLM2-135M-Instruct \\
                      --heads runs/heads/concise --mix concise=2 --prompt "Tell me about cats" --chat-template

Prints every reply with its KL from the base (nats); `--mix` left out gives the base model's top-k replies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from valuemix.commands import ModelArgs, Subcommand, load_models
from valuemix.compose.mixer import DEFAULT_TOP_P
from valuemix.options import make_parser, parse


@dataclass
class GenerateArgs:
    """What `valuemix generate` replies to, and how (the models are `ModelArgs`)."""

    mix: list[str] = field(default_factory=list, metadata={"metavar": "NAME=BETA",
        "help": "a head's coefficient, as NAME=BETA (e.g. concise=2); heads left out get β = 0"})
    prompt: list[str] = field(default_factory=list, metadata={"metavar": "TEXT", "help": "a prompt to reply to"})
    prompts: str | None = field(default=None, metadata={"metavar": "FILE",
        "help": "a prompts file (.txt, .jsonl, .json), replied to after the --prompt ones"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest reply, in tokens"})
    top_k: int = field(default=20, metadata={"help": "the most candidates valued per step"})
    top_p: float = field(default=DEFAULT_TOP_P, metadata={
        "help": "value only the smallest leading set of the top-k holding this much base probability (1: all k)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    seed: int = field(default=0, metadata={"help": "sampling seed; the same seed gives the same replies"})
    json: bool = field(default=False, metadata={"help": "print one JSON object per reply instead of text"})


def make_generate_parser():
    return make_parser("valuemix generate", __doc__, ModelArgs, GenerateArgs)


def parse_mix(items: list[str]) -> dict[str, float]:
    """{head: β} from NAME=BETA strings; a ValueError naming the item that is not of that form."""
    weights = {}
    for item in items:
        name, _, beta = item.partition("=")
        try:
            weights[name.strip()] = float(beta)
        except ValueError:
            name = ""
        if not name.strip():
            raise ValueError(f"--mix {item!r} is not NAME=BETA with a number for BETA: write e.g. --mix concise=2.")
    return weights


def generate_main(argv=None) -> list[dict]:
    """Load the base, the backbone and the heads; print the mixed reply to every prompt."""
    from valuemix.commands import read_prompts
    from valuemix.compose.generate import generate
    from valuemix.compose.mixer import Mixer

    models, args = parse(make_generate_parser(), argv, "generate")
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise ValueError("No prompts: give --prompt TEXT (several: --prompt A B) or --prompts FILE.")
    weights = parse_mix(args.mix)
    base, tokenizer, bank = load_models(models)
    mixer = Mixer(bank, weights, top_k=args.top_k, top_p=args.top_p, tokenizer=tokenizer)
    out = generate(base, tokenizer, prompts, mixer, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, seed=args.seed, chat_template=models.chat_template)
    rows = [{"prompt": p, "reply": t, "kl": kl} for p, t, kl in zip(prompts, out.texts, out.kl)]
    for row in rows:
        print(json.dumps(row) if args.json else f"### {row['prompt']}\n{row['reply']}\n(KL from the base "
                                                   f"{row['kl']:.3f} nats)\n")
    return rows


generate = Subcommand(make_generate_parser, generate_main)
