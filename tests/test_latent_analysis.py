"""Latent analysis: GMM fits against a known mixture, the linear probe, caches against on-the-fly encoding,
the command's files and its one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import logsumexp

from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from conftest import draw_fashion_like, write_fashion_like
from ctok.cli import main
from ctok.latent_analysis import (
    QUICK_COMPONENTS,
    analyze_latents,
    fit_gmms,
    latent_geometry,
    linear_probe,
    split_indices,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = {**TINY_TOKENIZER, "num_latent_tokens": 4, "codebook_embed_dim": 6}
PLOTS = ("gmm_nll.png", "gmm_bic.png", "probe_accuracy.png", "variance_spectrum.png")


# -- GMM fits against a mixture whose log-likelihood is known -----------------------------------------

def known_mixture(n: int, seed: int = 0):
    """``n`` draws (n, 8) of a 4-component diagonal Gaussian mixture, and its exact log-density."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    means = rng.normal(0, 4, size=(4, 8))
    stds = rng.uniform(0.5, 1.5, size=(4, 8))
    which = rng.choice(4, size=n, p=weights)
    x = means[which] + stds[which] * rng.normal(size=(n, 8))

    def log_density(points):
        per_component = -0.5 * (((points[:, None] - means) / stds) ** 2 + np.log(2 * np.pi * stds**2)).sum(-1)
        return logsumexp(per_component + np.log(weights), axis=1)

    return x, log_density


def test_held_out_nll_is_lowest_at_the_true_component_count_and_matches_the_true_mixture():
    x, log_density = known_mixture(4000)
    result = fit_gmms(x, components=(1, 2, 4, 8, 16), held_out=0.25, seed=0)
    nll = {f["components"]: f["held_out_nll_per_dim"] for f in result["fits"]}
    assert (result["dim"], result["num_train"], result["num_held_out"]) == (8, 3000, 1000)
    # Fewer components than the truth cost a lot; more only overfit a little (each extra component
    # adds 17 parameters to 3,000 points).
    assert result["best_held_out_components"] in (4, 8)
    assert nll[1] > nll[2] > nll[4] + 0.1
    assert nll[8] > nll[4] - 0.005 and nll[16] > nll[4] - 0.005
    # The fitted 4-component mixture against the true one on the same held-out points: a maximum-
    # likelihood fit of 67 parameters on 3,000 points loses about 67 / (2 * 3000) / 8 = 0.0014 nats
    # per dimension in expectation; 0.01 leaves room for the sampling noise of the difference.
    train, held = split_indices(len(x), 0.25, 0)
    true_held_out = -log_density(x[held]).mean() / 8
    assert nll[4] == pytest.approx(true_held_out, abs=0.01)
    # On the train part EM's maximum beats the true parameters (up to EM's stopping tolerance).
    fitted_train = next(f for f in result["fits"] if f["components"] == 4)["train_nll_per_dim"]
    assert fitted_train <= -log_density(x[train]).mean() / 8 + 1e-3
    four = next(f for f in result["fits"] if f["components"] == 4)
    assert sorted(four["weights"]) == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.03)
    assert four["min_mean_distance"] > 3 and four["converged"]


def test_gmm_fits_are_deterministic_and_take_latents_of_any_shape_after_pca():
    x, _ = known_mixture(600, seed=1)
    latents = torch.from_numpy(x.reshape(600, 2, 4)).float()
    first = fit_gmms(latents, components=(1, 3), pca_dim=4, seed=5)
    assert first == fit_gmms(latents.numpy(), components=(1, 3), pca_dim=4, seed=5)
    assert first["dim"] == 4 and first["input_dim"] == 8 and 0.5 < first["pca_explained_variance"] <= 1
    assert first["fits"][0]["min_mean_distance"] is None


# -- linear probe and geometry --------------------------------------------------------------------------

def test_the_probe_separates_separable_classes_and_is_at_chance_on_random_labels():
    rng = np.random.default_rng(0)
    labels = np.arange(900) % 3
    centres = rng.normal(0, 1, size=(3, 4, 8))
    separable = centres[labels] * 4 + rng.normal(size=(900, 4, 8))
    result = linear_probe(separable, labels)
    assert result["num_classes"] == 3 and result["num_held_out"] == 180
    assert result["mean_pooled"]["held_out_accuracy"] >= 0.98
    assert result["flattened"]["held_out_accuracy"] >= 0.98

    noise = rng.normal(size=(2000, 4, 8))
    coin = rng.integers(0, 2, size=2000)
    result = linear_probe(noise, coin, seed=3)
    # 400 held-out coin flips: chance is ~0.5 with a standard deviation of 0.025; 0.075 is three of them.
    for kind in ("mean_pooled", "flattened"):
        assert abs(result[kind]["held_out_accuracy"] - result["chance"]) < 0.075
        assert result[kind]["converged"]


def test_geometry_of_latents_with_known_variances():
    rng = np.random.default_rng(0)
    scales = np.array([[3.0, 1.0], [0.0, 0.0], [1.0, 1.0]])  # 3 tokens x 2 channels; token 1 constant
    latents = 5.0 + scales * rng.normal(size=(20000, 3, 2))
    geometry = latent_geometry(latents)
    assert geometry["token_variance"] == pytest.approx([10.0, 0.0, 2.0], rel=0.05)
    assert geometry["channel_mean"] == pytest.approx([5.0, 5.0], abs=0.05)
    assert geometry["variance_spectrum"][0] == pytest.approx(9 / 12, abs=0.01)
    assert geometry["top_share"]["4"] == pytest.approx(1.0)
    assert len(geometry["variance_spectrum"]) == 6


def test_analysis_of_a_few_hundred_latents_is_cheap_json_and_deterministic():
    rng = np.random.default_rng(0)
    latents = torch.from_numpy(rng.normal(size=(300, 4, 8))).float()
    labels = torch.arange(300) % 2
    first = analyze_latents(latents, labels, components=QUICK_COMPONENTS)
    second = analyze_latents(latents, labels, components=QUICK_COMPONENTS)
    json.dumps(first)
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in second.items() if k != "seconds"}
    assert [f["components"] for f in first["gmm"]["fits"]] == list(QUICK_COMPONENTS)
    assert first["settings"]["components"] == list(QUICK_COMPONENTS)
    assert analyze_latents(latents, None, components=(1,))["probe_note"].startswith("no labels")
    # features (n, d) are one token of width d
    flat = analyze_latents(latents.reshape(300, -1), labels, components=(1, 2))
    assert (flat["num_tokens"], flat["latent_dim"], flat["gmm"]["dim"]) == (1, 32, 32)


@pytest.mark.parametrize("call, message", [
    (lambda: fit_gmms(np.zeros((10, 3)) + np.arange(3), components=(1, 9)), "9-component mixture needs at least 9"),
    (lambda: linear_probe(np.ones((10, 2, 2)), np.full(10, 4)), "at least two classes"),
    (lambda: fit_gmms(np.empty((0, 4)), components=(1,)), "empty"),
    (lambda: split_indices(10, 1.0), "held_out must be a fraction"),
])
def test_bad_input_to_the_library_is_a_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- the command ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A random tiny tokenizer, 200 Fashion-like images and their latent cache (made by `ctok cache-latents`)."""
    from ctok.models.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("analysis")
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_config(TOKENIZER).eval()
    # At initialisation the blocks' layer scales are tiny, so the latents would hardly depend on the
    # image; at 1 they do, and the GMMs and the probe have something to find.
    with torch.no_grad():
        for name, parameter in tokenizer.named_parameters():
            if name.endswith(".gamma"):
                parameter.fill_(1.0)
    tokenizer.save_pretrained(root / "tokenizer")
    write_fashion_like(root / "data", splits={"train": 200, "test": 10})
    assert main(["cache-latents", "--tokenizer", str(root / "tokenizer"), "--data", str(root / "data"),
                 "--out", str(root / "cache"), "--num-workers", "0", "--device", "cpu"]) == 0
    return root


def test_a_cache_is_analysed_as_the_same_latents_encoded_on_the_fly(workspace, tmp_path):
    tokenizer, cache = str(workspace / "tokenizer"), str(workspace / "cache")
    assert main(["analyze-latents", "--tokenizer", tokenizer, "--data", str(workspace / "data"), "--latents", cache,
                 "--out", str(tmp_path), "--components", "1,2,4", "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "analysis.json").read_text())
    assert record["format"] == "ctok-latent-analysis" and record["plots"] == list(PLOTS)
    for name in PLOTS:
        with Image.open(tmp_path / name) as picture:
            picture.load()
            assert picture.size[0] > 100
    encoded, cached = record["analyses"][tokenizer], record["analyses"][cache]
    assert encoded["source"]["kind"] == "tokenizer" and cached["source"]["kind"] == "latent cache"
    assert encoded["source"]["tokenizer"] == cached["source"]["tokenizer"]
    assert encoded["num_latents"] == cached["num_latents"] == 200
    # Normalised by the same numbers: the cache's statistics are those of the same 200 latents.
    assert encoded["normalization"]["mean"] == pytest.approx(cached["normalization"]["mean"], abs=1e-9)
    assert encoded["normalization"]["std"] == pytest.approx(cached["normalization"]["std"], rel=1e-9)
    for part in ("gmm", "probe", "geometry", "settings"):
        assert _leaves(encoded[part]).keys() == _leaves(cached[part]).keys()
        for path, value in _leaves(encoded[part]).items():
            expected = pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value
            assert _leaves(cached[part])[path] == expected, f"{part}{path}"


def _leaves(value, path: str = "") -> dict:
    """A nested dict/list as {path: leaf}: pytest.approx compares flat values, not nested structures."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{path}[{i}]").items()}
    return {path: value}


def test_a_limit_draws_the_same_samples_from_a_cache_as_from_its_images(workspace):
    from ctok.data import open_images
    from ctok.latent_analysis import encode_images, read_latent_cache
    from ctok.loading import load_tokenizer

    tokenizer = load_tokenizer(workspace / "tokenizer")
    encoded = encode_images(tokenizer, open_images(workspace / "data", 32), limit=50, seed=3)
    cached = read_latent_cache(workspace / "cache", limit=50, seed=3)
    assert encoded.latents.shape == (50, 4, 6) and encoded.source["images"] == "50 of 200 drawn at random (seed 3)"
    np.testing.assert_allclose(cached.latents, encoded.latents, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(cached.labels, encoded.labels)
    # The cache normalises with its statistics over all 200 samples; 50 encoded images with theirs.
    assert cached.stats.source.startswith("latent cache") and encoded.stats.source.startswith("statistics of the 50")


def test_images_are_encoded_in_float32_inside_an_autocast_region_and_a_bad_precision_is_named(workspace):
    """The latent dashboard encodes during training: the trainer's bf16 autocast must not reach it."""
    from ctok.data import open_images
    from ctok.latent_analysis import encode_images
    from ctok.loading import load_tokenizer

    tokenizer = load_tokenizer(workspace / "tokenizer")
    images = open_images(workspace / "data", 32)
    plain = encode_images(tokenizer, images, limit=20)
    first = images[0][0][None]
    reference = tokenizer.encode(first)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = encode_images(tokenizer, images, limit=20)
        # autocast is live here: a plain encode moves by more than float32 rounding
        assert (tokenizer.encode(first).float() - reference).abs().max() > 1e-4
    np.testing.assert_array_equal(under_autocast.latents, plain.latents)
    assert plain.source["precision"] == "fp32"
    assert encode_images(tokenizer, images, limit=2, precision="bf16").source["precision"] == "fp32"  # CPU
    with pytest.raises(ValueError, match="precision must be one of bf16, fp32, got 'fp16'"):
        encode_images(tokenizer, images, precision="fp16")


def _one_class_images(folder):
    from ctok.data.fashion_mnist import write_idx

    images, _ = draw_fashion_like(40, seed=2)
    folder.mkdir()
    for split, count in (("train", 40), ("t10k", 5)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:count])
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.full(count, 7, dtype=np.uint8))
    return folder


def _empty_cache(workspace, folder):
    index = json.loads((workspace / "cache" / "index.json").read_text())
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps({**index, "num_samples": 0, "shards": []}))
    return folder


@pytest.mark.parametrize("case, message", [
    ("empty cache", "holds no latents"),
    ("one class", "at least two classes"),
    ("too many components", "256-component mixture needs at least 256 training latents, got 160"),
    ("no images", "no images"),
    ("bad components", "--components must be comma-separated integers"),
    ("tokenizer without data", "--tokenizer and --data go together"),
])
def test_bad_input_is_a_one_line_error(workspace, tmp_path, capsys, case, message):
    tokenizer, cache = str(workspace / "tokenizer"), str(workspace / "cache")
    (tmp_path / "empty").mkdir()
    args = {  # each case writes its inputs into its own folder
        "empty cache": ["--latents", str(_empty_cache(workspace, tmp_path / "nothing"))],
        "one class": ["--tokenizer", tokenizer, "--data", str(_one_class_images(tmp_path / "one-class")),
                      "--components", "1,2"],
        "too many components": ["--latents", cache, "--components", "1,256"],
        "no images": ["--tokenizer", tokenizer, "--data", str(tmp_path / "empty")],
        "bad components": ["--latents", cache, "--components", "1,two"],
        "tokenizer without data": ["--tokenizer", tokenizer],
    }[case]
    assert main(["analyze-latents", *args, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ctok analyze-latents: error:")
    assert message in err
    assert not (tmp_path / "out" / "analysis.json").exists()
