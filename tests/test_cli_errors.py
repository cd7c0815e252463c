"""The CLI's error boundary: one line and an exit code per kind of failure, never a traceback for
what a user or the machine causes."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from ctok.cli import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_INTERRUPTED, main
from ctok.commands import inspect as inspect_command


def _failing(exc):
    def run(args):
        raise exc
    return run


@pytest.mark.parametrize("exc, code, words", [
    (ValueError("--batch-size must be at least 1,\n  got 0"), EXIT_BAD_INPUT, "--batch-size must be at least 1, got 0"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.npz"), EXIT_BAD_INPUT, "/data/x.npz"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/images/000001.png"), EXIT_ENVIRONMENT,
     "No space left on device (/out/images/000001.png): free some space"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/out"), EXIT_ENVIRONMENT, "read-only: choose another"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), EXIT_ENVIRONMENT, "no permission"),
])
def test_each_kind_of_failure_is_one_line_with_its_exit_code(monkeypatch, capsys, exc, code, words):
    monkeypatch.setattr(inspect_command, "run", _failing(exc))
    assert main(["inspect", "x"]) == code
    err = capsys.readouterr().err
    assert err.startswith("ctok inspect: error: ") and words in err and err.count("\n") == 1


def test_a_bug_keeps_its_traceback_and_ctok_debug_shows_every_one(monkeypatch):
    monkeypatch.setattr(inspect_command, "run", _failing(KeyError("internal")))
    with pytest.raises(KeyError):
        main(["inspect", "x"])
    monkeypatch.setattr(inspect_command, "run", _failing(ValueError("bad value")))
    monkeypatch.setenv("CTOK_DEBUG", "1")
    with pytest.raises(ValueError, match="bad value"):
        main(["inspect", "x"])


def test_ctrl_c_ends_with_130_and_says_how_to_resume(monkeypatch, capsys):
    monkeypatch.setattr(inspect_command, "run", _failing(KeyboardInterrupt()))
    assert main(["inspect", "x"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted" in err and "run the same command again to resume" in err and "Traceback" not in err


@pytest.mark.slow
def test_sigint_under_a_real_command_prints_one_line_not_a_traceback(conformance_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("CTOK_DEBUG", None)
    tokenizer = str(conformance_dir / "maetok_small")
    proc = subprocess.Popen([sys.executable, "-m", "ctok", "generate", "--tokenizer", tokenizer,
                             "--model", str(conformance_dir / "sit_small"), "--out", str(tmp_path / "g"),
                             "--device", "cpu", "--num-images", "100000", "--steps", "50", "--batch-size", "4"],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "g" / "generate.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED
    assert "Traceback" not in err and "interrupted" in err


def test_a_zero_batch_is_named_not_divided_by(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (i * 90, 20, 30)).save(tmp_path / "images" / f"{i}.png")
    assert main(["train-tokenizer", "--config", "tiny-maetok", "data.batch_size=0",
                 f"data.images={tmp_path / 'images'}", f"run.out_dir={tmp_path / 'run'}",
                 "run.device=cpu"]) == EXIT_BAD_INPUT
    assert "data.batch_size (the global batch) must be at least 1, got 0" in capsys.readouterr().err
