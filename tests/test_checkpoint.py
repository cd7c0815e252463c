"""Checkpoint files: atomic writes, rotation, safe loading, random-generator states."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ctok.atomic_files import atomic_write
from ctok.training.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_rotation_keeps_the_newest_and_ignores_temporaries(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, tmp_path, step, keep_last=2)
    (tmp_path / ".step-00000050.pt.abc.tmp").write_bytes(b"partial")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    state = load_checkpoint(tmp_path / "step-00000040.pt")
    assert state["step"] == 40 and torch.equal(state["w"], torch.full((3,), 40.0))
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030.pt", "step-00000040.pt"]


def test_loading_is_safe_and_missing_files_say_so(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    torch.save({"obj": Payload()}, tmp_path / "step-00000001.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(tmp_path / "step-00000001.pt")
    with pytest.raises(FileNotFoundError, match="step-00000002.pt does not exist"):
        load_checkpoint(tmp_path / "step-00000002.pt")


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's legacy state
    save_checkpoint({"rng": capture_rng_state()}, tmp_path, 1, keep_last=0)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "step-00000001.pt")["rng"])
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
