"""One writer per output folder: an advisory lock that a second process meets with a clear error.

Every command that fills a folder (``generate``, ``reconstruct``, ``cache-latents``, the trainers,
the demo) holds :func:`folder_lock` on it while it works. The lock is ``flock`` on a file
``.ctok.lock`` inside the folder, which records the holder's PID: the kernel releases it when the
holder exits, however it exits, so a lock left by a killed process never blocks a rerun (the file
stays; only a live holder counts). Under torchrun the first process of a job holds it for all.

A ``flock`` belongs to the open file, which a forked child shares: DataLoader workers, forked by a
trainer that holds the lock, would keep it held after the trainer is killed, until they notice
their parent is gone (seconds later), and a rerun started at once would be refused. So a forked
child closes its copies of the held locks' descriptors (:func:`os.register_at_fork`); a child
started by ``exec`` never gets them (Python opens them close-on-exec).
"""
from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".ctok.lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class FolderInUse(OSError):
    """Another live process holds the folder's lock (errno EBUSY; the CLI exits with 3)."""


@contextmanager
def folder_lock(folder: str | os.PathLike, *, hold: bool = True) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, creating the folder; ``hold=False`` does nothing (the
    other processes of a distributed job, whose first process holds it).

    Raises FolderInUse naming the holder's PID when another live process holds it.
    """
    if not hold:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            message = f"{folder} is being written by another ctok process (PID {holder})"
            raise FolderInUse(errno.EBUSY, message) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(fd)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # closing the descriptor releases the lock
