"""Subcommands of the `ctok` command line, one module each (see :mod:`ctok.cli`)."""
