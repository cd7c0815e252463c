"""Sharded datasets: ``ctok make-shards`` and :class:`ctok.data.ImageShards` read back by index.

What must hold: the shards carry the folder's files byte for byte in the folder's order, item i of
the shards is item i of the folder (pixels, label, broken or not), so training on them is
bit-identical to training on the folder (1 and 2 processes) and resumes exactly after kill -9;
corrupt samples are skipped; bad patterns are refused with a message that says why.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from conftest import assert_identical
from ctok.cli import build_parser, main
from ctok.data import BrokenImage, ImageFolder, ImageShards, make_shards
from ctok.data import shards as shards_module
from ctok.data.shards import DEFAULT_WORKERS, shard_files
from ctok.latent_cache import LatentCache
from ctok.models.tokenizer import Tokenizer
from ctok.training.checkpoint import list_checkpoints, load_checkpoint
from ctok.training.sharding import BatchSplit, GlobalBatchSampler

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES, PER_CLASS, SHARD_SIZE = 3, 8, 7
BROKEN = "c1/zz-broken.png"  # the 17th file in folder order: index 16


def write_folder(root: Path) -> Path:
    """Three classes of noise images of different sizes, PNG and JPEG, and one file that is no image."""
    rng = np.random.default_rng(0)
    for c in range(NUM_CLASSES):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (36 + 2 * i, 52 - i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / (f"{i}.png" if i % 2 else f"{i}.JPG"))
    (root / BROKEN).write_bytes(b"this is no png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    assert main(["make-shards", "--data", str(folder), "--out", str(out), "--shard-size", str(SHARD_SIZE)]) == 0
    return out


SET_FILES = [".ctok.lock", "shards.json"] + [f"train-00000{i}.tar" for i in range(4)]  # the finished set


def pattern(shards: Path) -> str:
    return f"{shards}/train-{{000000..000003}}.tar"


# -- writing ---------------------------------------------------------------------------------------
def test_make_shards_writes_the_folders_files_in_order_with_their_bytes(folder, shards):
    samples = ImageFolder(folder, 8).samples
    assert sorted(p.name for p in shards.iterdir()) == SET_FILES
    members = []
    for i in range(4):
        with tarfile.open(shards / f"train-00000{i}.tar") as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    expected = []
    for i, (path, label) in enumerate(samples):
        expected += [(f"{i:08d}.cls", str(label).encode()), (f"{i:08d}.{path.suffix.lower()[1:]}", path.read_bytes())]
    assert members == expected
    index = json.loads((shards / "shards.json").read_text())
    assert index["num_samples"] == 25 and index["num_classes"] == 3 and index["class_names"] == ["c0", "c1", "c2"]
    assert index["class_counts"] == [8, 9, 8]
    assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == [
        ("train-000000.tar", 7), ("train-000001.tar", 7), ("train-000002.tar", 7), ("train-000003.tar", 4)]
    assert all(s["filesize"] == (shards / s["url"]).stat().st_size for s in index["shardlist"])


@pytest.mark.parametrize("workers", [1, 3])
def test_the_same_folder_gives_byte_identical_shards_with_any_number_of_workers(folder, shards, tmp_path, workers):
    """The fixture's shards came from the CLI's default of 8 workers."""
    make_shards(folder, tmp_path, SHARD_SIZE, workers=workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == SET_FILES
    for name in SET_FILES[1:]:
        assert (tmp_path / name).read_bytes() == (shards / name).read_bytes(), name


def test_one_and_three_workers_write_the_same_many_small_shards(folder, tmp_path):
    for workers in (1, 3):
        make_shards(folder, tmp_path / str(workers), 2, workers=workers)
    names = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert len(names) == 2 + 13 and names == sorted(p.name for p in (tmp_path / "3").iterdir())
    assert all((tmp_path / "1" / n).read_bytes() == (tmp_path / "3" / n).read_bytes() for n in names[1:])


def test_make_shards_refuses_what_it_cannot_write(folder, shards, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [(["--data", str(tmp_path / "nowhere")], "does not exist or is not a directory"),
             (["--data", str(tmp_path / "empty")], "no images (bmp/jpeg/jpg/png/tif/tiff/webp, any case) found"),
             (["--data", str(folder), "--shard-size", "0"], "--shard-size must be at least 1, got 0"),
             (["--data", str(folder), "--workers", "0"], "--workers must be at least 1, got 0")]
    for args, message in cases:
        assert main(["make-shards", "--out", str(tmp_path / "out"), *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["make-shards", "--data", str(folder), "--out", str(shards)]) == 2
    assert "already holds a finished set of shards (shards.json); choose another --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["make-shards", "--data", str(folder), "--out", str(tmp_path / "out"), "--workers", "two"])
    assert caught.value.code == 2 and "argument --workers: invalid int value: 'two'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert build_parser().parse_args(["make-shards", "--data", "d", "--out", "o"]).workers == DEFAULT_WORKERS


WRITE_SHARD = shards_module._write_shard  # the writer itself, whichever wrapper a test has put in its place


def _written_shards(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Count the shards the writer writes from now on; with ``fail_after``, the next one after that
    many raises, as a run killed part-way would stop (workers=1 writes them in order)."""
    written = []

    def counted(path, *args):
        if fail_after is not None and len(written) == fail_after:
            raise RuntimeError("killed")
        WRITE_SHARD(path, *args)
        written.append(path.name)

    monkeypatch.setattr(shards_module, "_write_shard", counted)
    return written


def test_a_run_stopped_part_way_resumes_with_only_the_missing_shards(folder, shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _written_shards(monkeypatch, fail_after=2)
    with pytest.raises(RuntimeError, match="killed"):
        make_shards(folder, out, SHARD_SIZE, workers=1)
    assert sorted(p.name for p in out.iterdir()) == [".ctok.lock", "shards-plan.json", "train-000000.tar",
                                                     "train-000001.tar"]
    kept = {n: (out / n).stat().st_mtime_ns for n in ("train-000000.tar", "train-000001.tar")}
    (out / ".train-000002.tar.k1ll3d.tmp").write_bytes(b"half a shard")  # what kill -9 leaves mid-write
    time.sleep(0.01)  # a rewritten shard would show a later mtime
    written = _written_shards(monkeypatch)
    make_shards(folder, out, SHARD_SIZE, workers=3)
    assert sorted(written) == ["train-000002.tar", "train-000003.tar"]
    assert "2 of 4 shards are there already; writing the other 2" in capsys.readouterr().out
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    assert sorted(p.name for p in out.iterdir()) == SET_FILES  # no plan, no temporary left
    for name in SET_FILES[1:]:
        assert (out / name).read_bytes() == (shards / name).read_bytes(), name


# A make-shards run on a slow disk (each file takes 0.1 s to read), to be killed while it writes.
SLOW_MAKE_SHARDS = """
import pathlib, sys, time
from ctok.cli import main
read = pathlib.Path.read_bytes
def slow(self):
    time.sleep(0.1)
    return read(self)
pathlib.Path.read_bytes = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_make_shards_killed_with_sigkill_resumes_to_the_uninterrupted_result(folder, tmp_path, monkeypatch):
    out, args = tmp_path / "out", ["--data", str(folder), "--shard-size", "2"]
    process = subprocess.Popen([sys.executable, "-c", SLOW_MAKE_SHARDS, "make-shards", *args, "--out", str(out),
                                "--workers", "2"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(out.glob("train-*.tar"))) < 4:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)  # into the next shards' first reads: their temporaries are there (the fast test checks them)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    assert 4 <= len(kept) < 13 and not (out / "shards.json").exists(), "the run ended before it was killed"
    written = _written_shards(monkeypatch)
    assert main(["make-shards", *args, "--out", str(out), "--workers", "3"]) == 0
    assert len(written) == 13 - len(kept) and not set(written) & set(kept)
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    make_shards(folder, tmp_path / "uninterrupted", 2, workers=1)
    names = sorted(p.name for p in (tmp_path / "uninterrupted").iterdir())
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary and no plan left
    for name in names[1:]:
        assert (out / name).read_bytes() == (tmp_path / "uninterrupted" / name).read_bytes(), name


def test_a_rerun_with_another_plan_is_refused_naming_what_differs(folder, tmp_path, monkeypatch, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(folder, data)
    _written_shards(monkeypatch, fail_after=1)
    with pytest.raises(RuntimeError, match="killed"):
        make_shards(data, out, SHARD_SIZE, workers=1)
    before = sorted(p.name for p in out.iterdir())
    refused = "holds unfinished shards written with other settings ("
    assert main(["make-shards", "--data", str(data), "--out", str(out), "--shard-size", "5"]) == 2
    assert f"{refused}shard_size: 7 -> 5); pass a new --out" in capsys.readouterr().err
    (data / "c0" / "0.JPG").rename(data / "c0" / "0b.JPG")  # as many files, one renamed
    assert main(["make-shards", "--data", str(data), "--out", str(out), "--shard-size", "7"]) == 2
    assert f"{refused}file_list_sha256: '" in capsys.readouterr().err
    shutil.copy(data / "c1" / "1.png", data / "c1" / "8.png")  # one more file
    assert main(["make-shards", "--data", str(data), "--out", str(out), "--shard-size", "7"]) == 2
    err = capsys.readouterr().err
    assert "file_list_sha256: '" in err and "num_samples: 25 -> 26" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before
    (out / "shards-plan.json").unlink()  # shards that no plan accounts for
    assert main(["make-shards", "--data", str(data), "--out", str(out)]) == 2
    assert "holds train-000000.tar but no shards-plan.json" in capsys.readouterr().err


def test_a_flat_folder_becomes_unlabelled_shards(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    index = json.loads(make_shards(tmp_path, tmp_path / "out", 2).read_text())
    assert (index["num_samples"], index["num_classes"], index["class_names"]) == (3, 0, [])
    dataset = ImageShards(tmp_path / "out", 8)
    assert not dataset.has_labels and dataset.labels.tolist() == [0, 0, 0]
    assert [round(float(dataset[i][0][0, 0, 0]) * 127.5 + 127.5) for i in range(3)] == [0, 80, 160]


def test_wids_opens_the_shards_by_their_index(shards, tmp_path):
    wids = pytest.importorskip("wids")
    dataset = wids.ShardListDataset(str(shards / "shards.json"), cache_dir=str(tmp_path), transformations=[])
    assert len(dataset) == 25
    sample = dataset[16]
    assert sample["__key__"] == "00000016" and sample[".cls"].read() == b"1"


# -- reading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("crop", ["center", "random"])
def test_item_i_of_the_shards_is_item_i_of_the_folder(folder, shards, crop):
    images, sharded = ImageFolder(folder, 32, crop=crop), ImageShards(pattern(shards), 32, crop=crop)
    assert len(sharded) == len(images) == 25 and sharded.classes == images.classes and sharded.has_labels
    for i in range(len(images)):
        torch.manual_seed(i)  # the random crop draws from the global generator: the same draws for both
        a = images[i]
        torch.manual_seed(i)
        b = sharded[i]
        if i == 16:
            assert isinstance(a, BrokenImage) and isinstance(b, BrokenImage)
            continue
        assert torch.equal(a[0], b[0]) and a[1] == b[1] == (i >= 8) + (i >= 17), i


def test_a_folder_of_shards_reads_like_their_pattern(shards):
    by_folder, by_pattern = ImageShards(shards, 16), ImageShards(pattern(shards), 16)
    assert shard_files(shards)[0] == shard_files(pattern(shards))[0]
    assert torch.equal(by_folder[24][0], by_pattern[24][0])
    part = ImageShards(f"{shards}/train-{{000001..000002}}.tar", 16)  # a subset: still labelled by name
    assert len(part) == 14 and part.classes == ["c0", "c1", "c2"] and torch.equal(part[0][0], by_folder[7][0])


def test_a_corrupt_sample_inside_a_shard_is_skipped_like_a_corrupt_file(shards, tmp_path):
    broken = ImageShards(shards, 16)[16]
    assert broken.path == f"{shards}/train-000002.tar:00000016.png"
    assert broken.reason == f"UnidentifiedImageError: cannot identify image file {broken.path!r}"

    # Garble one image's bytes in place (its header stays), and leave out another sample whole.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    with tarfile.open(shards / "train-000000.tar") as source, tarfile.open(damaged / "train-000000.tar", "w") as out:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.startswith("00000002."):
                continue
            if member.name == "00000004.jpg":
                data = bytes(len(data))  # zeros: no image format
            out.addfile(member, io.BytesIO(data))
    dataset = ImageShards(damaged, 16)
    assert len(dataset) == 6  # sample 2 is gone whole; its neighbours keep their places
    assert dataset.labels.tolist() == [0] * 6
    loader = DataLoader(dataset, batch_size=6, num_workers=2, collate_fn=dataset.collate)
    (batch,) = list(loader)
    assert batch.skipped == (f"{damaged}/train-000000.tar:00000004.jpg",) and batch.images.shape == (5, 3, 16, 16)


def test_a_sample_without_an_image_is_broken_not_fatal(tmp_path):
    webdataset = pytest.importorskip("webdataset")
    with webdataset.TarWriter(str(tmp_path / "x.tar"), encoder=False) as tar:
        tar.write({"__key__": "a", "cls": b"3"})
        tar.write({"__key__": "b", "txt": b"no image either"})
    dataset = ImageShards(tmp_path / "x.tar", 8)
    assert dataset.labels.tolist() == [3, 0] and dataset.classes == ["0", "1", "2", "3"]
    for i, key in enumerate("ab"):
        item = dataset[i]
        assert isinstance(item, BrokenImage) and item.path == f"{tmp_path / 'x.tar'}:{key} (no image)"
        assert "the sample has no image member" in item.reason


def _bad_tar(folder: Path) -> str:
    (folder / "junk.tar").write_bytes(b"\x00garbage" * 10)
    return str(folder / "junk.tar")


def _bad_label(folder: Path) -> str:
    with tarfile.open(folder / "label.tar", "w") as tar:
        info = tarfile.TarInfo("k.cls")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
    return str(folder / "label.tar")


def _bad_index(folder: Path) -> str:
    (folder / "shards.json").write_text("{")
    return str(folder)


@pytest.mark.parametrize("make, error, message", [
    (lambda d, s: f"{s}/train-{{000000..000003.tar", ValueError, "is not a valid brace pattern"),
    (lambda d, s: f"{s}/train-{{000000..000009}}.tar", FileNotFoundError,
     "6 of the 10 shards that data.shards"),
    (lambda d, s: "https://example.org/train-{000000..000003}.tar", ValueError, "only local shard files are read"),
    (lambda d, s: "pipe:curl -s x.tar", ValueError, "is a URL or a command"),
    (lambda d, s: f"{s}/train-000000.tar.gz", ValueError, "not an uncompressed .tar shard"),
    (lambda d, s: f"{s}/train-{{000000,000001,000000}}.tar", ValueError, "train-000000.tar more than once"),
    (lambda d, s: str(d), FileNotFoundError, "holds no shards.json and no .tar shards"),
    (lambda d, s: _bad_tar(d), ValueError, "junk.tar is not a readable tar file"),
    (lambda d, s: _bad_index(d), ValueError, "shards.json is not valid JSON"),
    (lambda d, s: _bad_label(d), ValueError, "k.cls should hold a class id (decimal text), holds b'cat'"),
])
def test_bad_patterns_are_refused_with_the_reason(shards, tmp_path, make, error, message):
    with pytest.raises(error) as caught:
        ImageShards(make(tmp_path, shards), 8)
    assert message in str(caught.value)


def test_ranks_and_workers_read_each_sample_once_and_as_the_folder_does(folder, shards):
    """One epoch of 2 processes x 2 workers, batches drawn by the training sampler: each process's
    batches from the shards equal those from the folder, and no sample is read twice."""
    images, sharded = ImageFolder(folder, 16), ImageShards(shards, 16)
    seen = []
    for rank in range(2):
        split = BatchSplit(global_batch=8, grad_accum=1, world_size=2, rank=rank)
        loaders = [DataLoader(d, batch_sampler=GlobalBatchSampler(len(d), split, seed=3), num_workers=2,
                              collate_fn=d.collate) for d in (images, sharded)]
        for _, a, b in zip(range(3), *loaders):  # 3 steps: the whole epoch of 25 // 8 global batches
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
            assert len(a.skipped) == len(b.skipped)
            seen += [x for x in b.images] + list(b.skipped)
    assert len(seen) == 24
    assert len({x.numpy().tobytes() if isinstance(x, torch.Tensor) else x for x in seen}) == 24


# -- training and caching from shards -------------------------------------------------------------
def test_training_configs_take_images_or_shards_not_both(folder, shards, tmp_path, capsys):
    base = ["train-tokenizer", "--config", "tiny-softvq", f"run.out_dir={tmp_path / 'run'}"]
    assert main(base + [f"data.shards={shards}"]) == 2
    assert "set only one of data.images and data.shards" in capsys.readouterr().err
    assert main(base + ["data.images=null", f"data.shards={shards}/train-{{0..1}}.tar"]) == 2
    assert "2 of the 2 shards that data.shards" in capsys.readouterr().err
    generator = ["train-sit", "--config", "tiny-sit", "tokenizer=/nowhere", f"run.out_dir={tmp_path / 'sit'}"]
    assert main(generator + [f"data.latents={tmp_path}", f"data.shards={shards}"]) == 2
    assert "set exactly one of data.latents (a cache from `ctok cache-latents`), data.images and data.shards" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sit").exists()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tokenizer")
    Tokenizer.from_config(TINY_TOKENIZER).eval().save_pretrained(folder)
    return folder


def test_cache_latents_from_shards_equals_from_the_folder(folder, shards, tokenizer_dir, tmp_path):
    common = ["cache-latents", "--tokenizer", str(tokenizer_dir), "--flip", "--num-workers", "0", "--device", "cpu"]
    assert main(common + ["--data", str(folder), "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--shards", pattern(shards), "--out", str(tmp_path / "b")]) == 0
    a, b = LatentCache(tmp_path / "a"), LatentCache(tmp_path / "b")
    assert len(a) == len(b) == 24  # the broken sample is skipped by both
    for i in range(24):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    assert index["dataset"] == pattern(shards) and index["skipped"] == [f"{shards}/train-000002.tar:00000016.png"]


def test_a_sit_trained_on_the_fly_from_shards_equals_one_from_the_folder(tokenizer_dir, tmp_path):
    """Without the broken file: on the fly, a batch that loses an image is an error (see generator_data)."""
    clean = write_folder(tmp_path / "clean")
    (clean / BROKEN).unlink()
    make_shards(clean, tmp_path / "clean-shards", SHARD_SIZE)
    runs = {}
    for name, source in (("folder", f"data.images={clean}"), ("shards", f"data.shards={tmp_path / 'clean-shards'}")):
        runs[name] = tmp_path / name
        assert main(["train-sit", "--config", "tiny-sit", source, f"tokenizer={tokenizer_dir}", "model.num_classes=3",
                     "data.batch_size=8", "data.stats_images=16", "run.max_steps=4", "run.ckpt_every=2",
                     "run.sample_every=0", "run.device=cpu", f"run.out_dir={runs[name]}"]) == 0
    _assert_same_checkpoints(runs["shards"], runs["folder"], 4)


# -- whole runs (slow) ---------------------------------------------------------------------------
FAST = ["--config", "tiny-softvq", "data.batch_size=4", "samples.num_images=2", "loss.perceptual_weight=0",
        "gan.start_step=1", "run.log_every=1", "data.num_workers=2", "run.device=cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _tokenizer_run(source: list[str], out: Path, *, steps: int = 4, procs: int = 1, wait: bool = True):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    command = [sys.executable, *launcher, "-m", "ctok", "train-tokenizer", *FAST, *source, f"run.max_steps={steps}",
               "run.ckpt_every=2", "run.keep_last=3", f"run.out_dir={out}"]
    if not wait:
        return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _assert_same_checkpoints(a: Path, b: Path, step: int):
    ours, reference = (load_checkpoint(run / "checkpoints" / f"step-{step:08d}.pt") for run in (a, b))
    assert ours["data_order"] == reference["data_order"]
    for part in ("modules", "ema", "optimizers"):
        assert_identical(ours[part], reference[part], part)
    losses = [[json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in (a, b)]
    assert losses[0][-step:] == losses[1][-step:]



@pytest.fixture(scope="module")
def folder_run(folder, tmp_path_factory):
    """The reference: 6 steps of a tiny SoftVQ on the folder (ADM random crops, 2 workers, a broken file)."""
    return _tokenizer_run([f"data.images={folder}", "data.crop=random"], tmp_path_factory.mktemp("folder-run"),
                          steps=6)


@pytest.mark.slow
def test_a_tokenizer_trained_on_shards_is_bit_identical_to_one_trained_on_the_folder(folder_run, shards, tmp_path):
    run = _tokenizer_run(["data.images=null", f"data.shards={pattern(shards)}", "data.crop=random"],
                         tmp_path / "shards", steps=6)
    _assert_same_checkpoints(run, folder_run, 6)


@pytest.mark.slow
def test_a_run_on_shards_killed_with_sigkill_resumes_bit_exactly(folder_run, shards, tmp_path):
    killed = tmp_path / "killed"
    source = ["data.images=null", f"data.shards={shards}", "data.crop=random"]  # crops from each sample's seed
    process = _tokenizer_run(source, killed, steps=6, wait=False)
    deadline = time.monotonic() + 1200
    while not (killed / "checkpoints" / "step-00000004.pt").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [s for s, _ in list_checkpoints(killed / "checkpoints")][-1] < 6, "the run ended before it was killed"
    _tokenizer_run(source, killed, steps=6)
    _assert_same_checkpoints(killed, folder_run, 6)


@pytest.mark.slow
def test_two_processes_on_shards_train_bit_identically_to_two_on_the_folder_and_like_one(folder, shards, folder_run,
                                                                                         tmp_path):
    """With random crops, drawn from each sample's seed: 2 processes x 2 workers crop every sample as
    1 process does, so they train like it (up to the order of DDP's gradient sums). Compared at step
    2: step 4's batch holds the broken file, which leaves the processes unequal shares of it."""
    on_folder = _tokenizer_run([f"data.images={folder}", "data.crop=random"], tmp_path / "folder", procs=2)
    on_shards = _tokenizer_run(["data.images=null", f"data.shards={pattern(shards)}", "data.crop=random"],
                               tmp_path / "shards", procs=2)
    _assert_same_checkpoints(on_shards, on_folder, 4)
    two, one = (load_checkpoint(run / "checkpoints" / "step-00000002.pt") for run in (on_folder, folder_run))
    for name, state in one["modules"].items():
        for key, value in state.items():
            torch.testing.assert_close(two["modules"][name][key], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name}.{key}: {m}")
