"""The wheel stands without the repository: every module, config and asset is inside, and it runs."""
from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

SOURCE = REPO / "src" / "ctok"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of what the sdist holds, so the build cannot read the rest of the clone."""
    root = tmp_path_factory.mktemp("build")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(SOURCE, root / "src" / "ctok", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(root / "dist"), str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (found,) = (root / "dist").glob("ctok-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_holds_every_module_config_and_asset_byte_for_byte(wheel):
    with zipfile.ZipFile(wheel) as archive:
        packed = {name: archive.read(name) for name in archive.namelist() if name.startswith("ctok/")}
        dist_info = {Path(name).name: archive.read(name) for name in archive.namelist() if ".dist-info/" in name}
    expected = {f"ctok/{path.relative_to(SOURCE).as_posix()}": path.read_bytes()
                for path in sorted(SOURCE.rglob("*")) if path.is_file() and "__pycache__" not in path.parts}
    assert set(expected) - set(packed) == set(), "files of src/ctok missing from the wheel"
    for name, data in expected.items():
        assert packed[name] == data, name
    assert any(name.startswith("ctok/configs/") and name.endswith(".yaml") for name in packed)
    assert "ctok/assets/fmnist_classifier.safetensors" in packed
    metadata = email.message_from_bytes(dist_info["METADATA"])
    assert metadata["License-Expression"] == "Apache-2.0" and metadata["Name"] == "ctok"
    assert b"ctok = ctok.cli:main" in dist_info["entry_points.txt"]
    assert dist_info["LICENSE"] == (REPO / "LICENSE").read_bytes()


@pytest.mark.slow
def test_the_installed_wheel_loads_checkpoints_configs_and_the_classifier(wheel, conformance_dir, tmp_path):
    """Installed on its own (the dependencies come from this environment), run from a folder far from the clone."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    script = f"""
import ctok
from ctok.models.fmnist_classifier import load_fmnist_classifier
from ctok.training.config import packaged_config_names, resolve_config_path
assert ctok.__file__.startswith({str(site)!r}), ctok.__file__
assert str(resolve_config_path("tiny-maetok")).startswith({str(site)!r})
print(len(packaged_config_names()))
tok = ctok.load_tokenizer({str(conformance_dir / "maetok_small")!r})
print(tok.variant, tok.num_tokens, tok.latent_dim)
print(load_fmnist_classifier().identity)
"""
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    configs, model, classifier = result.stdout.splitlines()
    assert int(configs) == len(list((SOURCE / "configs").glob("*.yaml")))
    assert model.split() == ["maetok", "16", "8"] and classifier.startswith("fmnist-classifier-")
