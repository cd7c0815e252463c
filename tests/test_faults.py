"""Hostile inputs and faults, replayed against the command line: every case ends in rc 0 with the right
output, or in one line naming the problem with the documented exit code (2 bad input, 3 the machine
refused, 130 interrupted); no traceback, no partial file. docs/reliability.md states the figures."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from ctok import atomic_files
from ctok.cli import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, main


@pytest.fixture
def models(conformance_dir, tmp_path):
    """Writable copies of the conformance tokenizer and SiT."""
    for name in ("maetok_small", "sit_small"):
        shutil.copytree(conformance_dir / name, tmp_path / name)
    return tmp_path / "maetok_small", tmp_path / "sit_small"


def _generate(tok, sit, out, *extra):
    return ["generate", "--tokenizer", str(tok), "--model", str(sit), "--out", str(out), "--device", "cpu",
            "--num-images", "2", "--steps", "2", *extra]


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _fortran_npz(path):
    np.savez(path, arr_0=np.asfortranarray(np.zeros((4, 8, 8, 3), np.uint8)))


HOSTILE = [
    # (case, how to break the inputs, argv maker, exit code, words the one line must hold)
    ("truncated weights", lambda tok, sit, tmp: _truncate(sit / "model.safetensors"),
     lambda tok, sit, tmp: _generate(tok, sit, tmp / "g"), EXIT_BAD_INPUT, "probably truncated"),
    ("config value of the wrong type", lambda tok, sit, tmp: _edit_config(tok, image_size="thirty-two"),
     lambda tok, sit, tmp: ["inspect", str(tok)], EXIT_BAD_INPUT, "'image_size' must be an integer, got 'thirty-two'"),
    ("config missing a field", lambda tok, sit, tmp: _edit_config(tok, codebook_embed_dim=None),
     lambda tok, sit, tmp: ["inspect", str(tok)], EXIT_BAD_INPUT, "built with ctok's defaults: ['codebook_embed_dim'"),
    ("a SiT given as the tokenizer", lambda tok, sit, tmp: None,
     lambda tok, sit, tmp: _generate(sit, sit, tmp / "g"), EXIT_BAD_INPUT, "is a SiT checkpoint, not a tokenizer"),
    ("Fortran-ordered samples", lambda tok, sit, tmp: _fortran_npz(tmp / "s.npz"),
     lambda tok, sit, tmp: ["evaluate", "--samples", str(tmp / "s.npz"), "--ref", str(tmp / "s.npz"),
                            "--feature-network", "test_evaluate:TinyFeatures"], EXIT_BAD_INPUT, "s.npz: image arrays"),
    ("a missing samples file", lambda tok, sit, tmp: None,
     lambda tok, sit, tmp: ["evaluate", "--samples", str(tmp / "none.npz"), "--ref", str(tmp / "none.npz")],
     EXIT_BAD_INPUT, "none.npz"),
    ("a zero batch size", lambda tok, sit, tmp: None,
     lambda tok, sit, tmp: _generate(tok, sit, tmp / "g", "--batch-size", "0"), EXIT_BAD_INPUT,
     "--batch-size must be at least 1, got 0"),
    ("labels the model does not have", lambda tok, sit, tmp: None,
     lambda tok, sit, tmp: _generate(tok, sit, tmp / "g", "--labels", "5,99999"), EXIT_BAD_INPUT, "99999"),
]


@pytest.mark.parametrize("case, breaks, argv, code, words", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_inputs_end_in_one_line(models, tmp_path, capsys, case, breaks, argv, code, words):
    tok, sit = models
    breaks(tok, sit, tmp_path)
    assert main(argv(tok, sit, tmp_path)) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ctok ")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err


def test_a_full_disk_under_generate_is_an_environment_error_and_leaves_no_partial_file(models, tmp_path, capsys,
                                                                                       monkeypatch):
    tok, sit = models
    real_replace = atomic_files.os.replace
    calls = []

    def replace(src, dst):  # the second PNG finds the disk full just as it is moved into place
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", replace)
    assert main(_generate(tok, sit, tmp_path / "g")) == EXIT_ENVIRONMENT
    err = capsys.readouterr().err
    errors = [line[line.index("ctok "):] for line in err.splitlines() if "ctok generate: error" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "free some space" in errors[0]
    assert "Traceback" not in err
    leftovers = [p.name for p in (tmp_path / "g").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    monkeypatch.setattr(atomic_files.os, "replace", real_replace)
    assert main(_generate(tok, sit, tmp_path / "g")) == 0  # the rerun completes the run
    assert len(list((tmp_path / "g" / "images").glob("*.png"))) == 2


def test_a_finished_run_rerun_is_a_no_op_for_generate_and_cache_latents(models, tmp_path, capsys):
    tok, sit = models
    assert main(_generate(tok, sit, tmp_path / "g")) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "g").rglob("*") if p.is_file() and p.name != ".ctok.lock"}
    assert main(_generate(tok, sit, tmp_path / "g")) == 0
    assert before == {p: p.read_bytes() for p in (tmp_path / "g").rglob("*") if p.is_file() and p.name != ".ctok.lock"}
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(images / f"{i}.png")
    argv = ["cache-latents", "--tokenizer", str(tok), "--data", str(images), "--out", str(tmp_path / "c"),
            "--device", "cpu", "--num-workers", "0"]
    assert main(argv) == 0
    index = (tmp_path / "c" / "index.json").read_bytes()
    assert main(argv) == 0
    assert (tmp_path / "c" / "index.json").read_bytes() == index
    captured = capsys.readouterr()
    assert "already holds this finished latent cache: nothing to do" in captured.out + captured.err


def _noise_images(folder, count, seed):
    """``count`` 64-px PNGs of seeded noise in ``folder``: slow enough to encode to interrupt a run."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow
def test_cache_latents_killed_mid_build_resumes_to_the_same_cache(models, tmp_path):

    tok, _ = models
    images = _noise_images(tmp_path / "images", 48, seed=0)

    def argv(out):
        return ["cache-latents", "--tokenizer", str(tok), "--data", str(images), "--out", str(out), "--device", "cpu",
                "--num-workers", "0", "--shard-size", "4", "--batch-size", "2", "--flip"]

    assert main(argv(tmp_path / "whole")) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ctok", *argv(tmp_path / "killed")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (len(list((tmp_path / "killed").glob("shard-*.json"))) < 3 and process.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "index.json").exists(), "the build was not killed mid-way"
    assert subprocess.run([sys.executable, "-m", "ctok", *argv(tmp_path / "killed")], env=env, capture_output=True,
                          timeout=300).returncode == 0

    def files(folder):
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.startswith("shard-")}

    assert files(tmp_path / "killed") == files(tmp_path / "whole") and len(files(tmp_path / "whole")) == 36
    index = [json.loads((tmp_path / d / "index.json").read_text()) for d in ("whole", "killed")]
    assert index[0]["stats"] == index[1]["stats"] and index[0]["shards"] == index[1]["shards"]
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]


def _root_with_mount_namespaces() -> bool:
    return os.geteuid() == 0 and subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _root_with_mount_namespaces(), reason="a small tmpfs needs root and a mount namespace")
def test_a_really_full_disk_under_generate_exits_3_and_leaves_no_partial_file(conformance_dir, tmp_path):

    disk = tmp_path / "disk"
    disk.mkdir()
    models = conformance_dir / "maetok_small", conformance_dir / "sit_small"
    generate = [sys.executable, "-m", "ctok", *_generate(*models, disk / "g", "--batch-size", "8")]
    generate[generate.index("--num-images") + 1] = "400"  # about 4 MB of noisy 64-px PNGs: more than the disk
    script = ('mount -t tmpfs -o size=1m none "$1" && shift && "$@"; echo "rc=$?"; '
              'find "$DISK" -name "*.tmp" | wc -l; find "$DISK" -name "*.png" | wc -l')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISK": str(disk)}
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(disk), *generate], env=env,
                          capture_output=True, text=True, timeout=600)
    rc_line, temporaries, pngs = done.stdout.strip().splitlines()[-3:]
    errors = [line for line in done.stderr.splitlines() if "ctok generate: error" in line]
    assert rc_line == "rc=3" and len(errors) == 1 and "No space left on device" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert int(temporaries) == 0 and 0 < int(pngs) < 400


@pytest.mark.slow
def test_ctrl_c_under_cache_latents_is_one_line_and_the_rerun_finishes(models, tmp_path):

    tok, _ = models
    images = _noise_images(tmp_path / "images", 64, seed=1)
    argv = ["cache-latents", "--tokenizer", str(tok), "--data", str(images), "--out", str(tmp_path / "c"),
            "--device", "cpu", "--num-workers", "0", "--shard-size", "4", "--batch-size", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ctok", *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "c").glob("shard-*.json"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "the build ended before Ctrl-C"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert main(argv) == 0 and (tmp_path / "c" / "index.json").is_file()
