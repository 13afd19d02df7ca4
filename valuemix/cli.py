"""The `valuemix` command: one subcommand per job; `valuemix SUBCOMMAND --help` for each.

A subcommand is one registry entry: `name: (target, summary)`, where target is a module with
`make_parser()` and `main(argv)` (e.g. "valuemix.quickstart") or `module:attribute` naming an object
with the same two (e.g. "valuemix.commands:train").
"""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "demo": ("valuemix.demo.show:demo", "the offline demo: SmolLM2-135M-Instruct steered by five shipped heads"),
    "quickstart": ("valuemix.quickstart", "the whole workflow on a tiny model built on the spot"),
    "sample": ("valuemix.commands:sample", "sample completions from the base model to a dataset folder"),
    "score": ("valuemix.commands:score", "add reward columns to a samples folder"),
    "train": ("valuemix.commands:train", "train one value head on a reward column and save it"),
    "generate": ("valuemix.generation:generate", "replies of the base model steered by a mix of heads"),
    "push": ("valuemix.commands:push", "publish a head folder to the Hugging Face Hub"),
    "ui": ("valuemix.ui_command:ui", "the slider app: mix heads live, see rewards and KL, HTTP API (needs [ui])"),
    "serve": ("valuemix.serve_command:serve", "vLLM's OpenAI-compatible server with a mix per request (needs [vllm])"),
    "eval": ("valuemix.evaluation:eval", "reward vs KL over a coefficient sweep, against Best-of-N (JSON + PNG)"),
    "bench": ("valuemix.bench", "decoding speed: valuemix vs the reference VAS decoding"),
}
# Errors that mean "the user asked for something that cannot be done": printed without a traceback
# (set VALUEMIX_DEBUG=1 to see it). Anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, KeyError, ImportError)


def load(name: str):
    """The object (module or attribute) that implements subcommand `name`: it has make_parser() and main(argv)."""
    module, _, attribute = SUBCOMMANDS[name][0].partition(":")
    target = importlib.import_module(module)
    return getattr(target, attribute) if attribute else target


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = "\n".join(f"  {name:12} {help}" for name, (_, help) in SUBCOMMANDS.items())
        print(f"usage: valuemix SUBCOMMAND [options]\n\nsubcommands:\n{lines}\n\n"
              "`valuemix SUBCOMMAND --help` lists a subcommand's options; every subcommand also reads them "
              "from --config FILE (YAML or JSON).")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command = load(argv[0])
    try:
        command.main(argv[1:])
        end_processes()
    except USER_ERRORS as err:
        if os.environ.get("VALUEMIX_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"valuemix {argv[0]}: error: {message}", file=sys.stderr)
        return 1
    return 0


def end_processes() -> None:
    """Under `accelerate launch`: wait for every process, then close the process group, so all exit cleanly."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
