"""`ctok evaluate` and ctok.metrics.evaluate: sample/reference sets, the statistics cache, the JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ctok.atomic_files import file_sha256
from ctok.cli import main
from ctok.data.images import center_crop_adm
from ctok.downloads import ctok_cache_dir
from ctok.metrics import evaluate, fid, frechet_distance, gaussian_statistics, inception_score, precision_recall, sfid
from ctok.metrics.inception import PUBLISHED_IDENTITY, RANDOM_IDENTITY
from ctok.metrics.reference import cache_path
from ctok.metrics.sample_npz import NpzImages, write_npz_images


class TinyFeatures(torch.nn.Module):
    """A cheap stand-in feature network: pooled pixels through a fixed random projection."""

    def __init__(self, spatial: bool = True, logits: bool = True):
        super().__init__()
        self.register_buffer("proj", torch.randn(48, 12, generator=torch.Generator().manual_seed(0)))
        self.spatial, self.logits = spatial, logits
        self.identity = "tiny-test-features-v1"

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(x, 4)
        pool = torch.tanh(pooled.flatten(1) @ self.proj)
        out = {"pool": pool}
        if self.spatial:
            out["spatial"] = pooled  # 4-D on purpose: the evaluator flattens it
        if self.logits:
            out["logits"] = 3 * pool[:, :10]
        return out


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3): random low-frequency images, varied enough for covariances."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (n, 3, 4, 4)).astype(np.float32)
    up = F.interpolate(torch.from_numpy(low), size=(size, size), mode="bilinear", align_corners=False)
    return up.permute(0, 2, 3, 1).round().clamp(0, 255).numpy().astype(np.uint8)


def direct_features(images: np.ndarray, network=None) -> dict[str, np.ndarray]:
    network = network or TinyFeatures()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return {k: v.flatten(1).numpy() for k, v in network(x).items()}


@pytest.fixture
def sets(tmp_path):
    samples, reference = smooth_images(24, 32, seed=1), smooth_images(30, 32, seed=2)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    return tmp_path / "samples.npz", tmp_path / "ref.npz", samples, reference


def test_metrics_equal_direct_computation_on_the_features(sets):
    samples_path, ref_path, samples, reference = sets
    out = evaluate(samples_path, ref_path, TinyFeatures(), batch_size=7, device="cpu", progress=False)
    s, r = direct_features(samples), direct_features(reference)
    assert out["fid"] == pytest.approx(fid(r["pool"], s["pool"]), rel=1e-6)
    assert out["sfid"] == pytest.approx(sfid(r["spatial"], s["spatial"]), rel=1e-6)
    assert out["inception_score"] == pytest.approx(inception_score(s["logits"], splits=1), rel=1e-6)
    assert (out["precision"], out["recall"]) == pytest.approx(precision_recall(r["pool"], s["pool"], device="cpu"))
    assert out["num_samples"] == 24 and out["num_reference"] == 30
    assert out["feature_network"] == {"identity": "tiny-test-features-v1", "published_inception": False}
    assert out["unavailable"] == {}


def test_samples_against_themselves(sets):
    samples_path = sets[0]
    out = evaluate(samples_path, samples_path, TinyFeatures(), device="cpu", progress=False)
    assert out["fid"] == pytest.approx(0.0, abs=1e-9)
    assert out["precision"] == out["recall"] == 1.0


def test_reference_statistics_are_cached_in_ctoks_cache_folder_and_reused(sets):
    samples_path, ref_path, _, reference = sets
    beside = sorted(p.name for p in ref_path.parent.iterdir())
    first = evaluate(samples_path, ref_path, TinyFeatures(), device="cpu", progress=False)
    cache = cache_path(ref_path, "tiny-test-features-v1")
    assert cache.is_file() and cache.parent == ctok_cache_dir() / "reference-features"
    assert cache.name.startswith(file_sha256(ref_path)[:32])  # named by the reference's content
    assert sorted(p.name for p in ref_path.parent.iterdir()) == beside  # nothing written beside the reference
    assert "cached in" in first["reference"]["statistics"]
    with np.load(cache) as stored:
        np.testing.assert_allclose(stored["pool"], direct_features(reference)["pool"], rtol=1e-6)
    second = evaluate(samples_path, ref_path, TinyFeatures(), device="cpu", progress=False)
    assert second["reference"]["statistics"].startswith("computed from the images, cached in")
    assert second["fid"] == first["fid"]
    # New reference images invalidate the cache.
    np.savez(ref_path, arr_0=reference[::-1][:20])
    third = evaluate(samples_path, ref_path, TinyFeatures(), device="cpu", progress=False)
    assert third["num_reference"] == 20 and third["fid"] != first["fid"]


def test_metrics_without_network_outputs_are_null_with_the_reason(sets):
    samples_path, ref_path, _, _ = sets
    out = evaluate(samples_path, ref_path, TinyFeatures(spatial=False, logits=False), device="cpu",
                   progress=False, use_cache=False)
    assert out["sfid"] is None and out["inception_score"] is None
    assert "no 'spatial'" in out["unavailable"]["sfid"]
    assert "no 'logits'" in out["unavailable"]["inception_score"]
    assert out["fid"] is not None


def test_stored_adm_statistics_are_used_only_for_the_published_inception(sets, tmp_path):
    samples_path, _, samples, reference = sets
    rng = np.random.default_rng(3)
    stored = {"mu": rng.standard_normal(12), "sigma": np.cov(rng.standard_normal((100, 12)), rowvar=False)}
    adm_ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm_ref, arr_0=reference, **stored)
    s, r = direct_features(samples), direct_features(reference)

    other = evaluate(samples_path, adm_ref, TinyFeatures(), device="cpu", progress=False, use_cache=False)
    assert other["fid"] == pytest.approx(fid(r["pool"], s["pool"]), rel=1e-6)

    published = TinyFeatures()
    published.identity = PUBLISHED_IDENTITY  # pretend: these are the TF graph's features
    out = evaluate(samples_path, adm_ref, published, device="cpu", progress=False, use_cache=False)
    assert out["fid"] == pytest.approx(frechet_distance(*gaussian_statistics(s["pool"]), stored["mu"], stored["sigma"]))
    assert out["precision"] == pytest.approx(precision_recall(r["pool"], s["pool"], device="cpu")[0])
    # No stored mu_s / sigma_s: the spatial statistics come from arr_0.
    assert out["sfid"] == pytest.approx(sfid(r["spatial"], s["spatial"]), rel=1e-6)
    assert "stored in VIRTUAL_ref.npz" in out["reference"]["statistics"]


def test_a_statistics_only_reference_needs_the_published_inception(sets, tmp_path):
    samples_path, _, samples, _ = sets
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=np.zeros(12), sigma=np.eye(12), mu_s=np.zeros(48), sigma_s=np.eye(48))
    with pytest.raises(ValueError, match="needs the reference images"):
        evaluate(samples_path, stats_only, TinyFeatures(), device="cpu", progress=False)
    published = TinyFeatures()
    published.identity = PUBLISHED_IDENTITY
    out = evaluate(samples_path, stats_only, published, device="cpu", progress=False)
    assert out["fid"] is not None and out["sfid"] is not None
    assert out["precision"] is None and "statistics only" in out["unavailable"]["precision"]
    assert out["num_reference"] is None


def test_folder_reference_is_centre_cropped_to_the_sample_size(sets, tmp_path):
    samples_path, _, samples, _ = sets
    folder = tmp_path / "ref_images"
    folder.mkdir()
    crops = []
    for i, (h, w) in enumerate([(40, 56), (64, 48), (33, 70), (90, 90), (48, 40), (50, 64)]):
        image = Image.fromarray(smooth_images(1, 96, seed=10 + i)[0][:h, :w])
        image.save(folder / f"{i}.png")
        crops.append(np.asarray(center_crop_adm(image, 32)))
    out = evaluate(samples_path, folder, TinyFeatures(), device="cpu", progress=False, num_workers=0)
    expected = fid(direct_features(np.stack(crops))["pool"], direct_features(samples)["pool"])
    assert out["num_reference"] == 6
    assert out["fid"] == pytest.approx(expected, rel=1e-6)
    assert cache_path(folder, "tiny-test-features-v1").is_file()


def test_cli_with_a_user_feature_network_writes_json(sets, capsys):
    samples_path, ref_path, _, _ = sets
    out_json = samples_path.parent / "metrics.json"
    code = main(["evaluate", "--samples", str(samples_path), "--ref", str(ref_path), "--out", str(out_json),
                 "--feature-network", "test_evaluate:TinyFeatures", "--device", "cpu", "--batch-size", "5"])
    assert code == 0
    results = json.loads(out_json.read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "num_samples", "num_reference"):
        assert key in results
    assert results["feature_network"]["identity"] == "tiny-test-features-v1"
    printed = capsys.readouterr().out
    assert "FID" in printed and str(out_json) in printed


@pytest.mark.slow
def test_cli_with_random_inception_runs_the_whole_pipeline_on_cpu(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=smooth_images(6, 32, seed=5))
    np.savez(tmp_path / "ref.npz", arr_0=smooth_images(8, 48, seed=6))
    code = main(["evaluate", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
                 "--inception-weights", "random", "--device", "cpu", "--batch-size", "4"])
    assert code == 0
    results = json.loads((tmp_path / "samples.eval.json").read_text())
    assert results["feature_network"] == {"identity": RANDOM_IDENTITY, "published_inception": False}
    assert results["num_samples"] == 6 and results["num_reference"] == 8
    assert results["fid"] > 0 and results["sfid"] > 0 and results["inception_score"] >= 1
    assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
    assert results["unavailable"] == {}


def test_cli_reports_bad_input_as_one_line(sets, capsys):
    samples_path, ref_path, _, _ = sets
    assert main(["evaluate", "--samples", str(samples_path.with_name("none.npz")), "--ref", str(ref_path),
                 "--feature-network", "test_evaluate:TinyFeatures"]) == 2
    assert "no image set at" in capsys.readouterr().err
    assert main(["evaluate", "--samples", str(samples_path), "--ref", str(ref_path),
                 "--feature-network", "no_such_module:factory"]) == 2
    assert "no_such_module" in capsys.readouterr().err
    np.savez(samples_path, arr_0=np.zeros((4, 8, 8), dtype=np.float32))
    assert main(["evaluate", "--samples", str(samples_path), "--ref", str(ref_path),
                 "--feature-network", "test_evaluate:TinyFeatures"]) == 2
    assert "uint8 RGB images (N, H, W, 3)" in capsys.readouterr().err



@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_up_front(sets, capsys):
    samples_path, ref_path, _, _ = sets
    assert main(["evaluate", "--samples", str(samples_path), "--ref", str(ref_path),
                 "--feature-network", "test_evaluate:TinyFeatures", "--device", "cuda"]) == 2
    assert "device 'cuda' asks for a GPU, but torch sees no CUDA device here" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda'"):
        evaluate(samples_path, ref_path, TinyFeatures(), device="gpu")


def test_the_default_device_is_auto(sets):
    samples_path, ref_path, _, _ = sets
    auto = evaluate(samples_path, ref_path, TinyFeatures(), progress=False, use_cache=False, num_workers=0)
    cpu = evaluate(samples_path, ref_path, TinyFeatures(), device="cpu", progress=False, use_cache=False)
    assert auto["fid"] == pytest.approx(cpu["fid"], rel=1e-4)

# -- ADM batch files ---------------------------------------------------------------------------

def test_npz_images_stream_in_batches_and_round_trip(tmp_path):
    images = smooth_images(7, 16, seed=7)
    path = write_npz_images(tmp_path / "out.npz", [images[:3], images[3:]], count=7)
    np.testing.assert_array_equal(np.load(path)["arr_0"], images)
    batches = list(NpzImages(path).batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images, arr_1=np.arange(7))
    np.testing.assert_array_equal(np.concatenate(list(NpzImages(tmp_path / "compressed.npz").batches(4))), images)
    with pytest.raises(ValueError, match="expected 8 images, got 7"):
        write_npz_images(tmp_path / "short.npz", [images], count=8)
    assert not (tmp_path / "short.npz").exists()
