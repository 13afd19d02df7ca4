"""Command-line plumbing shared by the subcommands: flags generated from config dataclasses, `--config` files.

A subcommand's settings are a dataclass whose docstring documents each field under "Attributes:";
`add_dataclass_arguments` turns every field into a flag (`lam` -> `--lam`, bools -> `--x/--no-x`,
`list[str]` -> a repeatable flag, a field without a default -> a required flag) with the field's
documentation as its help. `parse_args` reads `--config FILE` (YAML or JSON) first: its keys are the
flag names (dashes or underscores), and flags given on the command line override it. A file may also
hold one section per subcommand (`sample:`, `score:`, `train:`, ...): each subcommand reads its own
section plus the top-level keys it knows, so one file can drive the whole workflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from collections.abc import Sequence
from pathlib import Path

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each flag's default (unless it is None or False)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                or action.dest == "help":
            return help
        return f"{help} (default: %(default)s)"


def make_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with valuemix's help layout and the `--config FILE` flag."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of settings whose keys are the flag names (dashes or underscores); "
                             "flags given on the command line override it")
    return parser


def field_docs(cls) -> dict[str, str]:
    """Per-field documentation from a dataclass docstring's "Attributes:" section ("a, b: text" documents both)."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return docs
    names: list[str] = []
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        if width < indent:
            break
        match = re.match(r"\s*([\w, ]+):\s*(.*)", line) if width == indent else None
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            for name in names:
                docs[name] = match.group(2).strip()
        else:
            for name in names:
                docs[name] += " " + line.strip()
    return docs


def add_dataclass_arguments(parser, cls, exclude: Sequence[str] = (), title: str | None = None) -> list[str]:
    """Add one flag per field of dataclass `cls` (help from its docstring); returns the field names added.

    Field metadata may set `positional=True`, `metavar`, `choices` and `help` (which wins over the docstring).
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(title) if title else parser
    names = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind, optional = _unwrap(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default_factory() if f.default is dataclasses.MISSING else f.default)
        help = f.metadata.get("help") or docs.get(f.name) or f"{cls.__name__}.{f.name} (undocumented)"
        help = help.rstrip(".").replace("%", "%%")  # argparse formats help strings with %
        kwargs: dict = {"default": default}
        metavar = f.metadata.get("metavar", f.name.upper())
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            metavar = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) in (list, tuple):
            item = (typing.get_args(kind) or (str,))[0]
            kwargs.update(action="append", type=_named(item), default=None, metavar=metavar)
            help += "; repeat the flag for several"
        else:
            kwargs.update(type=_named(kind, optional), metavar=metavar)
        kwargs["help"] = help + (" (required)" if required else "")
        if f.metadata.get("positional"):
            kwargs.update(nargs="?")
            action = target.add_argument(f.name, **kwargs)
        else:
            action = target.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)
        action.valuemix_required = required
        action.valuemix_list_default = default if kwargs.get("action") == "append" else None
        names.append(f.name)
    return names


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, section: str) -> argparse.Namespace:
    """Parse `argv` on top of the `--config` file's values; exits with a usage error on bad or missing values."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    lists: dict[str, list] = {}  # repeatable flags: the command line replaces the file's list, not extends it
    if known.config:
        values = load_config_file(parser, known.config, section, set(actions))
        defaults = {dest: _coerce(parser, actions[dest], value, known.config) for dest, value in values.items()}
        lists = {d: v for d, v in defaults.items() if isinstance(actions[d], argparse._AppendAction)}
        parser.set_defaults(**{d: v for d, v in defaults.items() if d not in lists})
    args = parser.parse_args(argv)
    for dest, action in actions.items():
        if getattr(args, dest) is None and isinstance(action, argparse._AppendAction):
            fallback = lists.get(dest, getattr(action, "valuemix_list_default", None))
            setattr(args, dest, None if fallback is None else list(fallback))
        if getattr(action, "valuemix_required", False) and getattr(args, dest) in (None, []):
            flag = action.option_strings[0] if action.option_strings else action.dest.upper()
            parser.error(f"{flag} is required (on the command line or as '{dest}' in the --config file)")
    return args


def load_config_file(parser, path: str, section: str, known: set[str]) -> dict:
    """The settings for subcommand `section` in a YAML/JSON file, keyed by argparse dest (`max_new_tokens`)."""
    from valuemix.cli import SUBCOMMANDS

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        parser.error(f"cannot read --config file {path}: {err.strerror or err}")
    if Path(path).suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            parser.error(f"--config file {path} is not valid JSON: {err}")
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            parser.error(f"--config file {path} is not valid YAML: {err}")
    data = {} if data is None else data
    if not isinstance(data, dict):
        parser.error(f"--config file {path} must hold a mapping of flag names to values, not a "
                     f"{type(data).__name__}")
    data = {_dest(k): v for k, v in data.items()}
    sections = {k for k, v in data.items() if k in SUBCOMMANDS and isinstance(v, dict)}
    if sections:  # one section per subcommand, plus shared top-level keys
        values = {k: v for k, v in data.items() if k not in sections and k in known}
        own = data.get(section) or {}
        if not isinstance(own, dict):
            parser.error(f"section '{section}' of --config file {path} must be a mapping of flag names to values")
        values.update({_dest(k): v for k, v in own.items()})
        unknown = sorted(k for k in values if k not in known)
        where = f"section '{section}' of {path}"
    else:
        values = data
        unknown = sorted(k for k in values if k not in known)
        where = path
    if unknown:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in unknown)
        parser.error(f"{where} sets {flags}, which `{parser.prog}` does not have; see `{parser.prog} --help`")
    return values


# ------------------------------------------------------------------------------------------ helpers
def _dest(key) -> str:
    return str(key).lstrip("-").replace("-", "_")


def _unwrap(kind):
    """(T, True) for `T | None`, else (kind, False)."""
    args = typing.get_args(kind)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def _named(kind, optional: bool = False):
    """An argparse `type=` converter named after `kind` (argparse says "invalid int value"); 'none' -> None."""
    if kind is bool:
        return _boolean
    if not optional:
        return kind

    def convert(text: str):
        return None if text.strip().lower() in ("none", "null", "") else kind(text)

    convert.__name__ = getattr(kind, "__name__", str(kind))
    return convert


def _boolean(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def _coerce(parser, action, value, path: str):
    """A value read from a --config file, converted as the flag would convert it (lists for repeatable flags)."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    try:
        if isinstance(action, argparse.BooleanOptionalAction):
            return _boolean(value)
        if isinstance(action, argparse._AppendAction):
            if isinstance(value, dict):  # {name: spec} for NAME=SPEC flags
                value = [f"{k}={v}" for k, v in value.items()]
            items = value if isinstance(value, list) else [value]
            return [action.type(str(v)) if action.type else v for v in items]
        if value is None:
            return None
        converted = action.type(str(value)) if action.type else value
    except (TypeError, ValueError) as err:
        parser.error(f"{path}: {flag}: invalid value {value!r} ({err})")
    if action.choices is not None and converted not in action.choices:
        parser.error(f"{path}: {flag}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def fill_dataclass(cls, args, exclude=()):
    """An instance of dataclass `cls` from the parsed flags of its fields (other flags, like --config, ignored)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in exclude})
