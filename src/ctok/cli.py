"""The `ctok` command line: one subcommand per job.

Each module in :mod:`ctok.commands` is one subcommand. It defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int | None``; its name, with underscores
turned into dashes, is the subcommand's name. Discovering them keeps this file free of a
list that every new job would have to edit.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ctok import commands


class UsageError(Exception):
    """Bad input from the user: printed as one line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctok", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"ctok.commands.{info.name}")
        p = sub.add_parser(info.name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args._run(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        # These carry messages written for the user; a traceback would only hide them.
        print(f"ctok {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)
