"""Checkpoint files: atomic writes, rotation, safe loading (mapped, not read), random-generator states."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zipfile

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


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds ``tensor``'s memory (from /proc/self/maps), None for plain memory."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_checkpoints_are_zip_files_that_load_mapped_and_copy_on_write(tmp_path):
    path = save_checkpoint({"w": torch.arange(4096.0)}, tmp_path, 1, keep_last=0)
    assert zipfile.is_zipfile(path)  # the format torch.load(mmap=True) needs
    state = load_checkpoint(path)
    assert _mapped_file(state["w"]) == str(path.resolve())  # every rank shares the page cache's copy
    state["w"].add_(1)  # what AdamW does to its moments when a CPU run keeps the loaded tensors
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4096.0))


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    (tmp_path / "step-00000001.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(ValueError, match=r"step-00000001.pt is not a training checkpoint .*truncated, or another"):
        load_checkpoint(tmp_path / "step-00000001.pt")


# Trains one step of a 25 MB MLP (a 100 MB checkpoint: weights, EMA, two AdamW moments) into argv[2],
# or resumes it twice, mapped and read into memory (the old torch.load), printing each resume's peak
# growth of anonymous memory (RssAnon, sampled every millisecond) over the memory the run held before.
_RESUME_PEAK = """
import json, sys, threading, time
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset
from ctok.training.distributed import init_distributed
from ctok.training.runner import Runner
from ctok.training.sections import OptimSection, RunSection
from ctok.training.task import StepLosses

class Task:
    def __init__(self, net):
        self.net = net
    def training_step(self, batch, step, rng):
        return StepLosses(model=self.net(batch[0]).square().mean())
    def sample_images(self, step):
        return None

def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

def resume():
    run = RunSection(out_dir=sys.argv[2], max_steps=1, device="cpu")
    torch.manual_seed(0)
    runner = Runner(run, {"run": vars(run)}, init_distributed("cpu"), global_batch=2)
    net = runner.add_model(nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(6)]), optim=OptimSection(),
                           ema_decay=0.9)
    before, peak, done = rss_anon(), [0], threading.Event()
    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)
    watcher = threading.Thread(target=watch)
    watcher.start()
    runner.fit(Task(net.wrapped), TensorDataset(torch.randn(2, 1024)))  # a checkpoint at max_steps: loads only
    done.set()
    watcher.join()
    return runner, max(peak[0], rss_anon()) - before

if sys.argv[1] == "write":
    resume()
else:
    mapped = resume()  # kept alive: its memory must not be reused by the next resume
    load = torch.load
    torch.load = lambda *args, **kwargs: load(*args, **{**kwargs, "mmap": False})
    read = resume()
    print(json.dumps({"mapped": mapped[1], "read": read[1]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
def test_resuming_maps_the_checkpoint_instead_of_reading_it_into_memory(tmp_path):
    """Eight ranks of a node resume from one 10.8 GB SiT-XL checkpoint: read, each held its own copy."""
    script = tmp_path / "resume_peak.py"
    script.write_text(_RESUME_PEAK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for phase in ("write", "measure"):
        result = subprocess.run([sys.executable, str(script), phase, str(tmp_path / "run")], env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.splitlines()[-1])
    size = (tmp_path / "run" / "checkpoints" / "step-00000001.pt").stat().st_size
    print(f"checkpoint {size / 2**20:.1f} MiB; peak anonymous memory growth on resume: mapped "
          f"{growth['mapped'] / 2**20:.1f} MiB, read {growth['read'] / 2**20:.1f} MiB "
          f"(ratio {growth['mapped'] / growth['read']:.3f})")
    assert size > 90 * 2**20
    assert growth["read"] > 0.8 * size  # the measurement sees a whole copy when there is one
    assert growth["mapped"] < 0.1 * size
