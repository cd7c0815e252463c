"""Numbers reach the computation: every numeric flag of ``ctok generate / evaluate / reconstruct``,
and the settings a checkpoint or latent cache carries for them.

Each command runs on the CPU at toy sizes and its result is compared with the library function
called with the same value; where a flag matters, the result also differs from the default's, so
a flag that is parsed and then dropped fails. ``--batch-size`` is the exception: it must change
nothing (within rounding).
"""
from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from ctok.cli import main
from ctok.data.images import center_crop_adm, pil_to_tensor
from ctok.latent_cache import LatentCache, build_latent_cache
from ctok.loading import load_dit, load_sit, load_tokenizer
from ctok.metrics import fid, frechet_distance, gaussian_statistics, precision_recall
from ctok.metrics.reference import cache_path
from ctok.metrics.sample_npz import NpzImages
from ctok.models.tokenizer import Tokenizer
from ctok.sampling import sample_dit, sample_sit
from ctok.training.distributed import init_distributed
from ctok.training.generator_data import CachedLatents, choose_latent_stats
from ctok.training.sharding import BatchRandom, BatchSplit, derived_seed
from test_evaluate import TinyFeatures, direct_features, smooth_images
from test_latent_cache import RandomImages

pytestmark = pytest.mark.usefixtures("one_thread")


# -- ctok generate ----------------------------------------------------------------------------
# Two images (one batch) and three steps, guided, so that every sampler setting shows in the pixels.
GENERATE_FLAGS = ("--num-images", "2", "--batch-size", "2", "--steps", "3", "--cfg-scale", "1.5")
SAMPLER_DEFAULTS = dict(num_steps=3, cfg_scale=1.5)


class Generators:
    """The conformance SiT, DiT and tokenizer folders, plus copies whose config records a noise
    schedule or a path; runs ``ctok generate`` (each distinct command once) and computes the
    same images from the library."""

    def __init__(self, conformance_dir, root):
        self.root = root
        self.folders = {name: conformance_dir / name for name in ("sit_small", "dit_small", "maetok_small")}
        for name, source, record in [("dit_linear", "dit_small", {"noise_schedule": "linear"}),
                                     ("sit_cosine", "sit_small", {"path_type": "cosine"})]:
            folder = root / name
            shutil.copytree(conformance_dir / source, folder)
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, **record}))
            self.folders[name] = folder
        self.runs: dict[tuple, np.ndarray] = {}
        self.loaded: dict[str, torch.nn.Module] = {}

    def generate(self, model: str, *flags: str) -> np.ndarray:
        """The images ``ctok generate`` writes to samples.npz, uint8 (N, H, W, 3)."""
        key = (model, flags)
        if key not in self.runs:
            out = self.root / f"run-{len(self.runs)}"
            assert main(["generate", "--tokenizer", str(self.folders["maetok_small"]),
                         "--model", str(self.folders[model]), "--out", str(out), "--device", "cpu",
                         *GENERATE_FLAGS, *flags]) == 0
            self.runs[key] = np.concatenate(list(NpzImages(out / "samples.npz").batches(64)))
        return self.runs[key]

    def load(self, loader, name: str) -> torch.nn.Module:
        if name not in self.loaded:
            self.loaded[name] = loader(self.folders[name])
        return self.loaded[name]

    def expected(self, model: str, seed: int = 0, indices=(0, 1), adm_truncation: bool = False,
                 **sampler_kwargs) -> np.ndarray:
        """Images ``indices`` (one batch, default class-balanced labels) from sample_sit / sample_dit,
        quantised as DiT's sampling script does (or as ADM's, ``adm_truncation``)."""
        tokenizer = self.load(load_tokenizer, "maetok_small")
        sample, load = (sample_sit, load_sit) if model.startswith("sit") else (sample_dit, load_dit)
        network = self.load(load, model)
        gens = [torch.Generator().manual_seed(derived_seed(seed, i)) for i in indices]
        noise = torch.stack([torch.randn(network.num_tokens, network.in_channels, generator=g) for g in gens])
        with torch.no_grad():
            z = sample(network, noise, torch.tensor(indices), generator=gens, **{**SAMPLER_DEFAULTS, **sampler_kwargs})
            x = tokenizer.decode(tokenizer.denormalize(z))
        pixels = ((x + 1) * 127.5).clamp(0, 255) if adm_truncation else torch.clamp(127.5 * x + 128.0, 0, 255)
        return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def generators(conformance_dir, tmp_path_factory):
    return Generators(conformance_dir, tmp_path_factory.mktemp("generate"))


@pytest.mark.parametrize("model", ["sit_small", "dit_small"])
def test_generate_defaults_are_the_library_defaults(generators, model):
    """SiT: Euler-Maruyama guided on [0, 1]; DiT: DDPM on the cosine schedule; seed 0; DiT's rounding."""
    np.testing.assert_array_equal(generators.generate(model), generators.expected(model))


def test_generate_quantises_the_adm_way_when_asked(generators):
    adm = generators.generate("sit_small", "--quantisation", "truncate")
    np.testing.assert_array_equal(adm, generators.expected("sit_small", adm_truncation=True))
    assert (adm.astype(int) - generators.generate("sit_small")).min() >= -1  # at most one level darker
    assert not np.array_equal(adm, generators.generate("sit_small"))


@pytest.mark.parametrize("model, flags, sampler_kwargs", [
    ("sit_small", ("--cfg-scale", "3"), dict(cfg_scale=3.0)),
    ("sit_small", ("--guidance-interval", "0", "0.5"), dict(guidance_interval=(0.0, 0.5))),
    ("sit_small", ("--steps", "4"), dict(num_steps=4)),
    ("sit_small", ("--solver", "heun"), dict(solver="heun")),
    ("sit_small", ("--seed", "7"), dict(seed=7)),
    ("dit_small", ("--cfg-scale", "3"), dict(cfg_scale=3.0)),
    ("dit_small", ("--steps", "4"), dict(num_steps=4)),
    ("dit_small", ("--solver", "ddim"), dict(solver="ddim")),
    ("dit_small", ("--noise-schedule", "linear"), dict(noise_schedule="linear")),
    ("dit_small", ("--seed", "7"), dict(seed=7)),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_a_generate_flag_reaches_the_sampler(generators, model, flags, sampler_kwargs):
    images = generators.generate(model, *flags)
    np.testing.assert_array_equal(images, generators.expected(model, **sampler_kwargs))
    assert not np.array_equal(images, generators.generate(model))


def test_a_dit_is_sampled_on_the_noise_schedule_its_config_records(generators):
    linear = generators.generate("dit_linear")
    np.testing.assert_array_equal(linear, generators.expected("dit_small", noise_schedule="linear"))
    assert not np.array_equal(linear, generators.generate("dit_small"))  # a config without one: cosine
    # The flag overrides the config.
    np.testing.assert_array_equal(generators.generate("dit_linear", "--noise-schedule", "cosine"),
                                  generators.generate("dit_small"))


def test_a_sit_is_sampled_on_the_path_its_config_records(generators):
    """The path enters the Euler-Maruyama drift (the score from the velocity)."""
    cosine = generators.generate("sit_cosine")
    np.testing.assert_array_equal(cosine, generators.expected("sit_small", path_type="cosine"))
    assert not np.array_equal(cosine, generators.generate("sit_small"))


def test_num_images_adds_images_without_changing_the_first(generators):
    three = generators.generate("sit_small", "--num-images", "3")
    assert three.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(three[:2], generators.generate("sit_small"))
    np.testing.assert_array_equal(three[2:], generators.expected("sit_small", indices=(2,)))


def test_batch_size_changes_no_image_beyond_rounding(generators):
    """Every image has its own noise streams; only a matmul's rounding may see the batch."""
    alone = generators.generate("sit_small", "--batch-size", "1").astype(int)
    assert np.abs(alone - generators.generate("sit_small")).max() <= 1


# -- ctok evaluate ----------------------------------------------------------------------------
@pytest.fixture
def image_sets(tmp_path):
    """24 sample and 30 reference images as .npz files, and their TinyFeatures."""
    samples, reference = smooth_images(24, 32, seed=1), smooth_images(30, 32, seed=2)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    return tmp_path / "samples.npz", tmp_path / "ref.npz", direct_features(samples), direct_features(reference)


def evaluate_cli(samples, reference, *flags) -> dict:
    """The results ``ctok evaluate`` writes (to its default, <samples>.eval.json)."""
    assert main(["evaluate", "--samples", str(samples), "--ref", str(reference), "--feature-network",
                 "test_evaluate:TinyFeatures", "--device", "cpu", "--num-workers", "0", *flags]) == 0
    return json.loads(samples.with_name(samples.stem + ".eval.json").read_text())


def test_evaluate_k_sets_the_neighbourhoods_of_precision_and_recall(image_sets):
    samples, reference, s, r = image_sets
    found = {}
    for k in (1, 3, 6):
        results = evaluate_cli(samples, reference, "--k", str(k))
        expected = precision_recall(r["pool"], s["pool"], k=k, device="cpu")
        assert (results["precision"], results["recall"]) == pytest.approx(expected)
        assert results["precision_recall_k"] == k
        found[k] = expected
    assert len(set(found.values())) == 3, f"these sets do not tell the k apart: {found}"


def test_evaluate_batch_size_changes_no_metric(image_sets):
    samples, reference, _, _ = image_sets
    # Without the cache, so that the reference's features are computed in batches of each size too.
    whole = evaluate_cli(samples, reference, "--batch-size", "100", "--no-cache")
    split = evaluate_cli(samples, reference, "--batch-size", "7", "--no-cache")
    assert (split["num_samples"], split["num_reference"]) == (24, 30)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-9), key


def test_evaluate_reads_the_cached_reference_statistics_and_no_cache_skips_them(image_sets):
    """A second run takes the reference from its cache file: statistics altered there show up
    in its metrics, and ``--no-cache`` recomputes them from the images."""
    samples, reference, s, r = image_sets
    first = evaluate_cli(samples, reference)
    cache = cache_path(reference, TinyFeatures().identity)
    with np.load(cache) as stored:
        arrays = dict(stored)
    arrays["mu"] = arrays["mu"] + 0.5
    arrays["pool"] = arrays["pool"][:20]
    with open(cache, "wb") as f:  # the same name, identity and fingerprint: still a valid cache entry
        np.savez(f, **arrays)

    cached = evaluate_cli(samples, reference)
    mu, sigma = gaussian_statistics(s["pool"])
    assert cached["fid"] == pytest.approx(frechet_distance(mu, sigma, arrays["mu"], arrays["sigma"]), rel=1e-6)
    assert cached["num_reference"] == 20
    assert cached["precision"] == pytest.approx(precision_recall(arrays["pool"], s["pool"], device="cpu")[0])
    assert cached["fid"] != pytest.approx(first["fid"], rel=1e-3)

    recomputed = evaluate_cli(samples, reference, "--no-cache")
    assert recomputed["fid"] == pytest.approx(first["fid"], rel=1e-6) and recomputed["num_reference"] == 30
    assert recomputed["fid"] == pytest.approx(fid(r["pool"], s["pool"]), rel=1e-6)


def test_evaluate_image_size_is_the_crop_of_a_folder_reference(image_sets, tmp_path):
    samples, _, s, _ = image_sets
    folder = tmp_path / "ref_images"
    folder.mkdir()
    originals = [Image.fromarray(smooth_images(1, 64, seed=20 + i)[0][:h, :w])
                 for i, (h, w) in enumerate([(40, 56), (64, 48), (33, 60), (64, 64), (48, 40), (50, 64)])]
    for i, image in enumerate(originals):
        image.save(folder / f"{i}.png")

    def fid_of_crops(size):
        crops = np.stack([np.asarray(center_crop_adm(image, size)) for image in originals])
        return fid(direct_features(crops)["pool"], s["pool"])

    at_16 = evaluate_cli(samples, folder, "--image-size", "16")["fid"]
    assert at_16 == pytest.approx(fid_of_crops(16), rel=1e-6)
    assert evaluate_cli(samples, folder)["fid"] == pytest.approx(fid_of_crops(32), rel=1e-6)  # the samples' size
    assert at_16 != pytest.approx(fid_of_crops(32), rel=1e-3)


# -- ctok reconstruct -------------------------------------------------------------------------
class PixelDistance:
    """Stands in for the LPIPS-VGG network: the mean absolute pixel difference of each pair."""

    def lpips(self, images, references):
        return (images - references).abs().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    return Tokenizer.from_config(TINY_TOKENIZER).save_pretrained(tmp_path_factory.mktemp("tokenizer"))


def test_reconstruct_lpips_compares_each_reconstruction_with_its_input(tokenizer_dir, tmp_path, monkeypatch):
    """``--lpips-net`` and ``--lpips-weights`` reach the LPIPS loader, the variant is on the protocol card,
    and the distance is between an input crop and its reconstruction (an image against itself would give 0)."""
    requested = []

    def load_lpips(net="alex", weights=None, device="cpu"):
        requested.append((net, weights))
        return PixelDistance()

    # ctok.metrics re-exports the function lpips under the module's name, hence the import by path.
    monkeypatch.setattr(importlib.import_module("ctok.metrics.lpips"), "load_lpips", load_lpips)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(smooth_images(1, 48, seed=30 + i)[0]).save(folder / f"{i}.png")
    out = tmp_path / "out"
    assert main(["reconstruct", "--tokenizer", str(tokenizer_dir), "--data", str(folder), "--out", str(out),
                 "--device", "cpu", "--num-workers", "0", "--feature-network", "test_evaluate:TinyFeatures",
                 "--lpips-net", "vgg", "--lpips-weights", str(tmp_path / "vgg16.pth")]) == 0
    assert requested == [("vgg", str(tmp_path / "vgg16.pth"))]

    inputs = torch.stack([pil_to_tensor(center_crop_adm(Image.open(p), 32)) for p in sorted(folder.iterdir())])
    reconstructions = torch.from_numpy(np.load(out / "reconstructions.npz")["arr_0"]).permute(0, 3, 1, 2)
    expected = PixelDistance().lpips(reconstructions.float() / 127.5 - 1, inputs).mean()
    results = json.loads((out / "metrics.json").read_text())
    assert results["lpips"] == pytest.approx(float(expected), rel=1e-6)
    assert expected > 0.01
    assert results["unavailable"] == {}
    assert results["protocol"]["lpips"] == "vgg" and results["protocol"]["num_samples"] == 3


# -- latent caches: what a generator trains on ------------------------------------------------
def test_cached_latents_reach_the_generator_normalised_by_the_cache_statistics(tmp_path):
    """``data.latents=DIR`` training: a tokenizer without vq_mean / vq_std is normalised with the
    cache's statistics, and each sample is one of its stored views, (z - mean) / std."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_config(TINY_TOKENIZER).eval()
    build_latent_cache(tokenizer, RandomImages(12), tmp_path, tokenizer_source="tiny", ctx=init_distributed("cpu"),
                       flip=True, batch_size=4, shard_size=8, num_workers=0)
    cache = LatentCache(tmp_path)
    stats = choose_latent_stats(tokenizer, cache, None, 0)
    index = json.loads((tmp_path / "index.json").read_text())["stats"]
    assert (stats.mean, stats.std) == (index["mean"], index["std"])
    assert abs(stats.mean) > 1e-3 and abs(stats.std - 1) > 1e-2  # so that normalising shows

    views = torch.stack([cache[i][0] for i in range(12)])
    labels = torch.tensor([cache[i][1] for i in range(12)])

    def rng():
        return BatchRandom(3, 0, BatchSplit(12, 1, 1, 0), 0, "cpu")

    z, y = CachedLatents(stats)((views, labels), rng())
    chosen = views[torch.arange(12), rng().randint(2)]
    torch.testing.assert_close(z, (chosen - index["mean"]) / index["std"])
    assert torch.equal(y, labels)
