"""The one encoding path: both views in one pass, the precision rule, and cached = on-the-fly latents."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from PIL import Image

from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from ctok.cli import build_parser, main
from ctok.latent_cache import LatentCache, build_latent_cache
from ctok.latent_encoding import DEFAULT_PRECISION, encode_latents, encode_views
from ctok.models.diffusion_transformer import LatentStats
from ctok.models.tokenizer import Tokenizer
from ctok.numerics import PRECISIONS, autocast_dtype, effective_precision
from ctok.training.config import load_config
from ctok.training.distributed import init_distributed
from ctok.training.generator import DiTTrainConfig, SiTTrainConfig
from ctok.training.generator_data import EncodedImages, check_cache_precision
from ctok.training.sharding import BatchRandom, BatchSplit
from test_latent_cache import RandomImages


@pytest.fixture(scope="module", params=["softvq", "maetok"])
def tokenizer(request):
    torch.manual_seed(0)
    return Tokenizer.from_config({**TINY_TOKENIZER, "variant": request.param}).eval()


def test_both_views_in_one_pass_equal_two_passes(tokenizer):
    images = RandomImages(6).images
    both = encode_views(tokenizer, images, flip=True, precision="fp32")
    assert both.shape == (6, 2, 8, 4) and both.dtype == torch.float32
    with torch.no_grad():
        plain, mirrored = tokenizer.encode(images), tokenizer.encode(images.flip(-1))
    torch.testing.assert_close(both[:, 0], plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(both[:, 1], mirrored, rtol=0, atol=1e-6)
    assert not torch.allclose(plain, mirrored)  # the mirror is a different input, not the same one twice
    one = encode_views(tokenizer, images, flip=False, precision="fp32")
    assert one.shape == (6, 1, 8, 4)
    torch.testing.assert_close(one[:, 0], plain, rtol=0, atol=1e-6)


def test_precision_is_bf16_only_on_cuda_and_the_cpu_encodes_in_fp32(tokenizer):
    assert effective_precision("bf16", "cuda") == "bf16"
    assert effective_precision("bf16", torch.device("cpu")) == "fp32"
    assert effective_precision("fp32", "cuda:0") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of bf16, fp32, got 'fp16'"):
        effective_precision("fp16", "cpu")
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16
    assert autocast_dtype("bf16", "cpu") is None and autocast_dtype("fp32", "cuda") is None
    images = RandomImages(3).images
    torch.testing.assert_close(encode_latents(tokenizer, images, precision="bf16"),
                               encode_latents(tokenizer, images, precision="fp32"), rtol=0, atol=0)


def test_the_default_precision_is_the_generator_recipes_and_the_commands(capsys):
    for schema, recipe in ((SiTTrainConfig, "sit-xl"), (DiTTrainConfig, "dit-xl")):
        assert load_config(schema, recipe).run.precision == DEFAULT_PRECISION
    command = ["cache-latents", "--tokenizer", "t", "--data", "d", "--out", "o"]
    assert build_parser().parse_args(command).precision == DEFAULT_PRECISION
    for precision in PRECISIONS:
        assert build_parser().parse_args([*command, "--precision", precision]).precision == precision
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_a_cache_records_the_precision_it_was_encoded_in(tokenizer, tmp_path):
    """bf16 asked for on the CPU is fp32 (no autocast there), and the index says so."""
    build_latent_cache(tokenizer, RandomImages(4), tmp_path, tokenizer_source="tiny", ctx=init_distributed("cpu"),
                       num_workers=0, precision="bf16")
    cache = LatentCache(tmp_path)
    assert cache.index["precision"] == cache.info.precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of bf16, fp32, got 'half'"):
        build_latent_cache(tokenizer, RandomImages(4), tmp_path / "other", tokenizer_source="tiny", precision="half")


def test_the_command_prints_the_precision_and_the_throughput(tokenizer, tmp_path, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "images" / "a").mkdir(parents=True)
    for i, image in enumerate((RandomImages(6).images + 1) * 127.5):
        Image.fromarray(image.permute(1, 2, 0).byte().numpy()).save(tmp_path / "images" / "a" / f"{i}.png")
    assert main(["cache-latents", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "images"),
                 "--out", str(tmp_path / "cache"), "--flip", "--num-workers", "0", "--device", "cpu",
                 "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"encoded 6 images \(12 encodes\) in [\d.]+ s in fp32 on cpu: [\d.]+ images/s, "
                     r"[\d.]+ encodes/s", out), out
    assert "cached 6 images x 2 views of 8 x 4 latents (encoded in fp32)" in out


def test_on_the_fly_latents_equal_the_cached_view_of_the_same_mirror_choice(tokenizer, tmp_path):
    data = RandomImages(8)
    build_latent_cache(tokenizer, data, tmp_path, tokenizer_source="tiny", ctx=init_distributed("cpu"), flip=True,
                       batch_size=3, shard_size=5, num_workers=0)
    cache = LatentCache(tmp_path)
    stats = LatentStats(cache.info.mean, cache.info.std, "cache")
    split = BatchSplit(8, 1, 1, 0)
    mirrored = BatchRandom(0, 1, split, 0, "cpu").rand() < 0.5  # the draw EncodedImages makes first
    assert 0 < int(mirrored.sum()) < 8  # both choices occur, so both views are compared
    on_the_fly, labels = EncodedImages(tokenizer, stats, flip=True, precision="fp32")(
        (data.images, torch.arange(8) % 3), BatchRandom(0, 1, split, 0, "cpu"))
    cached = torch.stack([cache[i][0][int(mirrored[i])] for i in range(8)])
    torch.testing.assert_close(on_the_fly, stats.normalize(cached), rtol=0, atol=1e-5)


def test_a_cache_of_another_precision_than_the_run_is_warned_about(tokenizer, tmp_path):
    build_latent_cache(tokenizer, RandomImages(4), tmp_path, tokenizer_source="tiny", ctx=init_distributed("cpu"),
                       num_workers=0)
    cache = LatentCache(tmp_path)
    with pytest.warns(UserWarning, match=r"was encoded in fp32, but this run computes in bf16 "
                                         r"\(run.precision bf16 on cuda\).*--precision bf16"):
        check_cache_precision(cache, "bf16", torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_cache_precision(cache, "bf16", torch.device("cpu"))  # the CPU run computes in fp32 too
        check_cache_precision(cache, "fp32", torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_bf16_cache_holds_what_bf16_training_encodes(tokenizer, tmp_path):
    """The pinned, non-blocking copies land intact; bf16 is recorded; the one-pass views match two passes."""
    gpu = tokenizer.to("cuda")
    data = RandomImages(40)
    build_latent_cache(gpu, data, tmp_path, tokenizer_source="tiny", ctx=init_distributed("cuda"), flip=True,
                       batch_size=8, shard_size=16, num_workers=0)
    cache = LatentCache(tmp_path)
    assert cache.info.precision == "bf16"
    images = data.images.cuda()
    stored = torch.stack([cache[i][0] for i in range(40)]).cuda()
    same_batches = torch.cat([encode_views(gpu, images[i:i + 8], flip=True, precision="bf16") for i in range(0, 40, 8)])
    torch.testing.assert_close(stored, same_batches, rtol=0, atol=1e-6)
    two = torch.stack([encode_latents(gpu, images, precision="bf16"),
                       encode_latents(gpu, images.flip(-1), precision="bf16")], 1)
    torch.testing.assert_close(stored, two, rtol=0.02, atol=0.02)  # bf16 kernels may differ with the batch size
    fp32 = encode_views(gpu, images, flip=True, precision="fp32")
    assert 0 < float((stored - fp32).abs().max()) < 0.1 * float(fp32.abs().max())  # bf16 rounding, nothing worse
    tokenizer.to("cpu")
