"""The `valuemix` command: one subcommand per job; `valuemix SUBCOMMAND --help` for each."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "quickstart": ("valuemix.quickstart", "the whole workflow on a tiny model built on the spot"),
    "bench": ("valuemix.bench", "decoding speed: valuemix vs the reference VAS decoding"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = "\n".join(f"  {name:12} {help}" for name, (_, help) in SUBCOMMANDS.items())
        print(f"usage: valuemix SUBCOMMAND [options]\n\nsubcommands:\n{lines}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
