"""The FID Inception network: TF's resize, agreement with torch-fidelity, finding and loading its weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctok.metrics.inception import INCEPTION_WEIGHTS, RANDOM_IDENTITY, InceptionV3Features, load_inception
from ctok.metrics.tf_resize import resize_bilinear_tf


def tf_resize_by_definition(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF 1.x ResizeBilinear (align_corners=False), one output pixel at a time, in float32."""
    in_h, in_w = image.shape[-2:]
    f32 = np.float32
    scale_y, scale_x = f32(in_h) / f32(out_h), f32(in_w) / f32(out_w)
    out = np.zeros(image.shape[:-2] + (out_h, out_w), dtype=f32)
    for i in range(out_h):
        sy = f32(i) * scale_y
        y0, y1 = int(np.floor(sy)), min(int(np.ceil(sy)), in_h - 1)
        ly = sy - f32(np.floor(sy))
        for j in range(out_w):
            sx = f32(j) * scale_x
            x0, x1 = int(np.floor(sx)), min(int(np.ceil(sx)), in_w - 1)
            lx = sx - f32(np.floor(sx))
            top = image[..., y0, x0] + (image[..., y0, x1] - image[..., y0, x0]) * lx
            bottom = image[..., y1, x0] + (image[..., y1, x1] - image[..., y1, x0]) * lx
            out[..., i, j] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize("in_size,out_size",
                         [((5, 7), (13, 11)), ((16, 12), (7, 5)), ((9, 9), (9, 9)), ((24, 20), (29, 29))])
def test_resize_matches_tensorflow_definition_bit_for_bit(in_size, out_size):
    image = np.random.default_rng(0).integers(0, 256, (2, 3, *in_size)).astype(np.float32)
    got = resize_bilinear_tf(torch.from_numpy(image), out_size).numpy()
    np.testing.assert_array_equal(got, tf_resize_by_definition(image, *out_size))


def test_resize_agrees_with_torch_fidelity_and_differs_from_torch_interpolate():
    compat = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    x = torch.randint(0, 256, (2, 3, 64, 48), generator=torch.Generator().manual_seed(1)).float()
    ours = resize_bilinear_tf(x, (299, 299))
    theirs = compat.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # Half-pixel centres and antialiasing are both different resizes.
    for other in (F.interpolate(x, (299, 299), mode="bilinear", align_corners=False),
                  F.interpolate(x, (299, 299), mode="bilinear", align_corners=False, antialias=True)):
        assert (ours - other).abs().max() > 1.0


@pytest.fixture(scope="module")
def random_inception():
    return load_inception("random")


@pytest.mark.slow
def test_features_equal_torch_fidelity_extractor_with_the_same_weights(random_inception, tmp_path):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    weights = tmp_path / "weights.pth"
    torch.save({k: v for k, v in random_inception.state_dict().items() if "num_batches" not in k}, weights)
    reference = fidelity.FeatureExtractorInceptionV3("inception", ["2048", "logits_unbiased"],
                                                     feature_extractor_weights_path=str(weights))
    mixed_6_conv = []
    reference.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: mixed_6_conv.append(out))
    pixels = torch.randint(0, 256, (2, 3, 80, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ours = random_inception(pixels.float() / 127.5 - 1)
    pool, logits = reference(pixels)
    spatial = mixed_6_conv[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # NHWC order, as ADM flattens
    assert ours["pool"].shape == (2, 2048) and ours["spatial"].shape == (2, 2023) and ours["logits"].shape == (2, 1008)
    for name, theirs in (("pool", pool), ("logits", logits), ("spatial", spatial)):
        torch.testing.assert_close(ours[name], theirs, rtol=1e-6, atol=1e-6 * float(theirs.abs().max()), msg=name)
    assert float(ours["pool"].std()) > 1e-2  # the random network's features are not degenerate


def test_random_network_is_deterministic_and_labelled(random_inception):
    again = load_inception("random")
    for (name, a), (_, b) in zip(random_inception.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert random_inception.identity == RANDOM_IDENTITY and "NOT comparable" in RANDOM_IDENTITY


def test_rejects_images_outside_minus_one_one(random_inception):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        random_inception(torch.full((1, 3, 16, 16), 200.0))
    with pytest.raises(ValueError, match=r"shape \(B, 3, B, B\)|must have shape"):
        random_inception(torch.zeros(1, 1, 16, 16))


def test_missing_weights_offline_name_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(INCEPTION_WEIGHTS.env_var, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        load_inception()
    message = str(err.value)
    assert INCEPTION_WEIGHTS.filename in message
    assert INCEPTION_WEIGHTS.url in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert INCEPTION_WEIGHTS.env_var in message
    monkeypatch.setenv(INCEPTION_WEIGHTS.env_var, str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError, match="CTOK_INCEPTION_WEIGHTS=.*names no file"):
        load_inception()


def test_weights_load_from_the_torch_hub_cache_and_name_their_checksum(random_inception, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(INCEPTION_WEIGHTS.env_var, raising=False)
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS.filename
    cached.parent.mkdir(parents=True)
    torch.save(random_inception.state_dict(), cached)
    with pytest.warns(UserWarning, match="not the published"):
        loaded = load_inception()
    import hashlib

    assert loaded.identity == f"inception-2015-12-05:sha256:{hashlib.sha256(cached.read_bytes()).hexdigest()}"
    assert torch.equal(loaded.fc.weight, random_inception.fc.weight)


class NotAStateDict:
    pass


def test_weight_files_are_loaded_without_running_pickled_code(tmp_path):
    hostile = tmp_path / "hostile.pth"
    torch.save({"weights": NotAStateDict()}, hostile)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="not a loadable PyTorch state dict"):
        load_inception(hostile)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="not an Inception-V3 FID weight file"):
        load_inception(wrong)


def test_network_is_frozen_and_in_eval_mode(random_inception):
    assert not random_inception.training
    assert not any(p.requires_grad for p in random_inception.parameters())
    assert isinstance(random_inception, InceptionV3Features)


def test_sfid_features_are_the_first_7_channels_of_mixed_6_conv_flattened_row_column_channel(random_inception,
                                                                                            monkeypatch):
    # A hand-made mixed_6/conv output whose value names its place: 1000 c + 100 h + w on the 17 x 17 grid.
    c, h, w = torch.meshgrid(torch.arange(192.0), torch.arange(17.0), torch.arange(17.0), indexing="ij")
    labelled = (1000 * c + 100 * h + w).expand(2, 192, 17, 17)
    zeros = torch.zeros(2, 192, 17, 17)
    monkeypatch.setattr(random_inception.Mixed_6d, "_forward", lambda x: [labelled, zeros, zeros, zeros])
    spatial = random_inception(torch.zeros(2, 3, 40, 40))["spatial"]
    assert spatial.shape == (2, 17 * 17 * 7)
    # Entry i is (row, column, channel) = (i // 119, i // 7 % 17, i % 7): ADM's NHWC flattening of 7 channels.
    i = torch.arange(2023)
    expected = 1000 * (i % 7) + 100 * (i // 119) + (i // 7 % 17)
    assert torch.equal(spatial[0], expected.float()) and torch.equal(spatial[1], expected.float())
