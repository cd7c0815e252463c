"""Writing files, and fingerprinting them: the one home of every file-writing helper in ctok.

Every file appears whole or not at all: it is written to a temporary file beside the target, then
renamed. A process killed mid-write (kill -9, a full disk, a pre-empted node) leaves the previous
version or nothing, never a truncated checkpoint, metrics file or image that a later run would trust.
JSON, PNG files and image grids are written through :func:`atomic_write`, folders of files that belong
together (an ONNX export) through :func:`atomic_folder`; :func:`file_sha256` and
:func:`weights_sha256` fingerprint what was written.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it is synced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp creates the file 0600; give it the permissions a plain open() would have.
    os.fchmod(fd, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder next to ``path`` to fill; on success it is renamed onto ``path``.

    ``path`` must not exist or be an empty folder (a rename cannot replace a full one). On an
    error the temporary folder and everything in it are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        # mkdtemp creates the folder 0700; give it the permissions a plain mkdir() would have.
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for file in (p for p in tmp.rglob("*") if p.is_file()):  # the contents reach the disk before the name
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    _sync_folder(path.parent)


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it reaches the disk too and a power cut cannot undo it."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str | Path, data, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write ``data`` as JSON with a final newline; the file appears whole or not at all."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=indent, sort_keys=sort_keys)
        f.write("\n")


def save_png(path: str | Path, image, *, scale: int = 1) -> None:
    """Write a uint8 (H, W, 3) array as a PNG (atomically), enlarged ``scale`` times without smoothing."""
    from PIL import Image

    picture = Image.fromarray(image)
    if scale != 1:
        # Nearest-neighbour keeps every pixel a sharp block, so small images stay legible in a report.
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    with atomic_write(path) as f:
        picture.save(f, format="PNG")


def save_image_grid(path: str | Path, images, *, nrow: int, padding: int = 2, pad_value: int = 0) -> None:
    """Write uint8 images (B, 3, H, W) as one PNG grid of ``nrow`` per row (torchvision's layout), atomically."""
    from torchvision.utils import make_grid

    grid = make_grid(images.cpu(), nrow=nrow, padding=padding, pad_value=pad_value)
    save_png(path, grid.permute(1, 2, 0).numpy())


def _hash_into(digest, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of one file, read in chunks so that multi-gigabyte weights never sit in memory."""
    digest = hashlib.sha256()
    _hash_into(digest, Path(path))
    return digest.hexdigest()


def weights_sha256(folder: str | os.PathLike) -> str:
    """One SHA-256 over a checkpoint folder's weight files (name, then content, in name order).

    Names are part of the digest so that renaming or swapping two files changes it too.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin")):
        digest.update(path.name.encode())
        _hash_into(digest, path)
    return digest.hexdigest()


def save_figure(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Write a matplotlib figure as a PNG (laid out tightly, atomically) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)
