"""The prepared GPU check: what ctok's multi-GPU users run first, on the GPUs of this machine, as one JSON.

Run through ``scripts/gpu_check.sh`` (which finds or makes the Python environment). Steps, each with
its wall time, exit code, log tail and the peak GPU memory nvidia-smi saw while it ran:

1. ``cuda_tests``: the tests that need a CUDA device.
2. ``cache_latents``: a random-initialised MAETok-B-128 encodes synthetic 256-px images with flips
   (``ctok cache-latents``, bf16): images/s.
3. ``train_sit``: 20 steps of SiT-XL/1 in bf16 with torch.compile under torchrun, one process per GPU
   (NCCL), at the published recipe's per-GPU batch (256 over 8 GPUs = 32 each): samples/s.
4. ``train_tokenizer``: 20 steps of the MAETok-B-128 recipe with the GAN on from step 0 (random-init
   teachers and discriminator: nothing is downloaded), at its per-GPU batch (512 over 8 = 64): samples/s.
5. ``generate``: 256 images from the SiT of step 3 with ``torch.cuda.set_sync_debug_mode("warn")``:
   images/s and the host syncs counted per solver step.
6. ``benchmarks``: ``python -m benchmarks --device cuda --compile --quick``.

``--smoke`` runs the same plumbing on the CPU with the tiny recipes in a minute or two (gloo, fp32):
it is how the script is tested on machines without a GPU; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYNC_WARNING = "called a synchronizing CUDA operation"
STEPS = 20  # training steps per run
GENERATE_STEPS = 50  # solver steps per image in the generate step


class GpuMemoryWatch:
    """The most memory nvidia-smi reports in use on any GPU while the ``with`` block runs (MiB)."""

    def __init__(self):
        self.peak_mib = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = [int(v) for v in out.split() if v.strip().isdigit()]
                if used:
                    self.peak_mib = max(self.peak_mib or 0, max(used))
            except (OSError, subprocess.SubprocessError):
                return
            self._stop.wait(0.5)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run_step(name: str, cmd: list[str], out: Path, env: dict, timeout: float) -> dict:
    """Run one step's command, keeping its whole output in ``out/<name>.log``."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with GpuMemoryWatch() as watch, open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - start
    text = (out / f"{name}.log").read_text(errors="replace")
    print(f"   rc {rc} in {wall:.1f} s", flush=True)
    return {"rc": rc, "wall_s": round(wall, 2), "peak_gpu_memory_mib": watch.peak_mib,
            "log_tail": text[-2000:], "_text": text}


def last_log_record(run_dir: Path) -> dict:
    lines = (run_dir / "log.jsonl").read_text().splitlines() if (run_dir / "log.jsonl").exists() else []
    return json.loads(lines[-1]) if lines else {}


def prepare_inputs(work: Path, smoke: bool) -> None:
    """A random-initialised tokenizer folder and a folder of synthetic images at its resolution."""
    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.latent_caching import write_images
    from benchmarks.tiny_tokenizer import TINY_TOKENIZER
    from ctok.models.tokenizer import Tokenizer, build_tokenizer
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_config(TINY_TOKENIZER) if smoke else build_tokenizer("maetok-b-128")
    tokenizer.save_pretrained(work / "tokenizer")
    write_images(work / "images", 64 if smoke else 1024, tokenizer.image_size, classes=8)


def plan(work: Path, smoke: bool, gpus: int, python: str) -> dict[str, list[str]]:
    """Every step's command line."""
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", "ctok"]
    device = "cpu" if smoke else "cuda"
    common = [f"run.device={device}", f"run.max_steps={2 if smoke else STEPS}", "run.log_every=1",
              "run.sample_every=0", "run.resume=false"]
    sit = ["--config", "tiny-sit" if smoke else "sit-xl", f"tokenizer={work / 'tokenizer'}",
           f"data.latents={work / 'latents'}", f"run.out_dir={work / 'sit'}",
           f"data.batch_size={(4 if smoke else 32) * gpus}",
           f"run.compile={str(not smoke).lower()}", "data.num_workers=2", *common]
    if smoke:
        sit += ["model.num_classes=8"]
    tokenizer = ["--config", "tiny-maetok" if smoke else "maetok-b-128", f"data.images={work / 'images'}",
                 f"run.out_dir={work / 'tokenizer-run'}", f"data.batch_size={(4 if smoke else 64) * gpus}",
                 "gan.start_step=0", "random_init_pretrained=true", "data.num_workers=4", *common]
    generate = ["-c", "import sys, torch; torch.cuda.is_available() and torch.cuda.set_sync_debug_mode('warn'); "
                "from ctok.cli import main; sys.exit(main(sys.argv[1:]))", "generate",
                "--tokenizer", str(work / "tokenizer"), "--model", str(work / "sit" / "final"),
                "--out", str(work / "generated"), "--num-images", "16" if smoke else "256",
                "--batch-size", "8" if smoke else "64", "--steps", str(GENERATE_STEPS), "--solver", "euler",
                "--cfg-scale", "1.5", "--device", device]
    bench_out = work / "benchmarks.md"
    steps = {
        "cuda_tests": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_generate_cuda.py",
                       "tests/test_runner.py", "tests/test_evaluate.py", "tests/test_metrics.py",
                       "tests/test_latent_encoding.py", "-k", "cuda"],
        "cache_latents": [python, "-m", "ctok", "cache-latents", "--tokenizer", str(work / "tokenizer"),
                          "--data", str(work / "images"), "--out", str(work / "latents"), "--flip",
                          "--batch-size", "16" if smoke else "128", "--num-workers", "2", "--device", device],
        "train_sit": [*torchrun, "train-sit", *sit],
        "train_tokenizer": [*torchrun, "train-tokenizer", *tokenizer],
        "generate": [python, "-W", "always::UserWarning", *generate],
        "benchmarks": [python, "-m", "benchmarks", "--device", device, "--quick", "--out", str(bench_out)]
        + ([] if smoke else ["--compile"]),
    }
    if smoke:  # no CUDA test can run, and the benchmark suite has its own test (tests/test_benchmarks.py)
        del steps["cuda_tests"], steps["benchmarks"]
    return steps



def figures(name: str, result: dict, work: Path, smoke: bool) -> dict:
    """What a step measured, read from the files it wrote."""
    if name in ("train_sit", "train_tokenizer"):
        record = last_log_record(work / ("sit" if name == "train_sit" else "tokenizer-run"))
        return {"samples_per_s": record.get("samples_per_s"), "last_log": record}
    if name == "generate":
        images = len(list((work / "generated" / "images").glob("*.png")))
        return {"images": images, "images_per_s": round(images / result["wall_s"], 2) if images else None,
                "host_syncs": result["_text"].count(SYNC_WARNING), "solver_steps": GENERATE_STEPS}
    if name == "benchmarks" and (work / "benchmarks.json").exists():
        return {"result": json.loads((work / "benchmarks.json").read_text())}
    if name == "cache_latents":
        lines = [line for line in result["_text"].splitlines() if "images/s" in line]
        return {"throughput_line": lines[-1].strip() if lines else None}
    return {}


def machine(python: str) -> dict:
    probe = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
             "'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))")
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    info = json.loads(found.stdout) if found.returncode == 0 else {"error": found.stderr[-500:]}
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    return {**info, "python": platform.python_version(), "host": platform.node(), "ctok_commit": sha or None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the JSON, the logs and the runs")
    parser.add_argument("--smoke", action="store_true", help="the same plumbing on the CPU with tiny models")
    parser.add_argument("--only", nargs="*", help="run only these steps (names as in the JSON)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    python = sys.executable
    info = machine(python)
    gpus = 1 if args.smoke else len(info.get("gpus") or [])
    if not gpus:
        print("gpu_check: torch sees no CUDA device (use --smoke for the CPU plumbing check)", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    prepare_inputs(work, args.smoke)
    report = {"machine": info, "smoke": args.smoke, "processes": gpus, "steps": {}}
    for name, cmd in plan(work, args.smoke, gpus, python).items():
        if args.only and name not in args.only:
            continue
        result = run_step(name, cmd, out, env, timeout=600)
        result.update(figures(name, result, work, args.smoke))
        result.pop("_text")
        report["steps"][name] = result
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = [n for n, r in report["steps"].items() if r["rc"] != 0]
    print(f"gpu_check: {len(report['steps']) - len(failed)} of {len(report['steps'])} steps passed; "
          f"figures in {out / 'gpu_check.json'}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
