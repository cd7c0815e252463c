"""The tokenizer's latent dashboard (ctok.training.dashboard): what it logs, when, the plot, and
that it leaves training untouched."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from ctok.cli import main
from ctok.models.files import read_weights

SHORT = ["data.batch_size=4", "samples.num_images=2", "loss.perceptual_weight=0", "gan.enabled=false",
         "run.max_steps=6", "run.log_every=2", "run.ckpt_every=6"]
ON = ["eval.every=3", "eval.images=100", "eval.feature_network=fmnist-classifier"]


def _run(out, data, *extra: str) -> list[dict]:
    assert main(["train-tokenizer", "--config", "tiny-maetok", *SHORT, f"data.images={data}",
                 f"run.out_dir={out}", *extra]) == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_dashboard_logs_its_scores_every_n_steps_plots_them_and_leaves_training_unchanged(
        synthetic_fashion_mnist, tmp_path, capsys):
    log = _run(tmp_path / "on", synthetic_fashion_mnist, *ON)
    printed = capsys.readouterr()
    evals = [r for r in log if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [3, 6]
    expected = {"eval/psnr_db", "eval/rfid", "eval/gmm_nll_k1", "eval/gmm_nll_k4", "eval/gmm_nll_k16",
                "eval/probe_mean_pooled", "eval/probe_flattened", "eval/seconds"}
    for record in evals:
        assert set(record) == {"step"} | expected
        assert all(isinstance(record[k], float) and math.isfinite(record[k]) for k in expected)
        assert 0 <= record["eval/probe_flattened"] <= 1 and record["eval/rfid"] >= 0
    # The losses are logged as before, in their own records.
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 6]
    text = printed.out + printed.err
    assert "the first Fashion-MNIST test images" in text and "takes" in text and "s\n" in text
    with Image.open(tmp_path / "on" / "dashboard.png") as image:
        image.load()
        assert image.width > 200 and image.height > 200

    _run(tmp_path / "off", synthetic_fashion_mnist)
    assert not (tmp_path / "off" / "dashboard.png").exists()
    on = read_weights(tmp_path / "on" / "final")
    off = read_weights(tmp_path / "off" / "final")
    assert on.keys() == off.keys()
    for key in on:
        assert on[key].equal(off[key]), key


def test_without_a_feature_network_rfid_is_off_and_the_log_says_so(synthetic_fashion_mnist, tmp_path, capsys):
    log = _run(tmp_path / "run", synthetic_fashion_mnist, "eval.every=6", "eval.images=100", "run.max_steps=6")
    printed = capsys.readouterr()
    assert "no rFID (eval.feature_network is none" in printed.out + printed.err
    (record,) = [r for r in log if "eval/psnr_db" in r]
    assert "eval/rfid" not in record and "eval/gmm_nll_k4" in record


@pytest.mark.parametrize("bad", ["eval.every=-1", "eval.images=3"])
def test_bad_dashboard_settings_are_named(bad, tmp_path, capsys):
    assert main(["train-tokenizer", "--config", "tiny-maetok", f"data.images={tmp_path}",
                 f"run.out_dir={tmp_path / 'run'}", bad]) == 2
    assert "eval.every must be >= 0" in capsys.readouterr().err
