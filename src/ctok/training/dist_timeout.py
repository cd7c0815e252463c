"""How long a torchrun process waits in a collective for the others: ``run.dist_timeout_min`` and
``--dist-timeout-min``, their one default and their one check.

The default is generous on purpose. While rank 0 alone writes and fsyncs a checkpoint (10.8 GB
for SiT-XL with its EMA and AdamW state) or draws the sample grid, the other ranks already wait
in the next collective; NCCL's own 10 minutes can run out on a slow disk and kill a healthy run.
A real hang still ends, just later. This module imports no torch, so the command line can name
the default without loading it.
"""
from __future__ import annotations

import argparse

DEFAULT_DIST_TIMEOUT_MIN = 60


def check_dist_timeout(minutes: int) -> int:
    """``minutes`` if it is a usable timeout (a whole number of at least one minute); else a ValueError."""
    if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 1:
        raise ValueError(f"the process-group timeout (run.dist_timeout_min, --dist-timeout-min) must be a whole "
                         f"number of minutes, at least 1, got {minutes!r}")
    return minutes


def add_dist_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--dist-timeout-min`` flag of the torchrun-aware commands."""
    parser.add_argument("--dist-timeout-min", type=int, default=DEFAULT_DIST_TIMEOUT_MIN, metavar="MINUTES",
                        help="under torchrun: how long a process waits for the others in a collective, e.g. while "
                             f"rank 0 writes the files (default {DEFAULT_DIST_TIMEOUT_MIN})")
