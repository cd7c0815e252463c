"""`ctok demo --quick`: every output exists and decodes, the metrics are finite, a rerun resumes."""
import json
import math

import numpy as np
import pytest
from PIL import Image

import ctok
from ctok.cli import main
from ctok.data.fashion_mnist import find_fashion_mnist


def _fashion_mnist_or_skip():
    try:
        return find_fashion_mnist(download=False)
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    data = _fashion_mnist_or_skip()
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--data", str(data)]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_psnr_db", "test_ssim", "rfid", "random_latent_fid", "gfid", "gfid_no_guidance",
                "class_accuracy", "class_accuracy_no_guidance", "classifier_test_accuracy"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert 0 <= metrics["class_accuracy"] <= 1

    for png in ("reconstructions.png", "samples_by_class.png", "loss_curves.png"):
        with Image.open(out / png) as image:
            image.load()
            assert image.width > 32 and image.height > 32, png
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Generation FID" in page

    samples = np.load(out / "samples" / "samples.npz")["arr_0"]
    assert samples.shape == (100, 32, 32, 3) and samples.dtype == np.uint8
    tok = ctok.load_tokenizer(out / "tokenizer")
    sit = ctok.load_sit(out / "generator")
    assert (sit.num_tokens, sit.in_channels) == (tok.num_tokens, tok.latent_dim)

    # Everything is done: a rerun only rebuilds the report.
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out), "--data", str(data)]) == 0
    log = capsys.readouterr()
    assert "done before" in log.out + log.err


def test_demo_refuses_other_settings_in_the_same_folder(tmp_path, capsys):
    _fashion_mnist_or_skip()
    out = tmp_path / "demo"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"tokenizer_steps": 1}))
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "holds a demo run with other settings" in capsys.readouterr().err
