"""The benchmark suite: paired timing, the GEMM-relative share, and the one command end to end."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.measure import Gemm, paired_ratio, throughput, timed_side_by_side
from ctok.training.checkpoint import list_checkpoints
from test_runner import toy_config, toy_data, train

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_side_by_side_timing_runs_in_rounds_and_pairs_them():
    calls = []

    def short():
        calls.append("short")
        time.sleep(0.01)

    def long():
        calls.append("long")
        time.sleep(0.03)

    t = timed_side_by_side({"short": short, "long": long}, CPU, warmup=1, repeats=4)
    assert calls == ["short", "long"] * 5
    assert t["long"]["repeats"] == 4 and len(t["long"]["times"]) == 4
    assert paired_ratio(t["long"], t["short"]) == pytest.approx(3.0, rel=0.3)


def test_a_gemm_row_runs_at_about_the_gemm_rate():
    gemm = Gemm(CPU, size=256)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    row = throughput("matmul", lambda: a @ b, 2, CPU, gemm, repeats=5)
    assert row["gflop_per_item"] == pytest.approx(2 * 256**3 / 2 / 1e9)
    # the same work as the yardstick: the paired share is 1 up to timer noise
    assert 0.5 < row["fraction_of_gemm"] < 2.0
    assert row["items_per_s"] == pytest.approx(2 / row["median_s"])


def test_a_throughput_run_writes_no_weights_and_may_resume_a_run_that_did(tmp_path):
    """run.save_weights: false, what the latent-caching benchmark trains with: not even the last step's checkpoint."""
    train(toy_config(tmp_path / "bench", save_weights=False), toy_data())
    assert (tmp_path / "bench" / "log.jsonl").is_file()
    assert not (tmp_path / "bench" / "checkpoints").exists() or not any((tmp_path / "bench" / "checkpoints").iterdir())
    train(toy_config(tmp_path / "run"), toy_data())
    assert [step for step, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [8, 12]
    # the key changes nothing a step computes, so a resumed run may turn it off
    train(toy_config(tmp_path / "run", save_weights=False, max_steps=16), toy_data())
    assert [step for step, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [8, 12]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12, 15, 16]  # continued from step 12, not started afresh


@pytest.mark.slow
def test_the_one_command_writes_the_table_and_its_json(tmp_path):
    out = tmp_path / "bench.md"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    names = [r["name"] for r in result["rows"]]
    for part in ("maetok-b-128 encode", "maetok-b-128 decode", "softvq-l-64 encode", "softvq-l-64 decode",
                 "SiT-XL/1 forward", "SiT-XL/1 sampling", "maetok-b-128 train step", "SiT-XL/1 train step"):
        assert any(n.startswith(part) for n in names), part
    for row in result["rows"]:
        assert row["gflop_per_item"] > 0 and 0 < row["fraction_of_gemm"] < 1.5 and math.isfinite(row["peak_mib"])
    table = out.read_text()
    assert all(f"| {n} |" in table for n in names)
    assert "sampler overhead" in table and "cached latents" in table and "onnxruntime vs PyTorch" in table
    onnx = result["ratios"]["onnxruntime vs PyTorch"]
    for graph in (onnx["tokenizer"]["encoder"], onnx["tokenizer"]["decoder"], onnx["sit"]["forward"]):
        assert graph["ort_over_pytorch"] > 0 and graph["max_abs_diff"] < 1e-3
    overhead = result["ratios"]["sampler overhead"]
    assert {"sit", "dit"} <= set(overhead) and overhead["sit"]["forwards"] > 0
    caching = result["ratios"]["latent caching throughput"]
    assert any(n.startswith("latent caching tiny 32px with flips (fp32)") for n in names)
    assert caching["cache_images_per_s"] > 0 and 0 < caching["cache_share_of_plain_encode"] < 1.5
    # the training-speed comparison leaves no checkpoints or exported weights behind (run.save_weights: false)
    assert result["ratios"]["cached latents vs on-the-fly encoding"]["weight_files_written"] == []
    recompute = result["ratios"]["activation checkpointing"]  # keeps less, for more time
    assert recompute["recomputed"]["peak_mib"] < 0.8 * recompute["plain"]["peak_mib"]
    assert recompute["time_ratio"] > 1.0
