"""`valuemix eval`: reward vs KL of value mixing over a coefficient sweep, against Best-of-N.

    valuemix eval --out runs/eval                              # the offline demo world
    valuemix eval --base BASE --backbone BACKBONE --heads runs/heads/short --prompts prompts.txt \\
                  --reward short=brevity --betas 0 2 4 --out runs/eval

Writes report.json (every setting's mean rewards, KL and cost; Best-of-N curves; a summary per head)
and PNG plots: reward vs KL per head (VAS and Best-of-N), and the Pareto front of a two-head grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from valuemix.commands import Subcommand, read_prompts
from valuemix.compose.evaluate import EvalConfig, evaluate
from valuemix.compose.report import record_in_heads, report_text, write_report
from valuemix.heads.loading import load_base
from valuemix.options import make_parser, parse


@dataclass
class EvalArgs:
    """Settings of `valuemix eval` besides the sweep's own (see EvalConfig)."""

    out: str = field(metadata={"metavar": "DIR", "help": "folder for report.json and the PNG plots"})
    base: str = field(default="", metadata={
        "help": "the base model (a folder or a Hub id); leave empty for the offline demo world"})
    backbone: str = field(default="", metadata={"help": "the value backbone (a folder or a Hub id); if not given: the base"})
    heads: list[str] = field(default_factory=list, metadata={
        "help": "head folders or Hub ids to load onto the backbone; with the demo: which of its heads to sweep "
                "(names, e.g. cheerful unlearn; default all five)"})
    prompts: str = field(default="", metadata={
        "help": "prompts file (.txt, .jsonl or .json); if not given, with the demo: its held-out prompts"})
    reward: list[str] = field(default_factory=list, metadata={"help": (
        "NAME=SPEC rewards (see `valuemix score --help`); a head is compared with Best-of-N on the reward"
        " of its own name; if not given, with the demo: its five rewards"
    )})
    n_prompts: int = field(default=0, metadata={"help": "evaluate on the first N prompts only (0: all)"})
    record_in_heads: bool = field(default=False, metadata={"help": (
        "write each head's measured sweep and working β range into its head_config.json and model card "
        "(heads loaded from local folders, the demo's own included; not Hub ids)"
    )})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def make_eval_parser():
    return make_parser("valuemix eval", __doc__, EvalArgs, EvalConfig)


def eval_main(argv=None) -> dict:
    """Run the evaluation, write report.json and the plots; returns the report."""
    args, config = parse(make_eval_parser(), argv, "eval")
    base, tokenizer, bank, prompts, rewards, folders = _world(args)
    if not args.base:  # the demo heads value chat-formatted text
        config = replace(config, chat_template=True)
    if args.n_prompts:
        prompts = prompts[:args.n_prompts]
    heads = [h for h in bank.heads if h in rewards]  # each head against the reward of its name
    if not args.base and args.heads:
        heads = bank.check_heads(args.heads)
    report = evaluate(base, tokenizer, bank, prompts, rewards, config, heads=heads, progress=args.progress)
    print(report_text(report, write_report(report, args.out)))
    if args.record_in_heads:
        print("\n".join(record_in_heads(bank, report, folders)))
    return report


def _world(args):
    """(base, tokenizer, bank, prompts, rewards, {head: local folder}) from the flags, or the demo world."""
    from valuemix.heads.bank import ValueBank

    if not args.base:
        from valuemix.demo import HEADS_DIR, load_demo

        world = load_demo()
        prompts = read_prompts(args.prompts) if args.prompts else world.prompts
        rewards = _rewards(args.reward) if args.reward else world.rewards
        folders = {head: HEADS_DIR / head for head in world.bank.heads}
        return world.base, world.tokenizer, world.bank, prompts, rewards, folders
    if not (args.heads and args.prompts and args.reward):
        raise ValueError("With --base, give --heads, --prompts and at least one --reward NAME=SPEC "
                         "(or leave --base out to evaluate the offline demo world).")
    base, tokenizer = load_base(args.base)
    bank = ValueBank(args.backbone or args.base)
    folders = {}
    for head in args.heads:
        name = bank.load_head(head)
        if Path(head).is_dir():
            folders[name] = Path(head)
    prompts = read_prompts(args.prompts)
    rewards = _rewards(args.reward, tokenizer)
    return base, tokenizer, bank, prompts, rewards, folders


def _rewards(specs, tokenizer=None) -> dict:
    from valuemix.reward_specs import parse_reward

    return {name: fn for name, fn, _ in (parse_reward(s, tokenizer=lambda: tokenizer) for s in specs)}


eval = Subcommand(make_eval_parser, eval_main)  # noqa: A001  (the subcommand's name)
