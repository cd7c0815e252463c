"""docs/architecture.md stays true: every module it names exists, and every `module.py` `Name` pair it
gives names something defined in that module."""
from __future__ import annotations

import ast
import re

from conftest import REPO

SRC = REPO / "src" / "ctok"
DOC = REPO / "docs" / "architecture.md"


def _module(path: str):
    candidates = [SRC / path, *SRC.glob(f"*/{path}"), REPO / path]
    return next((c for c in candidates if c.is_file()), None)


def test_every_module_the_architecture_page_names_exists():
    text = DOC.read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)?[a-z_*]+\.py)`", text))
    assert len(named) > 40
    missing = [p for p in sorted(named) if "*" not in p and _module(p) is None]
    assert missing == []


def test_every_symbol_the_concept_table_points_to_is_defined_there():
    text = DOC.read_text()
    pairs = re.findall(r"`((?:[a-z_]+/)?[a-z_]+\.py)` `([A-Za-z_.]+)`", text)
    assert len(pairs) > 10
    wrong = []
    for path, name in pairs:
        tree = ast.parse(_module(path).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        head, _, method = name.partition(".")
        if head not in defined and method not in defined:
            wrong.append(f"{path} {name}")
    assert wrong == []
