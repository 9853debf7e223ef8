"""What the `samoe` command's verb tables are made of: a `Verb` row (name, one-line help,
argument setup, handler), a `Group` row for a verb with sub-verbs, `add_verbs` that turns a
table into argparse subparsers, and the argument pieces several verbs share.

The tables themselves live with the code they call: samoe/cli.py (the top level), and
data/, train/, eval/, analysis/ and study/ each in its own cli.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from samoe.config_load import field_paths, preset_names
from samoe.errors import UserError

Handler = Callable[[argparse.Namespace], int]
ArgSetup = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Verb:
    """`samoe [GROUP] NAME`: `args` adds its arguments (and any description or epilog) to its
    parser; `run` handles the parsed arguments and returns the exit status."""

    name: str
    help: str
    args: ArgSetup
    run: Handler


@dataclass(frozen=True)
class Group:
    """`samoe NAME SUBVERB`: a verb whose table of sub-verbs is `verbs`; the chosen sub-verb's
    name is stored in `dest` (argparse names it when none is given)."""

    name: str
    help: str
    dest: str
    verbs: Sequence[Verb]


def add_verbs(subparsers, table: Sequence[Verb | Group]) -> None:
    """One subparser per row of `table`, in order; a Group's sub-verbs under it."""
    for row in table:
        p = subparsers.add_parser(row.name, help=row.help)
        if isinstance(row, Group):
            add_verbs(p.add_subparsers(dest=row.dest, required=True), row.verbs)
        else:
            row.args(p)
            p.set_defaults(func=row.run)


# --------------------------------------------------------------------------- shared arguments


def config_args(p: argparse.ArgumentParser, metavar: str = "key.path=value",
                overrides_help: str = "config overrides (see below)") -> None:
    """Positional overrides, --config and --preset, and every config key with its default as
    the epilog (printed as is)."""
    p.add_argument("overrides", nargs="*", metavar=metavar, help=overrides_help)
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("--preset", help=f"a built-in preset: {', '.join(preset_names())}")
    keys = "\n".join(f"  {k} (default {v})" for k, v in field_paths())
    p.epilog = f"config keys (override with key.path=value):\n{keys}"
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def check_at_least_one(args: argparse.Namespace, *flags: str) -> None:
    """A UserError for the first of these integer options that is given and below 1."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value} is invalid; expected an integer >= 1")
