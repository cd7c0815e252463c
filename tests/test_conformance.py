"""The released format and numbers: every conformance case through the public API."""
import json
import os
from pathlib import Path

import pytest
import torch

import ctok
from conftest import CONFORMANCE, REPO, assert_conforms, conformance_case

# The project's own machines keep the fixtures' originals here; a user's clone has no such folder.
SHARED_CONFORMANCE = os.path.join(os.environ.get("CTOK_SHARED", REPO.parent / "shared"), "conformance")


def test_vendored_fixtures_are_byte_identical_to_the_shared_originals():
    if not os.path.isdir(SHARED_CONFORMANCE):
        pytest.skip(f"no shared fixtures at {SHARED_CONFORMANCE} to compare with (only on the project's machines)")
    shared = {f.name: f.read_bytes() for f in sorted(Path(SHARED_CONFORMANCE).iterdir()) if f.is_file()}
    vendored = {f.name: f.read_bytes() for f in sorted(CONFORMANCE.iterdir()) if f.is_file()}
    assert sorted(vendored) == sorted(shared), "the vendored fixture files differ from the shared ones"
    for name, data in shared.items():
        assert vendored[name] == data, f"tests/fixtures/conformance/{name} differs from {SHARED_CONFORMANCE}/{name}"


@pytest.mark.parametrize("name", ["softvq_small", "maetok_small"])
def test_tokenizer_matches_original(conformance_dir, name):
    _, _, io = conformance_case(name)
    tok = ctok.load_tokenizer(conformance_dir / name)
    assert tok.variant == name.split("_")[0]
    with torch.no_grad():
        assert_conforms(tok.encode(io["x"]), io["z"], "encode")
        assert_conforms(tok.decode(io["z"]), io["rec_from_z"], "decode")
        assert_conforms(tok(io["x"]), io["rec"], "forward")


def test_sit_velocity_matches_original(conformance_dir):
    _, _, io = conformance_case("sit_small")
    sit = ctok.load_sit(conformance_dir / "sit_small")
    with torch.no_grad():
        assert_conforms(sit(io["x"], io["t"], io["y"]), io["v"], "velocity")


def test_dit_output_matches_original(conformance_dir):
    _, _, io = conformance_case("dit_small")
    dit = ctok.load_dit(conformance_dir / "dit_small")
    with torch.no_grad():
        assert_conforms(dit(io["x"], io["t"], io["y"]), io["out"], "eps and variance")


@pytest.mark.parametrize("name", ["softvq_small", "maetok_small", "sit_small", "dit_small"])
def test_save_pretrained_round_trips(conformance_dir, tmp_path, name):
    from ctok.loading import load_any
    from ctok.models.files import read_config

    model, _ = load_any(conformance_dir / name)
    model.save_pretrained(tmp_path)
    again, report = load_any(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert report.ignored == []
    # The original's keys survive, so the original loader can read what we write.
    original = json.loads((conformance_dir / name / "config.json").read_text())
    written = read_config(tmp_path)
    for key, value in original.items():
        assert written[key] == value, key
