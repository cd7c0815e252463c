"""``ctok.load_pipeline``: the latent normalisation a generator was trained with, the tokenizer check,
images identical to ``ctok generate``'s, and the README's example run as written."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import ctok
from conftest import REPO
from ctok.cli import main
from ctok.loading import load_dit, load_sit, load_tokenizer
from ctok.metrics.sample_npz import NpzImages
from ctok.models.diffusion_transformer import LatentStats, TokenizerRecord
from ctok.pipeline import LatentPipeline, load_pipeline
from ctok.sampling import sample_sit
from ctok.sampling.noise import image_generators
from ctok.uint8 import to_uint8_hwc

# Non-unit statistics, so that decoding with the tokenizer's (0, 1) instead would show.
STATS = LatentStats(0.5, 1.5, "test")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(conformance_dir):
    return conformance_dir / "maetok_small"


@pytest.fixture(scope="module")
def trained(conformance_dir, tokenizer_dir, tmp_path_factory):
    """The conformance SiT and DiT saved as ctok's trainer saves them: with latent statistics and the
    identity of the tokenizer (and, for the DiT, a noise schedule); {kind: folder}."""
    identity = load_tokenizer(tokenizer_dir).identity()
    root = tmp_path_factory.mktemp("trained")
    folders = {}
    for kind, load in (("sit", load_sit), ("dit", load_dit)):
        model = load(conformance_dir / f"{kind}_small")
        model.config.latent_stats = STATS
        model.config.tokenizer = TokenizerRecord(identity, str(tokenizer_dir))
        if kind == "dit":
            model.config.noise_schedule = "linear"
        folders[kind] = model.save_pretrained(root / kind)
    return folders


def cli_images(tokenizer_dir, model_dir, out, *flags) -> np.ndarray:
    assert main(["generate", "--tokenizer", str(tokenizer_dir), "--model", str(model_dir), "--out", str(out),
                 "--device", "cpu", *flags]) == 0
    return np.concatenate(list(NpzImages(out / "samples.npz").batches(64)))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# -- (a) the same images as `ctok generate` ---------------------------------------------------
@pytest.mark.parametrize("kind, flags, settings", [
    ("sit", ("--cfg-scale", "1.5", "--guidance-interval", "0", "0.7"),
     dict(cfg_scale=1.5, guidance_interval=(0.0, 0.7))),
    ("sit", ("--solver", "heun"), dict(solver="heun")),
    ("dit", ("--cfg-scale", "2"), dict(cfg_scale=2.0)),
    ("dit", ("--solver", "ddim"), dict(solver="ddim")),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_generate_gives_exactly_the_images_of_ctok_generate(trained, tokenizer_dir, tmp_path, kind, flags, settings):
    """A generator with non-unit statistics: images 0-1 are the command's first batch, image 2 its second."""
    expected = cli_images(tokenizer_dir, trained[kind], tmp_path / "cli", "--num-images", "3", "--batch-size", "2",
                          "--labels", "5,7,1", "--seed", "3", "--steps", "3", *flags)
    pipe = load_pipeline(tokenizer_dir, trained[kind])
    first = pipe.generate([5, 7], num_steps=3, seed=3, **settings)
    second = pipe.generate([1], num_steps=3, generators=image_generators(3, [2]), **settings)
    assert max_abs_diff(np.concatenate([first, second]), expected) == 0


def test_generate_is_the_sampler_then_the_recorded_denormalisation(trained, tokenizer_dir):
    pipe = load_pipeline(tokenizer_dir, trained["sit"])
    tok, sit = load_tokenizer(tokenizer_dir), load_sit(trained["sit"])
    gens = image_generators(4, range(2))
    noise = torch.stack([torch.randn(16, 8, generator=g) for g in gens])
    z = sample_sit(sit, noise, torch.tensor([3, 9]), num_steps=2, solver="euler", generator=gens)
    with torch.no_grad():
        pixels = tok.decode(z * STATS.std + STATS.mean)
    floats = pipe.generate([3, 9], num_steps=2, solver="euler", seed=4, output="float")
    assert floats.dtype == torch.float32 and floats.shape == (2, 3, 64, 64) and not floats.requires_grad
    assert torch.equal(floats, pixels)
    assert np.array_equal(pipe.generate([3, 9], num_steps=2, solver="euler", seed=4), to_uint8_hwc(pixels))


@contextmanager
def _cpu_bf16_inference(self=None):
    """What LatentPipeline._inference is on CUDA, with CPU autocast standing in for CUDA's."""
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        yield


def test_generate_samples_under_bf16_autocast_but_decodes_in_float32(trained, tokenizer_dir, monkeypatch):
    """On CUDA generate samples under bf16 autocast; the pixels are still the float32 decode of the
    latents it drew (a bf16 decode would put some on another uint8 level)."""
    monkeypatch.setattr(LatentPipeline, "_inference", _cpu_bf16_inference)
    pipe = load_pipeline(tokenizer_dir, trained["sit"])
    gens = image_generators(4, range(2))
    noise = torch.stack([torch.randn(16, 8, generator=g) for g in gens])
    with _cpu_bf16_inference():
        z = sample_sit(pipe.generator, noise, torch.tensor([3, 9]), num_steps=2, solver="euler", generator=gens)
    z_float32 = sample_sit(pipe.generator, noise, torch.tensor([3, 9]), num_steps=2, solver="euler", generator=gens)
    assert not torch.equal(z, z_float32)  # the autocast is in force while sampling
    with torch.no_grad():
        pixels = load_tokenizer(tokenizer_dir).decode(z * STATS.std + STATS.mean)
    floats = pipe.generate([3, 9], num_steps=2, solver="euler", seed=4, output="float")
    assert torch.equal(floats, pixels)


# -- (b) encode / decode in the generator's normalised space ----------------------------------
def test_decode_applies_the_generators_statistics_not_the_tokenizers(trained, tokenizer_dir):
    pipe = load_pipeline(tokenizer_dir, trained["sit"])
    tok = load_tokenizer(tokenizer_dir)
    assert pipe.latent_stats == STATS
    z = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = tok.decode(z * 1.5 + 0.5), tok.decode(tok.denormalize(z))
    assert torch.equal(pipe.decode(z), ours)
    assert (pipe.decode(z) - theirs).abs().max() > 0.05  # the tokenizer's (0, 1) is another image

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = tok.encode(x)
        reconstruction = tok.decode(latents)
    normalised = pipe.encode(x)
    assert torch.equal(normalised, (latents - 0.5) / 1.5)
    torch.testing.assert_close(pipe.decode(normalised), reconstruction, rtol=0, atol=1e-5)


# -- (c) the tokenizer a generator was trained on ---------------------------------------------
def test_a_generator_trained_on_another_tokenizer_is_refused_naming_both(conformance_dir, tokenizer_dir, tmp_path):
    sit = load_sit(conformance_dir / "sit_small")
    sit.config.latent_stats = STATS
    sit.config.tokenizer = TokenizerRecord("maetok-16x8-0123456789abcdef", "elsewhere")
    folder = sit.save_pretrained(tmp_path / "sit")
    ours = load_tokenizer(tokenizer_dir).identity()
    for attempt in (lambda: load_pipeline(tokenizer_dir, folder),
                    lambda: LatentPipeline(load_tokenizer(tokenizer_dir), load_sit(folder))):
        with pytest.raises(ValueError) as err:
            attempt()
        assert "maetok-16x8-0123456789abcdef (elsewhere)" in str(err.value) and ours in str(err.value)


@pytest.mark.parametrize("tokenizer, generator, message", [
    ("softvq_small", "sit_small", "the SIT generates 16 tokens x 8 channels but the tokenizer decodes 8 tokens x 8"),
    ("maetok_small", "maetok_small", "is a tokenizer; pass a SiT or DiT checkpoint"),
])
def test_a_generator_that_cannot_decode_with_the_tokenizer_is_refused(conformance_dir, tokenizer, generator, message):
    with pytest.raises(ValueError, match=message):
        load_pipeline(conformance_dir / tokenizer, conformance_dir / generator)


# -- (d) released generators ------------------------------------------------------------------
def test_a_released_generator_uses_the_tokenizers_vq_mean_and_vq_std(conformance_dir, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(conformance_dir / "maetok_small", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vq_mean": 0.25, "vq_std": 2.0}))
    pipe = load_pipeline(folder, conformance_dir / "sit_small")  # records neither statistics nor tokenizer
    assert pipe.latent_stats == LatentStats(0.25, 2.0, "tokenizer config (vq_mean, vq_std)")
    tok = load_tokenizer(folder)
    z = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pipe.decode(z), tok.decode(tok.denormalize(z)))
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        assert torch.equal(pipe.encode(x), tok.normalize(tok.encode(x)))


# -- the record in config.json ----------------------------------------------------------------
def test_the_record_is_a_typed_config_field_that_save_pretrained_writes(trained, conformance_dir, tmp_path):
    written = json.loads((trained["dit"] / "config.json").read_text())
    assert written["latent_stats"] == {"mean": 0.5, "std": 1.5, "source": "test"}
    assert written["tokenizer"]["identity"].startswith("maetok-16x8-")
    assert written["noise_schedule"] == "linear"
    dit = load_dit(trained["dit"])
    assert dit.config.latent_stats == STATS and dit.config.noise_schedule == "linear"
    # A released checkpoint saves back without the three keys.
    assert not ({"latent_stats", "tokenizer", "noise_schedule"}
                & load_dit(conformance_dir / "dit_small").to_config().keys())
    # config.json files written before the fields existed (keys added by hand) read the same.
    folder = tmp_path / "old"
    shutil.copytree(conformance_dir / "sit_small", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latent_stats": STATS.to_dict(),
                                                    "tokenizer": {"identity": "x", "source": "y"}}))
    sit = load_sit(folder)
    assert sit.config.latent_stats == STATS and sit.config.tokenizer == TokenizerRecord("x", "y")


@pytest.mark.parametrize("record, message", [
    ({"latent_stats": {"mean": 0.0}}, "latent_stats must be a mapping with keys mean, std"),
    ({"latent_stats": {"mean": 0.0, "std": 0.0, "source": ""}}, "positive std"),
    ({"tokenizer": "maetok"}, "tokenizer must be a mapping with keys identity"),
])
def test_a_malformed_record_is_refused_when_loading(conformance_dir, tmp_path, record, message):
    folder = tmp_path / "sit"
    shutil.copytree(conformance_dir / "sit_small", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **record}))
    with pytest.raises(ValueError, match=message):
        load_sit(folder)


# -- settings ---------------------------------------------------------------------------------
def test_sampler_arguments_fill_defaults_and_read_the_recorded_schedule(trained, tokenizer_dir, conformance_dir):
    sit = load_pipeline(tokenizer_dir, trained["sit"])
    assert sit.sampler_arguments() == dict(num_steps=250, solver="euler-maruyama", cfg_scale=1.0,
                                           guidance_interval=(0.0, 1.0))
    dit = load_pipeline(tokenizer_dir, trained["dit"])
    assert dit.sampler_arguments()["noise_schedule"] == "linear"
    assert dit.sampler_arguments(noise_schedule="cosine")["noise_schedule"] == "cosine"
    released = load_pipeline(tokenizer_dir, conformance_dir / "dit_small")
    assert released.sampler_arguments() == dict(num_steps=250, solver="ddpm", noise_schedule="cosine", cfg_scale=1.0)


@pytest.mark.parametrize("kind, kwargs, message", [
    ("sit", dict(solver="ddim"), "solver 'ddim' is a DiT solver"),
    ("sit", dict(solver="rk4"), "solver 'rk4' is unknown"),
    ("dit", dict(solver="heun"), "solver 'heun' is a SiT solver"),
    ("dit", dict(guidance_interval=(0, 0.5)), "guidance_interval applies to SiT only"),
    ("sit", dict(noise_schedule="linear"), "noise_schedule applies to DiT only"),
    ("sit", dict(seed=1, generators=[torch.Generator()]), "pass seed or generators, not both"),
    ("sit", dict(generators=[torch.Generator()] * 2), r"one torch.Generator per label \(1\), got 2"),
    ("sit", dict(output="pil"), "output must be one of"),
    ("sit", dict(cfg_scale=0.5), "cfg_scale must be >= 1"),
])
def test_bad_settings_are_refused(trained, tokenizer_dir, kind, kwargs, message):
    pipe = load_pipeline(tokenizer_dir, trained[kind])
    with pytest.raises(ValueError, match=message):
        pipe.generate([1], num_steps=1, **kwargs)


def test_the_models_are_put_in_eval_mode(trained, tokenizer_dir):
    tok, sit = load_tokenizer(tokenizer_dir).train(), load_sit(trained["sit"]).train()
    pipe = LatentPipeline(tok, sit)
    assert not pipe.tokenizer.training and not pipe.generator.training
    assert (pipe.kind, pipe.device) == ("sit", torch.device("cpu"))


# -- (e) the README's example -----------------------------------------------------------------
def readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using released models"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def test_the_readme_example_runs(conformance_dir, monkeypatch, tmp_path):
    """The README's code, with its hub ids replaced by the conformance tokenizer and SiT (16 x 8 latents)."""
    code = readme_example()
    for hub_id, name in (("MAETok/maetok-b-128", "maetok_small"), ("MAETok/sit-xl_maetok-b-128", "sit_small")):
        assert f'"{hub_id}"' in code
        code = code.replace(f'"{hub_id}"', repr(str(conformance_dir / name)))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["images"].shape == (4, 64, 64, 3) and namespace["images"].dtype == np.uint8
    assert namespace["rec"].shape == namespace["same"].shape == (1, 3, 64, 64)
    assert isinstance(namespace["pipe"], ctok.LatentPipeline)
    torch.testing.assert_close(namespace["same"], namespace["rec"], rtol=0, atol=1e-5)
