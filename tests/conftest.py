"""Test settings: offline hub, the shared conformance fixtures, small deterministic inputs."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CTOK_SHARED", REPO.parent / "shared"))
CONFORMANCE = SHARED / "conformance"


def conformance_case(name: str):
    """(config dict, state dict, io dict) of a shared conformance case, rebuilt from its manifest."""
    import torch

    if not CONFORMANCE.is_dir():
        pytest.fail(f"conformance fixtures not found at {CONFORMANCE}; set CTOK_SHARED to the shared/ folder")
    sys.path.insert(0, str(CONFORMANCE))
    try:
        from fixture_weights import rebuild_state_dict
    finally:
        sys.path.remove(str(CONFORMANCE))
    config = json.loads((CONFORMANCE / f"{name}.config.json").read_text())
    manifest = json.loads((CONFORMANCE / f"{name}.manifest.json").read_text())
    fixed = torch.load(CONFORMANCE / f"{name}.fixed.pt", weights_only=True)
    io = torch.load(CONFORMANCE / f"{name}.io.pt", weights_only=True)
    return config, rebuild_state_dict(manifest, fixed), io


def conformance_model(name: str, model_class):
    """(model in eval mode with the case's weights, io dict) of a conformance case."""
    config, state, io = conformance_case(name)
    model = model_class.from_config(config)
    model.load_state_dict(state)
    return model.eval(), io


@pytest.fixture(scope="session")
def conformance_dir(tmp_path_factory):
    """Every conformance case written as a hub-style checkpoint folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("conformance")
    for name in ("softvq_small", "maetok_small", "sit_small", "dit_small"):
        config, state, _ = conformance_case(name)
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return root


def assert_conforms(ours, reference, what: str = "output"):
    """The agreement the conformance README asks for: max|diff| <= 1e-4 * max(1, max|ref|)."""
    ours = ours.double().cpu()
    reference = reference.double().cpu()
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    tol = 1e-4 * max(1.0, float(reference.abs().max()))
    err = float((ours - reference).abs().max())
    assert err <= tol, f"{what}: max |diff| {err:.3g} > tolerance {tol:.3g}"
