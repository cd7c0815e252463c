"""pytest plugin for ``make mutation``: run each mutant's tests fastest first, within a time budget.

mutmut 3 runs, for each mutant, only the tests that called the mutated function, but hands them to
pytest in no particular order; with ``-x`` a mutant is dead at its first failing test, so running
the cheap unit tests before the few-second end-to-end ones makes a killed mutant cost little. The
durations are the ones mutmut recorded in ``mutants/mutmut-stats.json`` (pytest runs in
``mutants/``).

``MUTATION_TEST_BUDGET_S`` (seconds, unset or 0: no limit) keeps, of those tests, the fastest ones
whose recorded times add up to at most the budget (always at least one) and deselects the rest:
a surviving mutant of a function that a hundred tests call then costs seconds, not minutes. A
mutant that only a deselected test would kill is reported as surviving.

Outside a mutant run (no ``__mutmut_`` in ``MUTANT_UNDER_TEST``) the plugin does nothing. It is
loaded with ``-p mutation_order`` from ``[tool.mutmut] pytest_add_cli_args``; the Makefile puts
``scripts/`` on ``PYTHONPATH``.
"""
from __future__ import annotations

import json
import os


def pytest_collection_modifyitems(session, config, items):
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    try:
        with open("mutmut-stats.json") as f:
            durations = json.load(f)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
    budget = float(os.environ.get("MUTATION_TEST_BUDGET_S") or 0)
    if budget <= 0:
        return
    spent, keep = 0.0, 0
    for item in items:
        spent += durations.get(item.nodeid, budget)
        if keep and spent > budget:
            break
        keep += 1
    if keep < len(items):
        config.hook.pytest_deselected(items=items[keep:])
        del items[keep:]
