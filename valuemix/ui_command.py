"""`valuemix ui`: the slider app on any base model, value backbone and heads.

    valuemix ui --base HuggingFaceTB/SmolLM2-135M-Instruct --backbone HuggingFaceTB/SmolLM2-135M-Instruct \\
                --heads runs/heads/short alice/vm-polite --reward short=brevity --chat-template

Serves on http://127.0.0.1:7860 (--host 0.0.0.0 to serve other machines; --share for a public gradio link).
The same app answers HTTP API calls: gradio_client.Client(URL).predict(prompt, weights, max_new_tokens,
seed, api_name="/generate").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from valuemix.commands import DTYPES, Subcommand, _absolute_if_folder
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
    """The models `valuemix ui` steers."""

    base: str = field(metadata={"metavar": "ID_OR_PATH",
        "help": "the base model: a local folder or Hugging Face Hub id"})
    backbone: str = field(metadata={"metavar": "ID_OR_PATH",
        "help": "the value backbone the heads were trained on: a folder or Hub id"})
    heads: list[str] = field(metadata={"metavar": "HEAD", "help": "head folders or Hub repo ids, one slider each"})
    reward: list[str] = field(default_factory=list, metadata={"metavar": "NAME=SPEC",
        "help": "rewards to score every reply with, as NAME=SPEC (e.g. short=brevity)"})
    num_layers: int | None = field(default=None, metadata={
        "help": "use only the backbone's first N decoder layers (as the heads were trained; see their card)"})
    chat_template: bool = field(default=False, metadata={
        "help": "wrap each prompt as a user message with the tokenizer's chat template"})
    examples: str | None = field(default=None, metadata={"metavar": "FILE",
        "help": "a prompts file (.txt, .jsonl, .json) whose prompts are offered as examples"})
    max_new_tokens: int = field(default=64, metadata={
        "help": "the length slider's starting value (requests may ask up to 256)"})
    top_k: int = field(default=20, metadata={"help": "candidates valued per step"})
    device: str = field(default="cpu", metadata={"help": "device to run the models on"})
    dtype: str = field(default="float32", metadata={"choices": DTYPES,
        "help": "dtype of the base model and the backbone"})


def require_gradio():
    """Import gradio, or say how to install it."""
    try:
        import gradio
    except ImportError as err:
        raise ImportError(f"The slider app needs gradio, which is not installed: {UI_INSTALL}") from err
    return gradio


def make_ui_parser():
    from valuemix.reward_specs import SPECS

    return make_parser("valuemix ui", f"{__doc__}\nReward specs (--reward NAME=SPEC ...):\n{SPECS}", UiArgs,
                       ServeArgs)


def serve(world, args: ServeArgs, max_new_tokens: int, top_k: int):
    """Build the app for `world` and serve it until interrupted."""
    from valuemix.ui.app import build_app, launch

    app = build_app(world, concurrency_limit=args.concurrency, max_new_tokens=max_new_tokens, top_k=top_k)
    print(f"valuemix: serving the slider app on http://{args.host}:{args.port} (Ctrl+C to stop)")
    return launch(app, host=args.host, port=args.port, share=args.share)


def ui_main(argv=None):
    """Load the base, the backbone and the heads, then serve the slider app."""
    import torch

    from valuemix.commands import read_prompts
    from valuemix.heads.loading import load_base
    from valuemix.heads.bank import ValueBank
    from valuemix.reward_specs import parse_reward
    from valuemix.ui.logic import AppParts

    args, serving = parse(make_ui_parser(), argv, "ui")
    require_gradio()  # before loading any model
    examples = read_prompts(args.examples) if args.examples else []
    base, tokenizer = load_base(_absolute_if_folder(args.base), args.device, args.dtype)
    bank = ValueBank(_absolute_if_folder(args.backbone), dtype=getattr(torch, args.dtype), device=args.device,
                     num_layers=args.num_layers)
    bank.load_head([_absolute_if_folder(h) for h in args.heads])
    rewards = {}
    for text in args.reward:
        name, fn, _ = parse_reward(text, tokenizer=lambda: tokenizer, device=args.device)
        rewards[name] = fn
    parts = AppParts(base, tokenizer, bank, rewards, examples=examples, chat_template=args.chat_template,
                     top_k=args.top_k)
    return serve(parts, serving, args.max_new_tokens, args.top_k)


ui = Subcommand(make_ui_parser, ui_main)
