"""``ctok train-sit`` / ``ctok train-dit`` on cached latents of images in Fashion-MNIST's format (drawn shapes).

Covers: bad input stopped before training, the loss falling well below its start, the saved EMA
loading and sampling, resume after ``kill -9``, and 2-process torchrun against 1 process.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ctok
from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from ctok.cli import main
from ctok.data.fashion_mnist import FashionMNIST, load_fashion_mnist
from ctok.latent_cache import build_latent_cache
from ctok.model_card import read_card
from ctok.models.tokenizer import Tokenizer
from ctok.training.checkpoint import list_checkpoints, load_checkpoint
from ctok.training.distributed import init_distributed
from ctok.training.generator_data import choose_latent_stats, stats_subset

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A random tiny tokenizer, and the folder it is saved in."""
    torch.manual_seed(0)
    model = Tokenizer.from_config(TINY_TOKENIZER).eval()
    folder = tmp_path_factory.mktemp("tokenizer")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer):
    return tokenizer[1]


@pytest.fixture(scope="module")
def small_cache(tokenizer, synthetic_fashion_mnist, tmp_path_factory):
    """Latents of the first 16 training images (labels 0..9)."""
    model, folder = tokenizer
    out = tmp_path_factory.mktemp("cache") / "small"
    build_latent_cache(model, FashionMNIST("train", synthetic_fashion_mnist), out, tokenizer_source=str(folder),
                       ctx=init_distributed("cpu"), limit=16, num_workers=0)
    return out


def train_args(command, config, cache, out, *overrides):
    return [command, "--config", config, f"data.latents={cache}", f"run.out_dir={out}", "run.device=cpu", *overrides]


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


# -- bad input: stopped before training, with a message that says what is wrong -------------
@pytest.mark.parametrize("overrides, message", [
    (["model.input_size=16"], "model.input_size is 16 but the latents have 8 tokens (8 x 4)"),
    (["model.in_channels=32"], "model.in_channels is 32 but the latents have 4 channels"),
    (["model.num_classes=9"],
     "has class ids in [0, 9] but model.num_classes is 9: set model.num_classes to at least 10"),
    (["tokenizer=/no/such/tokenizer"], "no checkpoint folder at /no/such/tokenizer"),
    (["data.latents=/no/such/cache"], "/no/such/cache is not a finished latent cache"),
    (["data.images=/somewhere"], "set exactly one of data.latents"),
    (["model.preset=DiT-S/1"], "model.preset 'DiT-S/1' is not a SiT preset"),
    (["data.batch_size=32"], "the dataset has 16 samples, fewer than one global batch of 32"),
])
def test_bad_input_is_refused_before_training(small_cache, tmp_path, capsys, overrides, message):
    code, err = run_cli(train_args("train-sit", "tiny-sit", small_cache, tmp_path / "run", "data.batch_size=8",
                                   *overrides), capsys)
    assert code == 2
    assert message in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_cache_of_another_tokenizer_is_refused(tokenizer_dir, small_cache, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tokenizer_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vq_std": 0.5}))
    code, err = run_cli(train_args("train-dit", "tiny-dit", small_cache, tmp_path / "run", "data.batch_size=8",
                                   f"tokenizer={other}"), capsys)
    assert code == 2
    assert "was made by tokenizer softvq-8x4-" in err and f"not by {other} (softvq-8x4-" in err


# -- training on images' latents ---------------------------------------------------------------
@pytest.fixture(scope="module")
def image_cache(tokenizer_dir, synthetic_fashion_mnist, tmp_path_factory):
    """256 training images and their mirrors, cached by the command line."""
    out = tmp_path_factory.mktemp("cache") / "fmnist"
    assert main(["cache-latents", "--tokenizer", str(tokenizer_dir), "--data", str(synthetic_fashion_mnist),
                 "--out", str(out), "--limit", "256", "--flip", "--num-workers", "0", "--device", "cpu"]) == 0
    return out


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("command, config, load", [("train-sit", "tiny-sit", ctok.load_sit),
                                                   ("train-dit", "tiny-dit", ctok.load_dit)])
def test_tiny_generator_learns_and_its_export_loads(image_cache, tokenizer_dir, tmp_path, command, config, load):
    out = tmp_path / "run"
    assert main(train_args(command, config, image_cache, out, "run.max_steps=120", "run.log_every=20",
                           "run.ckpt_every=120", "run.sample_every=60")) == 0
    losses = [r["loss"] for r in log_records(out)]
    assert losses[-1] < 0.3 * losses[0], losses
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000060.png", "step-00000120.png"]
    exported = json.loads((out / "final" / "config.json").read_text())
    index = json.loads((image_cache / "index.json").read_text())
    assert exported["latent_stats"] == {"mean": index["stats"]["mean"], "std": index["stats"]["std"],
                                        "source": f"latent cache {image_cache}"}
    assert exported["tokenizer"] == {"identity": index["tokenizer"]["identity"], "source": str(tokenizer_dir)}
    card = read_card(out / "final")["ctok"]  # the model card names the resolved config and the tokenizer
    assert card["training_config"]["sha256"] == hashlib.sha256((out / "config.yaml").read_bytes()).hexdigest()
    assert (card["tokenizer"], card["latent_stats"]) == (exported["tokenizer"], exported["latent_stats"])
    model = load(out / "final")
    ema = load_checkpoint(out / "checkpoints" / "step-00000120.pt")["ema"]["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[key]), key
    assert main(["generate", "--model", str(out / "final"), "--tokenizer", str(tokenizer_dir), "--out",
                 str(tmp_path / "generated"), "--num-images", "4", "--steps", "4", "--batch-size", "4",
                 "--device", "cpu"]) == 0
    assert len(list((tmp_path / "generated").rglob("*.png"))) >= 4


# -- exact resume after kill -9, and torchrun ------------------------------------------------
def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    step, path = list_checkpoints(run_dir / "checkpoints")[-1]
    state = load_checkpoint(path)
    flat = {f"model.{k}": v for k, v in state["modules"]["model"].items()}
    flat.update({f"ema.{k}": v for k, v in state["ema"]["model"].items()})
    for i, s in state["optimizers"]["model"]["state"].items():
        flat.update({f"adam.{i}.{k}": v for k, v in s.items()})
    return {"step": torch.tensor(step), **flat}


@pytest.mark.slow
def test_resume_after_kill_9_matches_an_uninterrupted_run(small_cache, tmp_path):
    settings = ["data.batch_size=8", "run.max_steps=400", "run.ckpt_every=10", "run.log_every=10",
                "run.sample_every=0", "run.keep_last=3"]
    assert main(train_args("train-sit", "tiny-sit", small_cache, tmp_path / "whole", *settings)) == 0

    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "ctok", *train_args("train-sit", "tiny-sit", small_cache, killed, *settings)]
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-00000050.pt").exists():
        assert process.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared within 300 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    survivors = list_checkpoints(killed / "checkpoints")
    assert 50 <= survivors[-1][0] < 400
    for step, path in survivors:  # every file under a checkpoint name is whole
        assert load_checkpoint(path)["step"] == step

    assert main(train_args("train-sit", "tiny-sit", small_cache, killed, *settings)) == 0
    assert not list((killed / "checkpoints").glob(".*.tmp"))
    whole, resumed = final_state(tmp_path / "whole"), final_state(killed)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert [r["loss"] for r in log_records(killed)][-10:] == [r["loss"] for r in log_records(tmp_path / "whole")][-10:]


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(small_cache, tmp_path):
    settings = ["data.batch_size=8", "run.max_steps=12", "run.ckpt_every=12", "run.log_every=4", "run.sample_every=0"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "ctok", *train_args("train-dit", "tiny-dit", small_cache, tmp_path / "two", *settings)],
                   check=True, env=ENV)
    assert main(train_args("train-dit", "tiny-dit", small_cache, tmp_path / "one", *settings)) == 0
    assert main(train_args("train-dit", "tiny-dit", small_cache, tmp_path / "accum", *settings,
                           "run.grad_accum=2")) == 0
    one = final_state(tmp_path / "one")
    for other in ("two", "accum"):
        state = final_state(tmp_path / other)
        for key in one:
            torch.testing.assert_close(state[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{other}: {key}")
        for a, b in zip(log_records(tmp_path / "one"), log_records(tmp_path / other)):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


# -- the normalisation: never forgotten, always recorded -------------------------------------
def test_on_the_fly_training_normalises_with_statistics_of_a_seeded_random_subset(tokenizer, synthetic_fashion_mnist,
                                                                                     tmp_path):
    model, folder = tokenizer
    out = tmp_path / "run"
    assert main(["train-sit", "--config", "tiny-sit", "data.latents=null", f"data.images={synthetic_fashion_mnist}",
                 f"tokenizer={folder}", "data.stats_images=40", "data.batch_size=8", f"run.out_dir={out}",
                 "run.device=cpu", "run.max_steps=3", "run.log_every=1", "samples.steps=2",
                 "samples.num_images=4"]) == 0
    images = load_fashion_mnist("train", synthetic_fashion_mnist)[0]
    subset = stats_subset(len(images), 40, seed=0)
    assert len(set(subset)) == 40 and max(subset) >= len(images) // 2  # drawn over the whole set, not its head
    assert stats_subset(len(images), 40, seed=1) != subset and stats_subset(len(images), 40, seed=0) == subset
    with torch.no_grad():
        z = model.encode(images[subset]).double()
    stats = json.loads((out / "final" / "config.json").read_text())["latent_stats"]
    assert stats["source"] == "statistics of 40 training images drawn at random (seed 0)"
    assert stats["mean"] == pytest.approx(float(z.mean()), abs=1e-6)
    assert stats["std"] == pytest.approx(float(z.std(unbiased=False)), rel=1e-5)
    assert len(log_records(out)) == 3


def test_a_tokenizer_with_its_own_statistics_wins_over_the_cache(tokenizer):
    model, _ = tokenizer
    released = Tokenizer.from_config({**model.to_config(), "vq_mean": -0.00077168207, "vq_std": 0.07157949})
    cache = type("Cache", (), {"info": type("Info", (), {"mean": 0.5, "std": 2.0, "folder": "c"})})()
    chosen = choose_latent_stats(released, cache, None, 0)
    assert ((chosen.mean, chosen.std, chosen.source)
            == (-0.00077168207, 0.07157949, "tokenizer config (vq_mean, vq_std)"))
    chosen = choose_latent_stats(model, cache, None, 0)
    assert (chosen.mean, chosen.std, chosen.source) == (0.5, 2.0, "latent cache c")


@pytest.mark.slow
def test_ctrl_c_stops_training_with_one_line_and_the_rerun_continues(small_cache, tmp_path):
    settings = ["data.batch_size=8", "run.max_steps=400", "run.ckpt_every=10", "run.log_every=10",
                "run.sample_every=0"]
    run = tmp_path / "run"
    args = [sys.executable, "-m", "ctok", *train_args("train-sit", "tiny-sit", small_cache, run, *settings)]
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step-00000020.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "training ended before Ctrl-C"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    for step, path in list_checkpoints(run / "checkpoints"):
        assert load_checkpoint(path)["step"] == step
    assert main(train_args("train-sit", "tiny-sit", small_cache, run, *settings[:-4], "run.max_steps=30",
                           "run.ckpt_every=10", "run.log_every=10", "run.sample_every=0")) == 0
