"""The `ctok` command line: one subcommand per job.

Each module in :mod:`ctok.commands` is one subcommand. It defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int | None``; its name, with underscores
turned into dashes, is the subcommand's name. Discovering them keeps this file free of a
list that every new job would have to edit.

:func:`main` is the one error boundary. Whatever a user can cause ends in one line on stderr and
an exit code that says what kind of failure it was (:data:`EXIT_CODES`); ``CTOK_DEBUG=1`` re-raises
instead, for the traceback. An exception of any other type is a bug in ctok and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import sys

from ctok import commands

EXIT_BAD_INPUT = 2  # a file, flag or config value that cannot be used: the message names it
EXIT_ENVIRONMENT = 3  # the machine refused: disk full, read-only folder, no permission
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_CODES = {"bad input": EXIT_BAD_INPUT, "environment": EXIT_ENVIRONMENT, "interrupted": EXIT_INTERRUPTED}

# Errors of the input itself (a missing or wrong-kind path), although Python makes them OSErrors.
_INPUT_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG}
# What to do about the machine's refusals that ctok commands meet.
_ENVIRONMENT_ADVICE = {
    errno.ENOSPC: "free some space there or choose another output folder; no partial file was kept",
    errno.EDQUOT: "free some space there or choose another output folder; no partial file was kept",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.EACCES: "no permission: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "no permission: choose a folder you can write to, or fix its permissions",
    errno.EBUSY: "wait for it to finish, or choose another output folder",
}


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
    """Run one subcommand; returns its exit code (0, or one of :data:`EXIT_CODES` after one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        code = args._run(args)
    except Exception as err:  # sorted by _classify; what it does not know is a bug and keeps its traceback
        if os.environ.get("CTOK_DEBUG") == "1":
            raise
        failure = _classify(err)
        if failure is None:
            raise
        exit_code, message = failure
        print(f"ctok {args.command}: error: {message}", file=sys.stderr)
        return exit_code
    except KeyboardInterrupt:
        if os.environ.get("CTOK_DEBUG") == "1":
            raise
        print(f"ctok {args.command}: interrupted; every file written so far is complete: run the same command "
              "again to resume where it stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(code or 0)


def _classify(err: Exception) -> tuple[int, str] | None:
    """(exit code, one-line message) for a failure the user caused or the machine refused; None for a bug."""
    if isinstance(err, OSError) and err.errno is not None and err.errno not in _INPUT_ERRNOS:
        where = f" ({err.filename})" if err.filename else ""
        advice = _ENVIRONMENT_ADVICE.get(err.errno, "the operating system refused")
        return EXIT_ENVIRONMENT, f"{err.strerror or err}{where}: {advice}"
    if isinstance(err, (ValueError, OSError)):
        # These carry messages written for the user; a traceback would only hide them.
        return EXIT_BAD_INPUT, " ".join(str(err).split()) or type(err).__name__
    return None
