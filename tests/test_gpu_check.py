"""scripts/gpu_check.sh: the GPU check's plan names what the GPU run must cover, and its plumbing runs (CPU smoke)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def test_the_gpu_plan_trains_sit_xl_compiled_under_torchrun_on_every_gpu(tmp_path):
    steps = gpu_check.plan(tmp_path, smoke=False, gpus=4, python="python")
    assert list(steps) == ["cuda_tests", "cache_latents", "train_sit", "train_tokenizer", "generate", "benchmarks"]
    sit = " ".join(steps["train_sit"])
    assert "torch.distributed.run" in sit and "--nproc_per_node=4" in sit
    assert "--config sit-xl" in sit and "run.compile=true" in sit and "run.device=cuda" in sit
    assert f"run.max_steps={gpu_check.STEPS}" in sit and "data.batch_size=128" in sit  # 32 per GPU, as 256 over 8
    tokenizer = " ".join(steps["train_tokenizer"])
    assert "--config maetok-b-128" in tokenizer and "gan.start_step=0" in tokenizer
    assert "random_init_pretrained=true" in tokenizer  # nothing to download on the GPU machine
    assert "set_sync_debug_mode('warn')" in " ".join(steps["generate"])
    assert "--num-images 256" in " ".join(steps["generate"])
    assert steps["benchmarks"][1:3] == ["-m", "benchmarks"] and "--compile" in steps["benchmarks"]
    assert steps["benchmarks"][steps["benchmarks"].index("--device") + 1] == "cuda"


@pytest.mark.slow
def test_the_smoke_run_goes_through_every_step_and_writes_its_figures(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] is True
    assert set(report["steps"]) == {"cache_latents", "train_sit", "train_tokenizer", "generate"}
    assert all(step["rc"] == 0 for step in report["steps"].values())
    assert report["steps"]["train_sit"]["samples_per_s"] > 0
    assert report["steps"]["train_tokenizer"]["last_log"]["step"] == 2
    assert report["steps"]["generate"]["images"] == 16
    assert (out / "work" / "sit" / "final" / "config.json").is_file()
