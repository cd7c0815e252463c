"""Latent caches: contents equal the tokenizer's encodings, statistics, sharding, resume, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from ctok.latent_cache import INDEX_NAME, LatentCache, build_latent_cache
from ctok.models.tokenizer import Tokenizer
from ctok.seeding import SeededIndex
from ctok.training.distributed import init_distributed


class RandomImages(Dataset):
    """Deterministic random images in [-1, 1] with labels i % 3; counts how many it served."""

    def __init__(self, n: int):
        self.images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.served = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.served += 1
        return self.images[i], i % 3


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return Tokenizer.from_config(TINY_TOKENIZER).eval()


def build(tokenizer, data, out, **kwargs):
    return build_latent_cache(tokenizer, data, out, tokenizer_source="tiny", ctx=init_distributed("cpu"),
                              batch_size=4, shard_size=8, num_workers=0, **kwargs)


def test_cache_holds_the_encodings_of_each_image_and_its_mirror(tokenizer, tmp_path):
    data = RandomImages(20)
    index = json.loads(build(tokenizer, data, tmp_path, flip=True).read_text())
    assert (index["num_samples"], index["num_views"], index["num_tokens"], index["latent_dim"]) == (20, 2, 8, 4)
    assert [s["count"] for s in index["shards"]] == [8, 8, 4]
    assert index["label_range"] == [0, 2]
    assert index["tokenizer"]["identity"] == tokenizer.identity()
    cache = LatentCache(tmp_path)
    with torch.no_grad():
        plain, mirrored = tokenizer.encode(data.images), tokenizer.encode(data.images.flip(-1))
    stored = torch.stack([cache[i][0] for i in range(20)])
    assert stored.shape == (20, 2, 8, 4)
    torch.testing.assert_close(stored[:, 0], plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(stored[:, 1], mirrored, rtol=0, atol=1e-5)
    assert [cache[i][1] for i in range(20)] == [i % 3 for i in range(20)]
    # the training sampler's indices carry a seed and must read as plain ones
    assert torch.equal(cache[SeededIndex(13, (0, 2, 0))][0], stored[13])
    # statistics over every stored value: population mean / std, and per channel
    everything = stored.double()
    assert index["stats"]["mean"] == pytest.approx(float(everything.mean()), abs=1e-9)
    assert index["stats"]["std"] == pytest.approx(float(everything.std(unbiased=False)), rel=1e-6)
    per_channel = everything.reshape(-1, 4)
    assert index["stats"]["channel_mean"] == pytest.approx(per_channel.mean(0).tolist(), abs=1e-9)
    assert index["stats"]["channel_std"] == pytest.approx(per_channel.std(0, unbiased=False).tolist(), rel=1e-6)
    assert cache.info.mean == index["stats"]["mean"]


def test_an_interrupted_build_encodes_only_the_missing_shards(tokenizer, tmp_path):
    data = RandomImages(20)
    build(tokenizer, data, tmp_path / "full")
    reference = np.load(tmp_path / "full" / "shard-00001.latents.npy")
    build(tokenizer, data, tmp_path / "partial", limit=20)
    # as if killed while shard 1 was being written: its marker and the index never appeared
    (tmp_path / "partial" / "shard-00001.json").unlink()
    (tmp_path / "partial" / INDEX_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="unfinished build: rerun the same `ctok cache-latents`"):
        LatentCache(tmp_path / "partial")
    data.served = 0
    build(tokenizer, data, tmp_path / "partial", limit=20)
    assert data.served == 8
    np.testing.assert_array_equal(np.load(tmp_path / "partial" / "shard-00001.latents.npy"), reference)
    assert len(LatentCache(tmp_path / "partial")) == 20


def test_a_resumed_build_with_other_settings_is_refused(tokenizer, tmp_path):
    data = RandomImages(20)
    build(tokenizer, data, tmp_path)
    (tmp_path / INDEX_NAME).unlink()
    with pytest.raises(ValueError, match=r"holds shards of another build \(different num_views\)"):
        build(tokenizer, data, tmp_path, flip=True)
    index = build(tokenizer, data, tmp_path)
    finished = (tmp_path / INDEX_NAME).read_bytes()
    assert build(tokenizer, data, tmp_path) == index  # a rerun of finished work does nothing
    assert (tmp_path / INDEX_NAME).read_bytes() == finished
    with pytest.raises(ValueError, match=r"holds a finished latent cache built with other settings \(different "
                                         r"num_views\)"):
        build(tokenizer, data, tmp_path, flip=True)



def test_a_local_tokenizer_folder_is_recorded_by_its_absolute_path(tokenizer, tmp_path, monkeypatch):
    """So that a trainer finds the tokenizer from any working directory; a hub id stays as given.
    Without a ctx the build is one process on the tokenizer's device."""
    tokenizer.save_pretrained(tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    build_latent_cache(tokenizer, RandomImages(4), "local", tokenizer_source="tok", num_workers=0)
    assert LatentCache(tmp_path / "local").info.tokenizer_source == str(tmp_path.resolve() / "tok")
    build_latent_cache(tokenizer, RandomImages(4), "hub", tokenizer_source="MAETok/maetok-b-128", num_workers=0)
    assert LatentCache(tmp_path / "hub").info.tokenizer_source == "MAETok/maetok-b-128"


@pytest.mark.parametrize("kwargs, message", [(dict(batch_size=0), "batch_size must be at least 1, got 0"),
                                             (dict(shard_size=0), "shard_size must be at least 1, got 0")])
def test_build_refuses_sizes_below_one(tokenizer, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_latent_cache(tokenizer, RandomImages(4), tmp_path / "cache", tokenizer_source="tiny", **kwargs)
    assert not (tmp_path / "cache").exists()

def test_opening_something_that_is_not_a_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished latent cache .* run `ctok cache-latents"):
        LatentCache(tmp_path)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not a ctok-latent-cache version 1 index"):
        LatentCache(tmp_path)


@pytest.mark.slow
def test_two_processes_build_the_same_cache_as_one(tokenizer, synthetic_fashion_mnist, tmp_path):
    """``torchrun --nproc_per_node=2 -m ctok cache-latents`` on Fashion-MNIST-format images."""
    from ctok.data.fashion_mnist import load_fashion_mnist_raw

    tokenizer.save_pretrained(tmp_path / "tok")
    command = ["-m", "ctok", "cache-latents", "--tokenizer", str(tmp_path / "tok"),
               "--data", str(synthetic_fashion_mnist), "--limit", "24", "--shard-size", "8", "--batch-size", "8",
               "--num-workers", "0", "--device", "cpu", "--flip"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *command, "--out", str(tmp_path / "one")], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command,
                    "--out", str(tmp_path / "two")], check=True, env=env)
    one, two = LatentCache(tmp_path / "one"), LatentCache(tmp_path / "two")
    assert len(one) == len(two) == 24
    for i in range(24):
        torch.testing.assert_close(one[i][0], two[i][0], rtol=0, atol=1e-6)
        assert one[i][1] == two[i][1]
    assert one.info.mean == pytest.approx(two.info.mean, abs=1e-9)
    labels = load_fashion_mnist_raw("train", synthetic_fashion_mnist)[1][:24]
    assert [one[i][1] for i in range(24)] == labels.tolist()
    assert two.index["label_range"] == [int(labels.min()), int(labels.max())]


def test_an_index_naming_shards_outside_its_folder_is_refused(tmp_path):
    import json as json_module

    from ctok.latent_cache import FORMAT, INDEX_NAME, VERSION, LatentCache

    index = dict(format=FORMAT, version=VERSION, num_samples=1, num_views=1, num_tokens=2, latent_dim=3,
                 label_range=[0, 0], tokenizer={"identity": "t", "source": "s"}, stats={"mean": 0.0, "std": 1.0},
                 shards=[{"name": "../other-cache/shard-00001", "count": 1}])
    (tmp_path / INDEX_NAME).write_text(json_module.dumps(index))
    with pytest.raises(ValueError, match=r"names shards outside the cache's own pattern .*other-cache"):
        LatentCache(tmp_path)


def test_a_shard_is_written_while_the_next_one_is_encoded(tokenizer, tmp_path, monkeypatch):
    """The writes run in their own thread, one at a time: encoding shard k + 1 starts before shard k
    is on disk, and the cache equals the one a build with no overlap writes."""
    import threading
    import time

    import ctok.latent_cache as latent_cache

    data = RandomImages(24)
    build(tokenizer, data, tmp_path / "reference")
    events, write = [], latent_cache._write_shard

    def slow_write(out, index, *args):
        events.append(("write starts", index, threading.current_thread().name))
        time.sleep(0.3)
        write(out, index, *args)
        events.append(("write ends", index))

    class Logged(RandomImages):
        def __getitem__(self, i):
            if i % 8 == 0:
                events.append(("encode starts", i // 8))
            return super().__getitem__(i)

    monkeypatch.setattr(latent_cache, "_write_shard", slow_write)
    build(tokenizer, Logged(24), tmp_path / "overlapped")
    assert all(e[2].startswith("write-shard") for e in events if e[0] == "write starts")
    for k in (0, 1):
        assert events.index(("encode starts", k + 1)) < events.index(("write ends", k))
        assert events.index(("write ends", k)) < [e[:2] for e in events].index(("write starts", k + 1))
    for name in sorted(p.name for p in (tmp_path / "reference").iterdir()):
        if name.endswith(".npy"):
            assert (tmp_path / "overlapped" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_a_failed_shard_write_stops_the_build_and_a_rerun_finishes_it(tokenizer, tmp_path, monkeypatch):
    import ctok.latent_cache as latent_cache

    write = latent_cache._write_shard

    def disk_full_at_shard_1(out, index, *args):
        if index == 1:
            raise OSError(28, "No space left on device")
        write(out, index, *args)

    monkeypatch.setattr(latent_cache, "_write_shard", disk_full_at_shard_1)
    with pytest.raises(OSError, match="No space left on device"):
        build(tokenizer, RandomImages(24), tmp_path)
    assert not (tmp_path / INDEX_NAME).exists() and not (tmp_path / "shard-00001.json").exists()
    monkeypatch.setattr(latent_cache, "_write_shard", write)
    data = RandomImages(24)
    build(tokenizer, data, tmp_path)
    assert len(LatentCache(tmp_path)) == 24 and data.served < 24  # shard 0 was kept
