"""The evaluation protocol holds whatever the batching: `ctok evaluate` gives the same numbers at any
batch size and number of loader workers (a peer project's rFID moved from 1.88 to 3.96 with it)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ctok.cli import main

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3) images with structure at several scales, so features vary."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3))
    for i in range(n):
        f = rng.uniform(1, 6, (3, 2))
        phase = rng.uniform(0, 6.3, (3, 1, 1))
        out[i] = np.moveaxis(np.sin(f[:, :1, None] * 6.3 * xx + phase) * np.cos(f[:, 1:, None] * 6.3 * yy), 0, -1)
    return ((out + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


@pytest.mark.slow
def test_evaluate_is_batch_and_worker_invariant(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, image in enumerate(smooth_images(12, 40, seed=1)):
        Image.fromarray(image).save(samples / f"{i:03d}.png")
    np.savez(tmp_path / "ref.npz", arr_0=smooth_images(14, 40, seed=2))
    results = []
    for batch_size, workers in ((1, 0), (5, 2), (64, 0)):
        out = tmp_path / f"eval-{batch_size}-{workers}.json"
        assert main(["evaluate", "--samples", str(samples), "--ref", str(tmp_path / "ref.npz"), "--out", str(out),
                     "--inception-weights", "random", "--device", "cpu", "--batch-size", str(batch_size),
                     "--num-workers", str(workers), "--no-cache", "--k", "2"]) == 0
        results.append(json.loads(out.read_text()))
    first = results[0]
    assert all(first[m] is not None and np.isfinite(first[m]) for m in METRICS)
    assert 0 < first["precision"] < 1 or 0 < first["recall"] < 1  # a case where neighbourhoods matter
    for other in results[1:]:
        for metric in METRICS:
            assert other[metric] == pytest.approx(first[metric], rel=1e-6, abs=1e-9), metric


def test_a_protocol_card_fills_in_the_environment():
    import torch

    import ctok
    from ctok.protocol import ADM_PROTOCOL, ProtocolCard

    torch.backends.cuda.matmul.fp32_precision, before = "tf32", torch.backends.cuda.matmul.fp32_precision
    try:
        card = ProtocolCard.here("cpu", num_samples=10, seed=3).to_dict()
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    assert card["protocol"] == ADM_PROTOCOL and card["num_samples"] == 10 and card["seed"] == 3
    assert card["device"].startswith("cpu (") and card["dtype"] == "float32"
    assert card["torch_version"] == torch.__version__ and card["ctok_version"] == ctok.__version__
    assert card["float32_modes"]["cuda.matmul"] == "tf32"  # the state the card was made under, recorded as it was
    assert card["sampler"] is None and card["feature_network"] is None  # null where a field does not apply
    json.dumps(card)


def test_fewer_than_50k_samples_against_imagenet_get_a_one_line_warning():
    from ctok.protocol import few_samples_warning

    message = few_samples_warning(10_000, "refs/VIRTUAL_imagenet256_labeled.npz")
    assert message and "\n" not in message and "50,000" in message and "10000 samples" in message
    assert few_samples_warning(50_000, "VIRTUAL_imagenet256_labeled.npz") is None
    assert few_samples_warning(100, "fashion-mnist-test.npz") is None


def test_generate_json_carries_the_protocol_card_and_a_resume_ignores_the_environment(conformance_dir, tmp_path):
    out = tmp_path / "run"
    command = ["generate", "--tokenizer", str(conformance_dir / "maetok_small"), "--model",
               str(conformance_dir / "sit_small"), "--out", str(out), "--device", "cpu", "--num-images", "3",
               "--steps", "5", "--solver", "heun", "--cfg-scale", "2", "--guidance-interval", "0", "0.5",
               "--seed", "4"]
    assert main(command) == 0
    settings = json.loads((out / "generate.json").read_text())
    card = settings["protocol"]
    # Heun over 5 steps from t = 1.0, 0.8, 0.6, 0.4, 0.2: two forwards a step, one on the last; the steps
    # starting inside [0, 0.5] are guided and count twice: 2 + 2 + 2 + 2 x 2 + 1 x 2 = 12.
    assert card["sampler"] == {"model": "sit", "num_steps": 5, "solver": "heun", "cfg_scale": 2.0,
                               "guidance_interval": [0.0, 0.5], "path_type": "linear", "nfe_per_sample": 12}
    assert (card["num_samples"], card["seed"], card["quantisation"]) == (3, 4, "round-half-up")
    assert card["label_scheme"].startswith("class-balanced") and card["ctok_version"]
    # A resumed run on another machine has another card; the settings are what must match.
    settings["protocol"]["device"] = "cuda:0 (elsewhere)"
    (out / "generate.json").write_text(json.dumps(settings))
    assert main(command) == 0
    assert main([*command[:-2], "--seed", "5"]) == 2  # a real change is still refused


def test_evaluate_json_carries_the_protocol_card(tmp_path):
    from test_evaluate import smooth_images as small_images

    np.savez(tmp_path / "s.npz", arr_0=small_images(12, 32, seed=1))
    np.savez(tmp_path / "r.npz", arr_0=small_images(14, 32, seed=2))
    assert main(["evaluate", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"),
                 "--feature-network", "test_evaluate:TinyFeatures", "--device", "cpu", "--pr-float32"]) == 0
    results = json.loads((tmp_path / "s.eval.json").read_text())
    card = results["protocol"]
    assert (card["feature_network"], card["num_samples"], card["num_reference"]) == ("tiny-test-features-v1", 12, 14)
    assert card["precision_recall"] == "float32, k=3" and card["device"].startswith("cpu")
    assert set(card["float32_modes"]) == {"cuda.matmul", "cudnn.conv", "mkldnn.matmul", "mkldnn.conv"}
    assert results["warnings"] == []  # not an ImageNet reference
