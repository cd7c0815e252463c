"""One writer per output folder: a second process is stopped with the holder's PID; a lock left by a
killed process never blocks a rerun."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ctok.cli import EXIT_ENVIRONMENT, main
from ctok.locking import LOCK_NAME, FolderInUse, folder_lock

HOLD = ("import sys, time; from ctok.locking import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_stopped_naming_the_holder_and_a_killed_holder_leaves_no_block(tmp_path):
    proc = _holder(tmp_path / "out")
    try:
        with pytest.raises(FolderInUse, match=rf"being written by another ctok process \(PID {proc.pid}\)"):
            with folder_lock(tmp_path / "out"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "out" / LOCK_NAME).exists()  # the stale file stays, and does not matter
    with folder_lock(tmp_path / "out"):
        assert (tmp_path / "out" / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_the_cli_reports_a_busy_folder_as_an_environment_failure(conformance_dir, tmp_path, capsys):
    proc = _holder(tmp_path / "g")
    try:
        code = main(["generate", "--tokenizer", str(conformance_dir / "maetok_small"), "--model",
                     str(conformance_dir / "sit_small"), "--out", str(tmp_path / "g"), "--device", "cpu",
                     "--num-images", "2", "--steps", "2"])
    finally:
        proc.kill()
        proc.wait()
    assert code == EXIT_ENVIRONMENT
    err = capsys.readouterr().err
    assert f"PID {proc.pid}" in err and "wait for it to finish, or choose another output folder" in err
    assert err.count("\n") == 1


def test_other_processes_of_a_job_do_not_take_the_lock(tmp_path):
    proc = _holder(tmp_path / "out")
    try:
        with folder_lock(tmp_path / "out", hold=False):  # a torchrun rank > 0 of the holder's job
            time.sleep(0)
    finally:
        proc.kill()
        proc.wait()


FORK_AND_HOLD = ("import os, sys, time; from ctok.locking import folder_lock\n"
                 "with folder_lock(sys.argv[1]):\n"
                 "    child = os.fork()\n"
                 "    if child == 0:\n        time.sleep(60); os._exit(0)\n"
                 "    print(child, flush=True); time.sleep(60)")


def test_a_killed_holders_forked_children_do_not_keep_the_folder_locked(tmp_path):
    """A trainer's DataLoader workers are forked while it holds the lock and outlive a kill -9 for a
    few seconds: a rerun started at once must get the folder all the same."""
    proc = subprocess.Popen([sys.executable, "-c", FORK_AND_HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE,
                            text=True)
    child = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the forked child is still alive
        with folder_lock(tmp_path / "out"):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
