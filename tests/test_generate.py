"""``ctok generate``: the files it writes, what is in them, resuming, sharding, and its errors."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from ctok import generation
from ctok.cli import main
from ctok.loading import load_dit, load_sit, load_tokenizer
from ctok.metrics.sample_npz import NpzImages
from ctok.pipeline import LatentPipeline, load_pipeline
from ctok.sampling import sample_dit, sample_sit
from ctok.training.distributed import DistContext
from ctok.training.sharding import derived_seed


def command(conformance_dir, out, *extra, model="sit_small", tokenizer="maetok_small"):
    return ["generate", "--tokenizer", str(conformance_dir / tokenizer), "--model", str(conformance_dir / model),
            "--out", str(out), "--device", "cpu", *extra]


def png_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def npz_images(out) -> np.ndarray:
    return np.concatenate(list(NpzImages(out / "samples.npz").batches(64)))


def expected_images(folder_tok, folder_model, load, sample, indices, seed, labels, **kwargs):
    """The pixels of images ``indices`` (one batch), computed here from the public API and quantised as
    DiT's sampling script does."""
    tok, model = load_tokenizer(folder_tok), load(folder_model)
    gens = [torch.Generator().manual_seed(derived_seed(seed, i)) for i in indices]
    noise = torch.stack([torch.randn(16, 8, generator=g) for g in gens])
    with torch.no_grad():
        z = sample(model, noise, torch.tensor(labels), generator=gens, **kwargs)
        x = tok.decode(tok.denormalize(z))
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_sit_run_writes_pngs_a_grid_and_the_npz_of_the_sampled_images(conformance_dir, tmp_path):
    out = tmp_path / "run"
    assert main(command(conformance_dir, out, "--num-images", "5", "--batch-size", "2", "--steps", "4",
                        "--seed", "3", "--cfg-scale", "1.5", "--guidance-interval", "0", "0.6")) == 0
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    images = np.stack([np.asarray(Image.open(p)) for p in pngs])
    assert images.shape == (5, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(npz_images(out), images)
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], images)  # what ADM's evaluator does

    # Images 2 and 3 form the second batch; default labels are class-balanced: i mod 1000.
    expected = expected_images(conformance_dir / "maetok_small", conformance_dir / "sit_small", load_sit, sample_sit,
                               [2, 3], seed=3, labels=[2, 3], num_steps=4, cfg_scale=1.5, guidance_interval=(0, 0.6))
    assert np.array_equal(images[2:4], expected)
    assert len({im.tobytes() for im in images}) == 5

    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 + 66, 2 + 5 * 66, 3)  # one row of five 64-px tiles, 2-px padding
    assert np.array_equal(grid[2:66, 2 + 66:2 + 66 + 64], images[1])
    settings = json.loads((out / "generate.json").read_text())
    assert settings["model_kind"] == "sit" and settings["solver"] == "euler-maruyama"
    assert settings["guidance_interval"] == [0.0, 0.6]


def test_dit_run_with_chosen_labels(conformance_dir, tmp_path):
    out = tmp_path / "run"
    assert main(command(conformance_dir, out, "--num-images", "3", "--batch-size", "3", "--steps", "5",
                        "--labels", "7,1000", "--cfg-scale", "2", model="dit_small")) == 0
    expected = expected_images(conformance_dir / "maetok_small", conformance_dir / "dit_small", load_dit, sample_dit,
                               [0, 1, 2], seed=0, labels=[7, 1000, 7], num_steps=5, cfg_scale=2.0)
    assert np.array_equal(npz_images(out), expected)
    assert json.loads((out / "generate.json").read_text())["solver"] == "ddpm"


def test_default_labels_are_class_balanced(conformance_dir, tmp_path, capsys):
    model = Namespace(num_classes=1000, has_null_class=True)
    label = generation.image_labels(None, model)
    counts = np.bincount([label(i) for i in range(50_000)], minlength=1000)
    assert counts.min() == counts.max() == 50
    assert [generation.image_labels([5, 9], model)(i) for i in range(4)] == [5, 9, 5, 9]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 999\].*got \[1000\]"):
        generation.image_labels([3, 1000], Namespace(num_classes=1000, has_null_class=False))
    assert main(command(conformance_dir, tmp_path / "run", "--labels", "cat")) == 2
    assert "--labels must be comma-separated integers, got 'cat'" in capsys.readouterr().err


class Killed(Exception):
    pass


def test_an_interrupted_run_resumes_without_redoing_finished_images(conformance_dir, tmp_path, monkeypatch):
    args = ("--num-images", "7", "--batch-size", "2", "--steps", "3", "--seed", "5")
    whole = tmp_path / "whole"
    assert main(command(conformance_dir, whole, *args)) == 0

    out = tmp_path / "resumed"
    real_save, saved = generation.save_png, []

    def dies_after_three(path, image):
        if len(saved) == 3:  # mid-way through the second batch
            raise Killed
        real_save(path, image)
        saved.append(path.name)

    monkeypatch.setattr(generation, "save_png", dies_after_three)
    with pytest.raises(Killed):
        main(command(conformance_dir, out, *args))
    assert not (out / "samples.npz").exists()
    (out / "images" / ".000003.png.abc.tmp").write_bytes(b"half an image")

    monkeypatch.setattr(generation, "save_png", real_save)
    sampled = []
    real_generate = LatentPipeline.generate

    def counting_generate(self, labels, **kw):
        sampled.extend(labels)
        return real_generate(self, labels, **kw)

    monkeypatch.setattr(LatentPipeline, "generate", counting_generate)
    assert main(command(conformance_dir, out, *args)) == 0
    assert sampled == [2, 3, 4, 5, 6]  # batch [0, 1] was complete; [2, 3] had only image 2
    assert not list((out / "images").glob(".*.tmp"))
    assert png_bytes(out) == png_bytes(whole)
    assert np.array_equal(npz_images(out), npz_images(whole))


def test_resuming_with_other_settings_is_refused(conformance_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(command(conformance_dir, out, "--num-images", "2", "--steps", "2")) == 0
    assert main(command(conformance_dir, out, "--num-images", "2", "--steps", "3")) == 2
    assert "holds images made with other settings (num_steps: 2 -> 3)" in capsys.readouterr().err


@pytest.mark.parametrize("extra, model, tokenizer, message", [
    ((), "sit_small", "softvq_small",
     "the SIT generates 16 tokens x 8 channels but the tokenizer decodes 8 tokens x 8"),
    ((), "maetok_small", "maetok_small", "is a tokenizer; pass a SiT or DiT checkpoint"),
    (("--solver", "ddim"), "sit_small", "maetok_small", "solver 'ddim' is a DiT solver"),
    (("--guidance-interval", "0", "0.5"), "dit_small", "maetok_small", "guidance_interval applies to SiT only"),
    (("--noise-schedule", "linear"), "sit_small", "maetok_small", "noise_schedule applies to DiT only"),
    (("--num-images", "0"), "sit_small", "maetok_small", "--num-images must be at least 1"),
    (("--cfg-scale", "0.5"), "sit_small", "maetok_small", "--cfg-scale must be >= 1"),
])
def test_bad_requests_get_one_line_errors(conformance_dir, tmp_path, capsys, extra, model, tokenizer, message):
    assert main(command(conformance_dir, tmp_path / "run", "--num-images", "1", "--steps", "1", *extra,
                        model=model, tokenizer=tokenizer)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def cli_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_two_processes_under_torchrun_give_the_same_bytes_as_one(conformance_dir, tmp_path):
    args = ("--num-images", "5", "--batch-size", "2", "--steps", "4", "--seed", "11")
    single = tmp_path / "single"
    assert main(command(conformance_dir, single, *args)) == 0
    sharded = tmp_path / "sharded"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ctok",
         *command(conformance_dir, sharded, *args)],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert png_bytes(sharded) == png_bytes(single) and len(png_bytes(single)) == 5
    assert np.array_equal(npz_images(sharded), npz_images(single))


@pytest.mark.slow
def test_a_killed_process_resumes_to_the_same_npz(conformance_dir, tmp_path):
    args = ("--num-images", "24", "--batch-size", "2", "--steps", "100", "--seed", "2")
    whole = tmp_path / "whole"
    assert main(command(conformance_dir, whole, *args)) == 0

    out = tmp_path / "killed"
    cli = [sys.executable, "-m", "ctok", *command(conformance_dir, out, *args)]
    process = subprocess.Popen(cli, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "images").glob("*.png"))) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list((out / "images").glob("*.png")))
    assert 4 <= done < 24 and not (out / "samples.npz").exists(), "the run was not killed mid-way"

    assert subprocess.run(cli, env=cli_env(), capture_output=True, timeout=300).returncode == 0
    assert png_bytes(out) == png_bytes(whole)
    assert np.array_equal(npz_images(out), npz_images(whole))


def _with_training_record(conformance_dir, tmp_path, **record):
    import shutil

    folder = tmp_path / "sit"
    shutil.copytree(conformance_dir / "sit_small", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(record)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_ctok_trained_generator_decodes_with_its_recorded_normalisation(conformance_dir, tmp_path):
    tok = load_tokenizer(conformance_dir / "maetok_small")
    folder = _with_training_record(conformance_dir, tmp_path, latent_stats={"mean": 0.5, "std": 3.0, "source": "test"},
                                   tokenizer={"identity": tok.identity(), "source": "test"})
    out = tmp_path / "out"
    assert main(["generate", "--tokenizer", str(conformance_dir / "maetok_small"), "--model", str(folder),
                 "--out", str(out), "--device", "cpu", "--num-images", "2", "--steps", "2", "--solver", "euler"]) == 0
    sit = load_sit(folder)
    gens = [torch.Generator().manual_seed(derived_seed(0, i)) for i in range(2)]
    noise = torch.stack([torch.randn(16, 8, generator=g) for g in gens])
    labels = torch.tensor([0, 1])  # class-balanced over 1000 classes
    with torch.no_grad():
        z = sample_sit(sit, noise, labels, num_steps=2, solver="euler", generator=gens)
        x = tok.decode(z * 3.0 + 0.5)
    expected = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(npz_images(out), expected)


def test_a_generator_refuses_a_tokenizer_it_was_not_trained_with(conformance_dir, tmp_path, capsys):
    folder = _with_training_record(conformance_dir, tmp_path, latent_stats={"mean": 0.0, "std": 1.0, "source": "t"},
                                   tokenizer={"identity": "maetok-16x8-0123456789abcdef", "source": "elsewhere"})
    assert main(["generate", "--tokenizer", str(conformance_dir / "maetok_small"), "--model", str(folder),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--num-images", "2"]) == 2
    err = capsys.readouterr().err
    assert "was trained on latents of tokenizer maetok-16x8-0123456789abcdef (elsewhere)" in err


def test_generate_to_folder_writes_the_files_of_the_command(conformance_dir, tmp_path):
    """The library function on a loaded pipeline gives the command's files, byte for byte."""
    args = ("--num-images", "3", "--batch-size", "2", "--steps", "3", "--seed", "4", "--cfg-scale", "1.5",
            "--labels", "7,1000")
    cli = tmp_path / "cli"
    assert main(command(conformance_dir, cli, *args)) == 0
    pipe = load_pipeline(conformance_dir / "maetok_small", conformance_dir / "sit_small")
    direct = tmp_path / "direct"
    samples = generation.generate_to_folder(pipe, direct, num_images=3, batch_size=2, num_steps=3, seed=4,
                                            cfg_scale=1.5, labels=[7, 1000])
    assert samples == direct / "samples.npz"
    assert png_bytes(direct) == png_bytes(cli) and len(png_bytes(cli)) == 3
    for name in ("samples.npz", "grid.png", "generate.json"):
        assert (direct / name).read_bytes() == (cli / name).read_bytes(), name
    settings = json.loads((cli / "generate.json").read_text())
    assert settings["labels"] == "7,1000" and settings["model"] == str(conformance_dir / "sit_small")


def test_generate_to_folder_fingerprints_a_generator_built_in_memory(conformance_dir, tmp_path):
    """Without a checkpoint folder to hash, the weights themselves tie a folder to its generator:
    resuming with other weights is refused."""
    tokenizer, sit = load_tokenizer(conformance_dir / "maetok_small"), load_sit(conformance_dir / "sit_small")
    out = tmp_path / "run"
    generation.generate_to_folder(LatentPipeline(tokenizer, sit), out, num_images=2, num_steps=2)
    settings = json.loads((out / "generate.json").read_text())
    assert settings["model"] is None and settings["tokenizer"] is None and settings["model_kind"] == "sit"
    assert len(settings["model_sha256"]) == 64
    # The same images as from the pipeline loaded from the folders.
    loaded = tmp_path / "loaded"
    generation.generate_to_folder(load_pipeline(conformance_dir / "maetok_small", conformance_dir / "sit_small"),
                                  loaded, num_images=2, num_steps=2)
    assert png_bytes(loaded) == png_bytes(out)

    with torch.no_grad():
        next(sit.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match=r"holds images made with other settings \(model_sha256:"):
        generation.generate_to_folder(LatentPipeline(tokenizer, sit), out, num_images=2, num_steps=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_images=0), "num_images must be at least 1, got 0"),
    (dict(batch_size=0), "batch_size must be at least 1, got 0"),
    (dict(num_steps=0), "num_steps must be at least 1, got 0"),
    (dict(cfg_scale=0.5), "cfg_scale must be >= 1 (1 turns guidance off), got 0.5"),
    (dict(labels=[]), "labels must hold at least one class id"),
    (dict(ctx=DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("meta"))),
     "the pipeline is on cpu but this process's device is meta"),
])
def test_generate_to_folder_refuses_bad_arguments(conformance_dir, tmp_path, kwargs, message):
    pipe = LatentPipeline(load_tokenizer(conformance_dir / "maetok_small"), load_sit(conformance_dir / "sit_small"))
    with pytest.raises(ValueError, match=re.escape(message)):
        generation.generate_to_folder(pipe, tmp_path / "run", **{"num_steps": 1, **kwargs})
    assert not (tmp_path / "run").exists()
