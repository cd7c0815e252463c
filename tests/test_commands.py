"""The command modules are thin: none imports another, and the demo drives the library, not argv."""
from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

from ctok import commands

PACKAGE = Path(commands.__file__).resolve().parents[1]
COMMANDS = sorted(m.name for m in pkgutil.iter_modules(commands.__path__))


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, with ``from A import B``
    also giving ``A.B`` (B may be a module); relative imports resolved against ``path``'s package."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("name", COMMANDS)
def test_no_command_module_imports_another(name):
    others = {f"ctok.commands.{other}" for other in COMMANDS if other != name}
    assert not imported_modules(PACKAGE / "commands" / f"{name}.py") & others


def test_the_import_check_sees_each_form_of_import(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "ctok")
    module = tmp_path / "ctok" / "commands" / "a.py"
    module.parent.mkdir(parents=True)
    module.write_text("import ctok.commands.b\nfrom ctok.commands import c\nfrom . import d\nfrom .e import run\n")
    assert {"ctok.commands.b", "ctok.commands.c", "ctok.commands.d", "ctok.commands.e"} <= imported_modules(module)


def test_the_demo_calls_the_library_not_the_command_line():
    assert not {"ctok.cli", "ctok.commands"} & imported_modules(PACKAGE / "demo" / "pipeline.py")
