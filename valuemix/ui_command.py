"""`valuemix ui`: the slider app on any base model, value backbone and heads.

    valuemix ui --base HuggingFaceTB/SmolLM2-135M-Instruct --backbone HuggingFaceTB/SmolLM2-135M-Instruct \\
                --heads runs/heads/short alice/vm-polite --reward short=brevity --chat-template

Serves on http://127.0.0.1:7860 (--host 0.0.0.0 to serve other machines; --share for a public gradio link).
The same app answers HTTP API calls: gradio_client.Client(URL).predict(prompt, weights, max_new_tokens,
seed, api_name="/generate").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from valuemix.commands import DTYPES, Subcommand, _absolute_if_folder
from valuemix.options import add_dataclass_arguments, fill_dataclass, make_parser, parse_args

UI_INSTALL = "pip install 'valuemix[ui]'"


@dataclass
class ServeArgs:
    """Where and how the app is served.

    Attributes:
        host: address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every network interface.
        port: port to serve on.
        share: also open a public *.gradio.live link (off unless asked).
        concurrency: generations run at once; further requests wait in the queue.
        max_new_tokens: the length slider's starting value (requests may ask up to 256).
        top_k: candidates valued per step.
    """

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    concurrency: int = 2
    max_new_tokens: int = 64
    top_k: int = 20


@dataclass
class UiArgs:
    """The models `valuemix ui` steers.

    Attributes:
        base: the base model: a local folder or Hugging Face Hub id.
        backbone: the value backbone the heads were trained on: a folder or Hub id.
        num_layers: use only the backbone's first N decoder layers (as the heads were trained; see their card).
        chat_template: wrap each prompt as a user message with the tokenizer's chat template.
        examples: a prompts file (.txt, .jsonl, .json) whose prompts are offered as examples.
        device: device to run the models on.
        dtype: dtype of the base model and the backbone.
    """

    base: str = field(metadata={"metavar": "ID_OR_PATH"})
    backbone: str = field(metadata={"metavar": "ID_OR_PATH"})
    num_layers: int | None = None
    chat_template: bool = False
    examples: str | None = field(default=None, metadata={"metavar": "FILE"})
    device: str = "cpu"
    dtype: str = field(default="float32", metadata={"choices": DTYPES})


def add_serve_arguments(parser) -> None:
    add_dataclass_arguments(parser, ServeArgs, title="serving")


def require_gradio():
    """Import gradio, or say how to install it."""
    try:
        import gradio
    except ImportError as err:
        raise ImportError(f"The slider app needs gradio, which is not installed: {UI_INSTALL}") from err
    return gradio


def make_ui_parser():
    from valuemix.reward_specs import SPECS

    parser = make_parser("valuemix ui", f"{__doc__}\nReward specs (--reward NAME=SPEC):\n{SPECS}")
    add_dataclass_arguments(parser, UiArgs)
    heads = parser.add_argument("--heads", action="extend", nargs="+", metavar="HEAD", default=None,
                                help="head folders or Hub repo ids, one slider each (required)")
    heads.valuemix_required, heads.valuemix_list_default = True, None
    rewards = parser.add_argument("--reward", action="extend", nargs="+", metavar="NAME=SPEC", default=None,
                                  help="a reward to score every reply with, as NAME=SPEC (e.g. short=brevity); "
                                       "repeat or list several")
    rewards.valuemix_required, rewards.valuemix_list_default = False, []
    add_serve_arguments(parser)
    return parser


def serve(world, args: ServeArgs):
    """Build the app for `world` and serve it until interrupted."""
    from valuemix.ui.app import build_app, launch

    app = build_app(world, concurrency_limit=args.concurrency, max_new_tokens=args.max_new_tokens, top_k=args.top_k)
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

    parsed: argparse.Namespace = parse_args(make_ui_parser(), argv, "ui")
    args, serving = fill_dataclass(UiArgs, parsed), fill_dataclass(ServeArgs, parsed)
    require_gradio()  # before loading any model
    examples = read_prompts(args.examples) if args.examples else []
    base, tokenizer = load_base(_absolute_if_folder(args.base), args.device, args.dtype)
    bank = ValueBank(_absolute_if_folder(args.backbone), dtype=getattr(torch, args.dtype), device=args.device,
                     num_layers=args.num_layers)
    bank.load_head([_absolute_if_folder(h) for h in parsed.heads])
    rewards = {}
    for text in parsed.reward or []:
        name, fn, _ = parse_reward(text, tokenizer=lambda: tokenizer, device=args.device)
        rewards[name] = fn
    parts = AppParts(base, tokenizer, bank, rewards, examples=examples, chat_template=args.chat_template,
                     top_k=serving.top_k)
    return serve(parts, serving)


ui = Subcommand(make_ui_parser, ui_main)
