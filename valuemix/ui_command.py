"""`valuemix ui`: the slider app on any base model, value backbone and heads.

    valuemix ui --base HuggingFaceTB/SmolLM2-135M-Instruct --backbone HuggingFaceTB/SmolLM2-135M-Instruct \\
                --heads runs/heads/short alice/vm-polite --reward short=brevity --chat-template

    valuemix ui --server http://127.0.0.1:8000 --base HuggingFaceTB/SmolLM2-135M-Instruct \\
                --heads runs/heads/short alice/vm-polite --chat-template     # replies from `valuemix serve`

    valuemix ui --api-base http://127.0.0.1:8000/v1 --model NAME --base HuggingFaceTB/SmolLM2-135M-Instruct \\
                --backbone HuggingFaceTB/SmolLM2-135M-Instruct --heads runs/heads/short --chat-template
                # a base behind an OpenAI-compatible API (vLLM), steered here (--base: its tokenizer)

Serves on http://127.0.0.1:7860 (--host 0.0.0.0 to serve other machines; --share for a public gradio link).
The same app answers HTTP API calls: gradio_client.Client(URL).predict(prompt, weights, max_new_tokens,
seed, api_name="/generate").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from valuemix.compose.mixer import DEFAULT_TOP_P
from valuemix.commands import ModelArgs, Subcommand, absolute_if_folder, load_models
from valuemix.options import make_parser, parse

UI_INSTALL = "pip install 'valuemix[ui]'"


@dataclass
class ServeArgs:
    """Where and how the app is served."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every network interface"})
    port: int = field(default=7860, metadata={"help": "port to serve on"})
    share: bool = field(default=False, metadata={"help": "also open a public *.gradio.live link (off unless asked)"})
    concurrency: int = field(default=2, metadata={
        "help": "generations run at once; further requests wait in the queue"})


@dataclass
class UiArgs:
    """What the app scores and offers, and its decoding defaults (the models are `ModelArgs`)."""

    reward: list[str] = field(default_factory=list, metadata={"metavar": "NAME=SPEC",
        "help": "rewards to score every reply with, as NAME=SPEC (e.g. short=brevity)"})
    examples: str | None = field(default=None, metadata={"metavar": "FILE",
        "help": "a prompts file (.txt, .jsonl, .json) whose prompts are offered as examples"})
    max_new_tokens: int = field(default=64, metadata={
        "help": "the length slider's starting value (requests may ask up to 256)"})
    top_k: int = field(default=20, metadata={"help": "the most candidates valued per step"})
    top_p: float = field(default=DEFAULT_TOP_P, metadata={
        "help": "value only the smallest leading set of the top-k holding this much base probability (1: all k)"})
    server: str | None = field(default=None, metadata={"metavar": "URL",
        "help": "generate on this `valuemix serve` server (started with the same --heads); the app then loads "
                "only --base's tokenizer and the heads' configs, and needs no --backbone"})
    api_base: str | None = field(default=None, metadata={"metavar": "URL",
        "help": "steer a base behind this OpenAI-compatible completions API (e.g. vLLM's), which gives each next "
                "token's top-k log-probabilities; the heads run here on --backbone, and --base gives only the "
                "base's tokenizer"})
    model: str | None = field(default=None, metadata={"metavar": "NAME",
        "help": "the model name on --api-base (default: the server's only model)"})


def require_gradio():
    """Import gradio, or say how to install it."""
    try:
        import gradio
    except ImportError as err:
        raise ImportError(f"The slider app needs gradio, which is not installed: {UI_INSTALL}") from err
    return gradio


def make_ui_parser():
    from valuemix.reward_specs import SPECS

    return make_parser("valuemix ui", f"{__doc__}\nReward specs (--reward NAME=SPEC ...):\n{SPECS}", ModelArgs,
                       UiArgs, ServeArgs)


def serve(world, args: ServeArgs, max_new_tokens: int, top_k: int, top_p: float):
    """Build the app for `world` and serve it until interrupted."""
    from valuemix.ui.app import build_app, launch

    app = build_app(world, concurrency_limit=args.concurrency, max_new_tokens=max_new_tokens, top_k=top_k,
                    top_p=top_p)
    print(f"valuemix: serving the slider app on http://{args.host}:{args.port} (Ctrl+C to stop)")
    return launch(app, host=args.host, port=args.port, share=args.share)


def ui_main(argv=None):
    """Load the base, the backbone and the heads, then serve the slider app."""
    from valuemix.commands import read_prompts
    from valuemix.reward_specs import parse_reward
    from valuemix.ui.logic import AppParts

    models, args, serving = parse(make_ui_parser(), argv, "ui")
    require_gradio()  # before loading any model
    examples = read_prompts(args.examples) if args.examples else []
    if args.server:
        from transformers import AutoTokenizer

        from valuemix.compose.remote import ServedModel

        base, tokenizer = None, AutoTokenizer.from_pretrained(absolute_if_folder(models.base))
        bank = ServedModel(args.server, [absolute_if_folder(h) for h in models.heads], tokenizer)
    elif args.api_base:
        from transformers import AutoTokenizer

        from valuemix.commands import load_bank
        from valuemix.heads.api import APIBase

        tokenizer = AutoTokenizer.from_pretrained(absolute_if_folder(models.base))
        base, bank = APIBase(args.api_base, args.model, tokenizer), load_bank(models)
    else:
        base, tokenizer, bank = load_models(models)
    rewards = {}
    for text in args.reward:
        name, fn, _ = parse_reward(text, tokenizer=lambda: tokenizer, device=models.device)
        rewards[name] = fn
    parts = AppParts(base, tokenizer, bank, rewards, examples=examples, chat_template=models.chat_template,
                     top_k=args.top_k, top_p=args.top_p)
    return serve(parts, serving, args.max_new_tokens, args.top_k, args.top_p)


ui = Subcommand(make_ui_parser, ui_main)
