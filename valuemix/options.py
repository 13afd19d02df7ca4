"""Command-line plumbing shared by the subcommands: `transformers.HfArgumentParser` over settings dataclasses,
plus `--config FILE`.

A subcommand's settings are dataclasses whose fields carry their help in `metadata`; HfArgumentParser turns
each field into a flag (`max_new_tokens` -> `--max-new-tokens` or `--max_new_tokens`, a bool defaulting to
True -> `--x` and `--no-x`, a list -> one flag with several values, `--reward a=x b=y`). Of our own there
is only the `--config FILE` layering (YAML or JSON, keys are flag names with dashes or underscores), read
before the command line, which overrides it. A file may also hold one section per subcommand (`sample:`,
`score:`, `train:`, ...): each subcommand reads its own section plus the top-level keys it knows, so one
file can drive the whole workflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Sequence
from pathlib import Path

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows each flag's default (argparse's own two formatters)."""


def make_parser(prog: str, description: str | None, *settings: type,
                positional: Sequence[str] = ()) -> HfArgumentParser:
    """An HfArgumentParser over the `settings` dataclasses, with `--config FILE`.

    positional: fields that may also be given as leading positional arguments, in this order
    (`valuemix push DIR REPO_ID`); they stay flags too.
    """
    parser = HfArgumentParser(settings, prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of settings whose keys are the flag names (dashes or underscores); "
                             "flags given on the command line override it")
    parser.valuemix_positional = tuple(positional)
    return parser


def parse(parser: HfArgumentParser, argv: Sequence[str] | None, section: str) -> tuple:
    """One instance per settings dataclass from `argv` on top of the `--config` file; usage errors exit (code 2)."""
    import sys

    argv = _named_positionals(parser, list(sys.argv[1:] if argv is None else argv))
    settings = {}
    for cls in parser.dataclass_types:
        hints = typing.get_type_hints(cls)
        settings.update({f.name: _typed(f, hints[f.name])
                         for f in dataclasses.fields(cls)})
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    given = {_dest(token.split("=")[0]) for token in argv if token.startswith("--")}
    for name, f in settings.items():
        if _is_list(f) and sum(_dest(t.split("=")[0]) == name for t in argv if t.startswith("--")) > 1:
            parser.error(f"--{_flag(name)} is given twice: give it once with several values "
                         f"(--{_flag(name)} A B), or list them in the --config file")
    file_args = []
    if config_path:
        values = load_config_file(parser, config_path, section, set(settings))
        file_args = [token for name, value in values.items() if not (_is_list(settings[name]) and name in given)
                     for token in _as_tokens(parser, settings[name], value, config_path)]
    present = given | (set(values) if config_path else set())
    for name, f in settings.items():
        if _required(f) and name not in present and "-h" not in argv and "--help" not in argv:
            parser.error(f"--{_flag(name)} is required (on the command line or as '{name}' in the --config file)")
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(file_args + argv, return_remaining_strings=True,
                                                                look_for_args_file=False)
    except ValueError as err:  # a dataclass refused a value (its __post_init__)
        parser.error(str(err))
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return tuple(parsed[:len(parser.dataclass_types)])


def inherit_help(cls):
    """Give the fields a dataclass subclass redefines (to change a default) the help of the field they override."""
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            inherited = next((base.__dataclass_fields__[f.name].metadata for base in cls.__mro__[1:]
                              if f.name in getattr(base, "__dataclass_fields__", {})
                              and "help" in base.__dataclass_fields__[f.name].metadata), None)
            if inherited is not None:
                f.metadata = {**inherited, **f.metadata}
    return cls


def load_config_file(parser, path: str, section: str, known: set[str]) -> dict:
    """The settings for subcommand `section` in a YAML/JSON file, keyed by field name (`max_new_tokens`)."""
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
    where = path
    values = data
    if sections:  # one section per subcommand, plus shared top-level keys
        values = {k: v for k, v in data.items() if k not in sections and k in known}
        own = data.get(section) or {}
        if not isinstance(own, dict):
            parser.error(f"section '{section}' of --config file {path} must be a mapping of flag names to values")
        values.update({_dest(k): v for k, v in own.items()})
        where = f"section '{section}' of {path}"
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        flags = ", ".join(f"--{_flag(k)}" for k in unknown)
        parser.error(f"{where} sets {flags}, which `{parser.prog}` does not have; see `{parser.prog} --help`")
    return values


# ------------------------------------------------------------------------------------------ helpers
def _typed(f: dataclasses.Field, kind) -> dataclasses.Field:
    """A copy of field `f` whose `type` is resolved (modules with `from __future__ import annotations` hold text)."""
    copy = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)
    copy.name, copy.type = f.name, kind
    return copy


def _dest(key) -> str:
    return str(key).lstrip("-").replace("-", "_")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _is_list(f: dataclasses.Field) -> bool:
    kind = _unwrap(f.type)
    return typing.get_origin(kind) is list or kind is list


def _unwrap(kind):
    """T for `T | None`, else kind."""
    args = typing.get_args(kind)
    return next(a for a in args if a is not type(None)) if type(None) in args and len(args) == 2 else kind


def _named_positionals(parser, argv: list[str]) -> list[str]:
    """Leading positional arguments as the flags of the parser's positional fields (`DIR` -> `--directory DIR`)."""
    names = list(getattr(parser, "valuemix_positional", ()))
    out = []
    while argv and names and not argv[0].startswith("-"):
        out += [f"--{_flag(names.pop(0))}", argv.pop(0)]
    return out + argv


def _as_tokens(parser, f: dataclasses.Field, value, path: str) -> list[str]:
    """A --config value as command-line tokens, checked as the flag would check it (one line naming the file)."""
    flag = f"--{_flag(f.name)}"
    if _is_list(f):
        if isinstance(value, dict):  # {name: spec} for NAME=SPEC flags
            value = [f"{k}={v}" for k, v in value.items()]
        items = value if isinstance(value, list) else [value]
        kind = (typing.get_args(_unwrap(f.type)) or (str,))[0]
        for item in items:
            _check(parser, f, kind, item, path)
        return [flag, *map(str, items)] if items else []
    if value is None:
        if _unwrap(f.type) is not f.type:  # an optional setting left unset
            return []
        parser.error(f"{path}: {flag}: invalid value None")
    _check(parser, f, _unwrap(f.type), value, path)
    return [flag, str(value)]


def _check(parser, f: dataclasses.Field, kind, value, path: str) -> None:
    try:
        converted = string_to_bool(value if isinstance(value, bool) else str(value)) if kind is bool \
            else kind(str(value)) if kind in (int, float) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        parser.error(f"{path}: --{_flag(f.name)}: invalid value {value!r} ({err})")
    choices = f.metadata.get("choices")
    if choices is not None and converted not in choices:
        parser.error(f"{path}: --{_flag(f.name)}: {value!r} is not one of {', '.join(map(str, choices))}")
