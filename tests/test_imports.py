"""No import cycles: every module of ctok imports alone, and the hub and the models import one way only."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SOURCE = REPO / "src" / "ctok"
# Importing ctok.__main__ runs the command line; `python -m ctok` is tested with the commands.
MODULES = sorted(
    ".".join(("ctok", *path.relative_to(SOURCE).with_suffix("").parts)).removesuffix(".__init__")
    for path in SOURCE.rglob("*.py") if path.name != "__main__.py"
)
# Modules that exist to adapt ctok to an optional package, and that package (an extra of pyproject.toml).
OPTIONAL = {"ctok.integrations.diffusers": "diffusers"}

# For each module: forget every ctok module imported so far, then import this one first. Third-party
# packages (torch, timm ...) stay loaded, so this costs seconds, yet each ctok module runs from
# scratch in the order its own imports ask for, which is what fails when two modules need each other.
_IMPORT_EACH_FIRST = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "ctok" or m.startswith("ctok.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def test_the_module_list_covers_the_package():
    assert len(MODULES) > 60 and {"ctok", "ctok.hub", "ctok.loading", "ctok.models", "ctok.models.base"} <= set(MODULES)


def test_every_module_imports_first_on_its_own():
    # The source under test first on the path, whatever copy of ctok is installed.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SOURCE.parent)}
    # An adapter whose package is not installed cannot import (it says so: see the test below).
    modules = [m for m in MODULES if m not in OPTIONAL or importlib.util.find_spec(OPTIONAL[m]) is not None]
    run = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, json.dumps(modules)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    failures = json.loads(run.stdout.splitlines()[-1])
    assert not failures, "\n".join(f"import {name} alone fails:\n{err}" for name, err in failures.items())


def _imports(module: str) -> set[str]:
    """The ctok modules ``module`` imports anywhere in its source, function bodies included."""
    path = SOURCE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            # ``from ctok.models import files`` imports the module ctok.models.files.
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                         for a in node.names)
    return {name for name in found if name in MODULES}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for name in _imports(todo.pop()) - seen:
            seen.add(name)
            todo.append(name)
    return seen


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith(("ctok.hub", "ctok.models", "ctok.loading"))])
def test_no_cycle_through_the_hub_and_the_models_even_inside_functions(module):
    """An import inside a function body hides a cycle from the interpreter, not from this test."""
    assert module not in _reachable(module), f"{module} imports itself through {sorted(_reachable(module))}"


def test_the_hub_sits_below_every_model():
    # The hub resolves sources, pushes exports and keeps the kind registry; the model classes register
    # themselves there. Pushing reads the offline switch, whose home (ctok.downloads) imports no ctok module.
    assert _reachable("ctok.hub") <= {"ctok.models", "ctok.models.files", "ctok.models.presets", "ctok.atomic_files",
                                      "ctok.downloads"}
    above = {"ctok.loading", "ctok.pipeline"} | {m for m in MODULES if m.startswith(("ctok.commands", "ctok.training"))}
    for module in (m for m in MODULES if m.startswith("ctok.models")):
        assert not _imports(module) & above, f"{module} imports {sorted(_imports(module) & above)}"


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SOURCE.parent)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_ctok_and_its_command_line_import_no_optional_package():
    """``import ctok`` and building every subcommand's parser (``ctok export`` included) need neither
    diffusers nor the ONNX packages: they are imported only when an export or the adapter is asked for."""
    run = _run_python("import sys, ctok, ctok.cli\n"
                      "ctok.cli.build_parser()\n"
                      "print(sorted(m for m in ('diffusers', 'onnx', 'onnxscript', 'onnxruntime', 'torch') "
                      "if m in sys.modules))")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["[]"]


def test_the_export_module_imports_the_onnx_packages_only_where_it_uses_them():
    """So that ``ctok export`` without them ends in its pip advice, not in an ImportError at import."""
    tree = ast.parse((SOURCE / "export.py").read_text())
    top_level = {alias.name.partition(".")[0] for node in tree.body if isinstance(node, ast.Import)
                 for alias in node.names}
    top_level |= {node.module.partition(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert "torch" in top_level and not top_level & {"onnx", "onnxscript", "onnxruntime"}


def test_an_adapter_without_its_package_names_the_pip_command():
    run = _run_python("import sys\nsys.modules['diffusers'] = None  # as if not installed\n"
                      "import ctok.integrations.diffusers")
    assert run.returncode != 0
    assert "ImportError: ctok.integrations.diffusers needs diffusers" in run.stderr
    assert "pip install 'ctok[diffusers]'" in run.stderr
