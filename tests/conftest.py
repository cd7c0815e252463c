"""Test settings: offline hub, the vendored conformance fixtures, small deterministic inputs."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# ctok's own cache (reference features) goes to a folder of this session, not the user's ~/.cache.
os.environ["CTOK_CACHE"] = tempfile.mkdtemp(prefix="ctok-test-cache-")

REPO = Path(__file__).resolve().parents[1]
# The conformance fixtures travel with the repository, so a clone anywhere can run every test. The
# project's machines also hold the originals in ../shared/conformance; test_conformance.py keeps the
# two byte-identical.
CONFORMANCE = Path(__file__).resolve().parent / "fixtures" / "conformance"


def conformance_case(name: str):
    """(config dict, state dict, io dict) of a conformance case, rebuilt from its manifest."""
    import torch

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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a shared 2-core CPU, extra threads only wait
    for each other (7-10x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# -- Fashion-MNIST-shaped data -------------------------------------------------------------------
# Most data tests only need images in Fashion-MNIST's format that a small model can learn from; they
# use drawn shapes, one per class, so that no test depends on a dataset installed on the machine.
# Only the tests whose point is the real data ask for `real_fashion_mnist`, and skip without it.

SYNTHETIC_SPLITS = {"train": 1200, "test": 300}


def draw_fashion_like(n: int, seed: int):
    """``n`` uint8 images (n, 28, 28) of ten drawn shapes, one per class, and their labels (balanced).

    Position, size, brightness and pixel noise vary per image, so a class is a distribution that a
    tokenizer must learn rather than one picture; a linear probe still tells the classes apart.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    # Every run of ten images holds each class once, so even the first few images cover all classes.
    labels = np.concatenate([rng.permutation(10) for _ in range(-(-n // 10))])[:n]
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    images = np.empty((n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        cy, cx = 13.5 + rng.uniform(-3, 3, size=2)
        r = rng.uniform(6, 10)  # half the shape's extent
        w = rng.uniform(1.5, 3)  # stroke half-width
        dy, dx = yy - cy, xx - cx
        inside = np.maximum(abs(dy), abs(dx)) <= r
        dist = np.hypot(dy, dx)
        mask = {
            0: (abs(dy) <= w) & (abs(dx) <= r),  # horizontal bar
            1: (abs(dx) <= w) & (abs(dy) <= r),  # vertical bar
            2: inside,  # filled square
            3: inside & (np.maximum(abs(dy), abs(dx)) >= r - w),  # hollow square
            4: dist <= r,  # disc
            5: (dist <= r) & (dist >= r - w),  # ring
            6: (abs(dy - dx) <= w) & inside,  # diagonal, top left to bottom right
            7: (abs(dy + dx) <= w) & inside,  # diagonal, bottom left to top right
            8: ((abs(dy) <= w) | (abs(dx) <= w)) & inside,  # plus
            9: (dy <= r) & (abs(dx) <= (dy + r) / 2),  # triangle pointing up
        }[int(label)]
        picture = mask * rng.uniform(150, 255) + rng.normal(0, 12, size=(28, 28))
        images[i] = np.clip(picture, 0, 255).round().astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_fashion_like(folder, splits=None, seed: int = 0):
    """The four Fashion-MNIST files of :func:`draw_fashion_like` images in ``folder``; returns it."""
    from ctok.data.fashion_mnist import write_idx

    names = {"train": "train", "test": "t10k"}
    for split, n in (splits or SYNTHETIC_SPLITS).items():
        images, labels = draw_fashion_like(n, seed + (split == "test"))
        write_idx(Path(folder) / f"{names[split]}-images-idx3-ubyte.gz", images)
        write_idx(Path(folder) / f"{names[split]}-labels-idx1-ubyte.gz", labels)
    return Path(folder)


@pytest.fixture(scope="session")
def synthetic_fashion_mnist(tmp_path_factory):
    """A folder in Fashion-MNIST's format (1,200 train and 300 test images of drawn shapes)."""
    return write_fashion_like(tmp_path_factory.mktemp("fashion-like"))


@pytest.fixture(scope="session")
def real_fashion_mnist():
    """The real Fashion-MNIST folder, found the way the demo finds it; the test skips without it."""
    from ctok.data.fashion_mnist import ENV_VAR, find_fashion_mnist

    try:
        return find_fashion_mnist(download=False)
    except FileNotFoundError as err:
        pytest.skip(f"needs the real Fashion-MNIST ({str(err).split('. ')[0]}): `apt-get install "
                    f"dataset-fashion-mnist` or set {ENV_VAR} to a folder with its four files")


def assert_identical(a, b, where: str) -> None:
    """Two checkpoint trees (dicts, lists, tensors, plain values) equal bit for bit, naming the first difference."""
    import torch

    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
