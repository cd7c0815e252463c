"""Did the settings change? The one check that a resumed run continues the run it claims to.

A rerun in the same output folder (``ctok generate``, the demo), a latent-cache build that finds
shards of an earlier build, and a trainer resuming a checkpoint all compare the settings they are
given with the ones stored by the first run, and refuse to mix two runs' outputs.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from ctok.atomic_files import write_json


def changed_keys(previous: dict, current: dict, ignore: Collection[str] = ()) -> list[str]:
    """The sorted keys, of either dict, whose values differ (a missing key counts as None)."""
    return sorted(k for k in previous.keys() | current.keys()
                  if k not in ignore and previous.get(k) != current.get(k))


def describe_changes(previous: dict, current: dict, keys: list[str]) -> str:
    """``key: old -> new`` for each key, comma-separated: what an error message shows."""
    return ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in keys)


def check_same_settings(path: str | Path, settings: dict, what: str, *, write: bool = True,
                        ignore: Collection[str] = ()) -> None:
    """Compare ``settings`` with the stamp at ``path``; write the stamp when there is none yet.

    Raises ValueError ``"<what> with other settings (key: old -> new, ...)"`` naming every changed
    key. ``settings`` must survive a round trip through JSON unchanged (plain types, lists not
    tuples), or it would never compare equal to the stamp a rerun reads back. ``write=False`` only
    checks (the processes of a distributed run other than the first). Keys in ``ignore`` are stored
    but not compared (a record of the first run, such as its protocol card).
    """
    path = Path(path)
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = changed_keys(previous, settings, ignore)
        if changed:
            raise ValueError(f"{what} with other settings ({describe_changes(previous, settings, changed)}); "
                             "pass a new --out, or delete that folder to start over")
    elif write:
        write_json(path, settings, indent=1, sort_keys=True)
