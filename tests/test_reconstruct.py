"""`ctok reconstruct`: the reconstructions, the metrics against independent computations, the grid, torchrun."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from ctok.cli import main
from ctok.data.images import center_crop_adm, pil_to_tensor
from ctok.loading import load_tokenizer
from ctok.metrics import fid
from ctok.models.tokenizer import Tokenizer
from test_evaluate import TinyFeatures

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A random tiny SoftVQ tokenizer (32 px) saved as a checkpoint folder."""
    torch.manual_seed(0)
    return Tokenizer.from_config(TINY_TOKENIZER).save_pretrained(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Five images of different sizes and aspect ratios."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(70, 90), (128, 96), (64, 64), (100, 150), (81, 77)]):
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([(xx * (3 + i)) % 256, (yy * (2 + i)) % 256, ((xx + yy) * 5) % 256], -1)
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture
def no_vgg(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CTOK_VGG16_WEIGHTS", raising=False)


def expected_reconstructions(tokenizer_dir, folder: Path, count: int):
    """Crops and reconstructions (uint8 NHWC), computed here from the definition of the command."""
    tokenizer = load_tokenizer(tokenizer_dir)
    size = tokenizer.image_size
    crops = [center_crop_adm(Image.open(p).convert("RGB"), size) for p in sorted(folder.iterdir())[:count]]
    x = torch.stack([pil_to_tensor(c) for c in crops])
    with torch.no_grad():
        rec = tokenizer.decode(tokenizer.encode(x))
    to_uint8 = lambda t: ((t + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # noqa: E731
    return to_uint8(x), to_uint8(rec)


def run_reconstruct(tokenizer_dir, folder, out, *extra):
    return main(["reconstruct", "--tokenizer", str(tokenizer_dir), "--data", str(folder), "--out", str(out),
                 "--device", "cpu", "--num-workers", "0", *extra])


def test_reconstruct_writes_reconstructions_metrics_and_grid(tokenizer_dir, image_folder, tmp_path, no_vgg):
    out = tmp_path / "out"
    code = run_reconstruct(tokenizer_dir, image_folder, out, "--image-size", "32", "--limit", "4",
                           "--batch-size", "3", "--feature-network", "test_evaluate:TinyFeatures")
    assert code == 0
    crops, expected = expected_reconstructions(tokenizer_dir, image_folder, 4)
    reconstructions = np.load(out / "reconstructions.npz")["arr_0"]
    assert reconstructions.shape == (4, 32, 32, 3) and reconstructions.dtype == np.uint8
    # Batching may move a value across a rounding boundary, nothing more.
    assert np.abs(reconstructions.astype(int) - expected).max() <= 1
    assert (reconstructions == expected).mean() > 0.99

    results = json.loads((out / "metrics.json").read_text())
    assert results["num_images"] == 4 and results["image_size"] == 32 and results["skipped_files"] == []
    psnr = np.mean([peak_signal_noise_ratio(c, r, data_range=255) for c, r in zip(crops, reconstructions)])
    ssim = np.mean([structural_similarity(c, r, channel_axis=-1, data_range=255)
                    for c, r in zip(crops, reconstructions)])
    assert results["psnr"] == pytest.approx(psnr, rel=1e-9)
    assert results["ssim"] == pytest.approx(ssim, rel=1e-9)
    network = TinyFeatures()
    features = [network(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1)["pool"].detach()
                for a in (crops, reconstructions)]
    assert results["rfid"] == pytest.approx(fid(*features), rel=1e-5)
    assert results["lpips"] is None and "alexnet-owt-7be5be79.pth" in results["unavailable"]["lpips"]
    card = results["protocol"]
    assert (card["lpips"], card["ssim"], card["quantisation"], card["num_samples"]) == (
        "alex", "standard", "round-half-up", results["num_images"])
    assert card["feature_network"] == results["feature_network"]["identity"] and card["sampler"] is None
    assert results["tokenizer"]["identity"] == load_tokenizer(tokenizer_dir).identity()
    assert results["feature_network"]["identity"] == "tiny-test-features-v1"

    with Image.open(out / "reconstructions.png") as grid:
        assert grid.size == (8 * 34 + 2, 34 + 2)  # 4 pairs side by side, one row, 2 px padding
        pixels = np.asarray(grid)
        np.testing.assert_array_equal(pixels[2:34, 2:34], crops[0])  # the first original, then its reconstruction
        np.testing.assert_array_equal(pixels[2:34, 36:68], reconstructions[0])
    assert not (out / ".shards").exists()


def test_image_size_other_than_the_tokenizers_is_refused(tokenizer_dir, image_folder, tmp_path, capsys):
    code = run_reconstruct(tokenizer_dir, image_folder, tmp_path / "out", "--image-size", "256",
                           "--feature-network", "test_evaluate:TinyFeatures")
    assert code == 2
    assert "--image-size 256 differs from the tokenizer's image size 32" in capsys.readouterr().err


@pytest.mark.slow
def test_reconstruct_with_random_inception_on_cpu(tokenizer_dir, image_folder, tmp_path, no_vgg):
    out = tmp_path / "out"
    assert run_reconstruct(tokenizer_dir, image_folder, out, "--inception-weights", "random",
                           "--batch-size", "5") == 0
    results = json.loads((out / "metrics.json").read_text())
    assert results["num_images"] == 5 and np.isfinite(results["rfid"]) and results["rfid"] > 0
    assert "NOT comparable" in results["feature_network"]["identity"]


@pytest.mark.slow
def test_two_torchrun_processes_give_the_single_process_result(tokenizer_dir, image_folder, tmp_path, no_vgg):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    common = ["--tokenizer", str(tokenizer_dir), "--data", str(image_folder), "--device", "cpu", "--num-workers", "0",
              "--batch-size", "2", "--feature-network", "test_evaluate:TinyFeatures"]
    assert main(["reconstruct", "--out", str(single), *common]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "ctok", "reconstruct", "--out", str(sharded), *common],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (single, sharded))
    assert b["num_images"] == a["num_images"] == 5
    for key in ("rfid", "psnr", "ssim"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    ra, rb = (np.load(d / "reconstructions.npz")["arr_0"] for d in (single, sharded))
    assert np.abs(ra.astype(int) - rb).max() <= 1


def test_reconstruct_folder_writes_the_files_of_the_command(tokenizer_dir, image_folder, tmp_path, no_vgg):
    """The library function called directly gives the command's files, byte for byte."""
    from ctok.locking import LOCK_NAME
    from ctok.reconstruction import reconstruct_folder

    cli = tmp_path / "cli"
    assert run_reconstruct(tokenizer_dir, image_folder, cli, "--limit", "4", "--batch-size", "3",
                           "--grid-images", "3", "--feature-network", "test_evaluate:TinyFeatures") == 0
    direct = tmp_path / "direct"
    results = reconstruct_folder(load_tokenizer(tokenizer_dir), image_folder, direct, feature_network=TinyFeatures(),
                                 limit=4, batch_size=3, num_workers=0, grid_images=3,
                                 tokenizer_source=str(tokenizer_dir))
    assert results == json.loads((direct / "metrics.json").read_text())
    for name in ("metrics.json", "reconstructions.npz", "reconstructions.png"):
        assert (direct / name).read_bytes() == (cli / name).read_bytes(), name
    assert sorted(p.name for p in direct.iterdir()) == [LOCK_NAME, "metrics.json", "reconstructions.npz",
                                                        "reconstructions.png"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be at least 1, got 0"),
    (dict(grid_images=0), "grid_images must be at least 1, got 0"),
    (dict(limit=1), "limit must be at least 2 (rFID needs a covariance), got 1"),
])
def test_reconstruct_folder_refuses_bad_arguments(tokenizer_dir, image_folder, tmp_path, kwargs, message):
    from ctok.reconstruction import reconstruct_folder

    with pytest.raises(ValueError, match=re.escape(message)):
        reconstruct_folder(load_tokenizer(tokenizer_dir), image_folder, tmp_path, feature_network=TinyFeatures(),
                           **kwargs)
    assert not list(tmp_path.iterdir())
