"""`valuemix eval`: reward vs KL of value mixing over a coefficient sweep, against Best-of-N.

    valuemix eval --out runs/eval                              # the offline demo world
    valuemix eval --base BASE --backbone BACKBONE --heads runs/heads/short --prompts prompts.txt \\
                  --reward short=brevity --betas 0 --betas 2 --betas 4 --out runs/eval

Writes report.json (every setting's mean rewards, KL and cost; Best-of-N curves; a summary per head)
and PNG plots: reward vs KL per head (VAS and Best-of-N), and the Pareto front of a two-head grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from valuemix.commands import Subcommand, read_prompts
from valuemix.compose.evaluate import EvalConfig, evaluate, head_evaluation
from valuemix.compose.plots import plot_report
from valuemix.heads.atomic import atomic_directory
from valuemix.heads.loading import load_base
from valuemix.options import add_dataclass_arguments, make_parser, parse_args


@dataclass
class EvalArgs:
    """Settings of `valuemix eval` besides the sweep's own (see EvalConfig).

    Attributes:
        out: folder for report.json and the PNG plots.
        base: the base model (a folder or a Hub id); leave empty for the offline demo world.
        backbone: the value backbone (a folder or a Hub id); default: the base.
        heads: head folders or Hub ids to load onto the backbone.
        prompts: prompts file (.txt, .jsonl or .json); default with the demo: its held-out prompts.
        reward: NAME=SPEC rewards (see `valuemix score --help`); a head is compared with Best-of-N on the reward of its own name; default with the demo: its five rewards.
        chat_template: wrap each prompt as a user message with the tokenizer's chat template.
        n_prompts: evaluate on the first N prompts only (0: all).
        record_in_heads: write each head's measured sweep and working β range into its head_config.json
            and model card (heads loaded from local folders, the demo's own included; not Hub ids).
        progress: show progress bars.
    """

    out: str = field(metadata={"metavar": "DIR"})
    base: str = ""
    backbone: str = ""
    heads: list[str] = field(default_factory=list)
    prompts: str = ""
    reward: list[str] = field(default_factory=list)
    chat_template: bool = False
    n_prompts: int = 0
    record_in_heads: bool = False
    progress: bool = True


def make_eval_parser():
    parser = make_parser("valuemix eval", __doc__)
    add_dataclass_arguments(parser, EvalArgs)
    add_dataclass_arguments(parser, EvalConfig, title="sweep")
    return parser


def eval_main(argv=None) -> dict:
    """Run the evaluation, write report.json and the plots; returns the report."""
    args = parse_args(make_eval_parser(), argv, "eval")
    config = EvalConfig(**{f.name: _tuple(getattr(args, f.name), f.default) for f in fields(EvalConfig)})
    base, tokenizer, bank, prompts, rewards, folders = _world(args)
    if args.n_prompts:
        prompts = prompts[:args.n_prompts]
    report = evaluate(base, tokenizer, bank, prompts, rewards, config, progress=args.progress)
    with atomic_directory(args.out) as tmp:
        Path(tmp, "report.json").write_text(json.dumps(report, indent=1))
        plots = plot_report(report, tmp)
    print(summary_table(report))
    print(f"\nWrote {args.out}/report.json and {', '.join(p.name for p in plots)}")
    if args.record_in_heads:
        record_in_heads(bank, report, folders)
    return report


def record_in_heads(bank, report: dict, folders: dict) -> None:
    """Write each evaluated head's measurements into its folder's head_config.json and model card."""
    for head in report["summary"]:
        if head not in folders:
            print(f"Not recorded for {head}: it was not loaded from a local folder (a Hub id's cache is read-only).")
            continue
        bank.configs[head] = replace(bank.configs[head], evaluation=head_evaluation(report, head))
        bank.save_head(head, folders[head])
        low, high = bank.configs[head].evaluation["working_beta_range"]
        print(f"Recorded in {folders[head]}: β from {low:g} to {high:g} worked for {head}")


def _tuple(value, default):
    """Repeatable flags arrive as lists (or None when not given)."""
    if value is None:
        return default
    return tuple(value) if isinstance(value, list) else value


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
    if args.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    rewards = _rewards(args.reward, tokenizer)
    return base, tokenizer, bank, prompts, rewards, folders


def _rewards(specs, tokenizer=None) -> dict:
    from valuemix.reward_specs import parse_reward

    return {name: fn for name, fn, _ in (parse_reward(s, tokenizer=lambda: tokenizer) for s in specs)}


def summary_table(report: dict) -> str:
    """A Markdown table: per head, the largest Best-of-N VAS reaches, at what KL and cost, and the gain.

    Mean rewards are shown ± their standard error over prompts.
    """
    lines = ["| head | base reward | BoN-16 reward | largest BoN reached | β | VAS reward | VAS KL | VAS s/completion | "
             "BoN s/completion | gain at BoN-16 KL |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for head, s in report["summary"].items():
        start = (f"| {head} | {_with_error(s['base_reward'], s.get('base_reward_se'))} | "
                 f"{_with_error(s.get('best_of_16_reward'), s.get('best_of_16_reward_se'))} |")
        if "largest_best_of_n_reached" in s:
            lines.append(f"{start} {s['largest_best_of_n_reached']} | {s['beta']:g} | "
                         f"{_with_error(s['vas_reward'], s.get('vas_reward_se'))} | {s['vas_kl']:.2f} | "
                         f"{s['vas_seconds']:.3f} | {s['best_of_n_seconds']:.3f} | {s['gain_at_best_of_16_kl']:+.3f} |")
        else:
            lines.append(f"{start} none | | | | | | {s['gain_at_best_of_16_kl']:+.3f} |")
    return "\n".join(lines)


def _with_error(value: float | None, se: float | None) -> str:
    """"0.583 ± 0.031" (or the value alone without a standard error; blank without a value)."""
    if value is None:
        return ""
    return f"{value:.3f}" if se is None else f"{value:.3f} ± {se:.3f}"


eval = Subcommand(make_eval_parser, eval_main)  # noqa: A001  (the subcommand's name)
