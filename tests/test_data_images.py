"""Image folders: both layouts, ADM's crops against an independent computation, broken files skipped and counted."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from ctok.data import BrokenImage, ImageFolder, center_crop_adm, random_crop_adm
from ctok.training.sharding import BatchSplit, GlobalBatchSampler


def solid(path, rgb, size=(40, 30)):
    Image.new("RGB", size, rgb).save(path)


@pytest.fixture
def imagenet_like(tmp_path):
    """Two classes (created in reverse order), nested files, mixed-case extensions, files to ignore."""
    root = tmp_path / "train"
    for name in ("n02_cat", "n01_dog"):
        (root / name / "deeper").mkdir(parents=True)
    solid(root / "n02_cat" / "b.PNG", (255, 0, 127))
    solid(root / "n02_cat" / "a.jpeg", (0, 255, 0))
    solid(root / "n02_cat" / "deeper" / "c.webp", (0, 0, 255))
    solid(root / "n01_dog" / "z.BMP", (10, 20, 30))
    solid(root / "n01_dog" / "deeper" / "y.JPG", (200, 200, 200))
    (root / "n01_dog" / "notes.txt").write_text("not an image")
    solid(root / "n01_dog" / ".hidden.png", (1, 1, 1))
    (root / ".cache").mkdir()
    return root


def test_imagenet_layout_sorted_classes_and_stable_listing(imagenet_like):
    dataset = ImageFolder(imagenet_like, 16)
    assert dataset.classes == ["n01_dog", "n02_cat"] and dataset.has_labels
    relative = [(p.relative_to(imagenet_like).as_posix(), y) for p, y in dataset.samples]
    assert relative == [
        ("n01_dog/deeper/y.JPG", 0), ("n01_dog/z.BMP", 0),
        ("n02_cat/a.jpeg", 1), ("n02_cat/b.PNG", 1), ("n02_cat/deeper/c.webp", 1),
    ]
    assert [p for p, _ in ImageFolder(imagenet_like, 8).samples] == [p for p, _ in dataset.samples]


def test_flat_folder_is_unlabelled(tmp_path):
    for i, name in enumerate(["2.png", "10.jpg", "1.webp"]):
        solid(tmp_path / name, (i * 50, 0, 0))
    dataset = ImageFolder(tmp_path, 8)
    assert not dataset.has_labels and dataset.classes == []
    assert [(p.name, y) for p, y in dataset.samples] == [("1.webp", 0), ("10.jpg", 0), ("2.png", 0)]


def test_items_are_rgb_tensors_in_minus_one_to_one(imagenet_like):
    dataset = ImageFolder(imagenet_like, 16)
    x, y = dataset[3]  # n02_cat/b.PNG, solid (255, 0, 127), a lossless format
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert torch.allclose(x[:, 5, 7], torch.tensor([1.0, -1.0, 127 / 127.5 - 1]))
    assert torch.equal(x, x[:, :1, :1].expand_as(x))  # still solid after the crop


def test_unclear_layouts_are_refused_with_the_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory"):
        ImageFolder(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images \(bmp/jpeg/jpg/png/tif/tiff/webp, any case\) found in"):
        ImageFolder(tmp_path / "empty", 8)
    mixed = tmp_path / "mixed"
    (mixed / "cls").mkdir(parents=True)
    solid(mixed / "top.png", (0, 0, 0))
    solid(mixed / "cls" / "inner.png", (0, 0, 0))
    with pytest.raises(ValueError, match="holds images both directly and in sub-folders"):
        ImageFolder(mixed, 8)
    gap = tmp_path / "gap"
    (gap / "a").mkdir(parents=True)
    (gap / "b").mkdir()
    solid(gap / "a" / "x.png", (0, 0, 0))
    with pytest.raises(ValueError,
                       match=r"class folder \S*gap/b holds no images .*class ids come from the sorted folder names"):
        ImageFolder(gap, 8)
    with pytest.raises(ValueError, match="crop must be one of"):
        ImageFolder(gap / "a", 8, crop="middle")


def test_broken_files_are_skipped_and_counted_across_workers(tmp_path):
    for i in range(6):
        solid(tmp_path / f"{i}.png", (i * 40, 0, 0))
    (tmp_path / "3.png").write_bytes(b"this is no png")
    good = (tmp_path / "4.png").read_bytes()
    (tmp_path / "4.png").write_bytes(good[: len(good) // 2])  # truncated mid-stream
    dataset = ImageFolder(tmp_path, 8)
    broken = dataset[3]
    assert isinstance(broken, BrokenImage) and broken.path.endswith("3.png")
    assert "UnidentifiedImageError" in broken.reason

    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=dataset.collate)
    batches = list(loader)
    skipped = [p for b in batches for p in b.skipped]
    assert sorted(skipped) == [str(tmp_path / "3.png"), str(tmp_path / "4.png")]
    assert [len(b.images) for b in batches] == [3, 1]
    assert torch.cat([b.labels for b in batches]).tolist() == [0, 0, 0, 0]
    reds = torch.cat([b.images[:, 0, 0, 0] for b in batches])
    assert torch.allclose(reds, torch.tensor([0, 40, 80, 200]) / 127.5 - 1)


def test_a_batch_of_only_broken_files_is_empty_not_an_error(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 nothing else")
    dataset = ImageFolder(tmp_path, 8)
    batch = dataset.collate([dataset[0]])
    assert batch.images.shape == (0, 3, 8, 8) and batch.labels.shape == (0,) and len(batch.skipped) == 1


def test_horizontal_flip_is_random_and_only_when_asked(tmp_path):
    array = np.zeros((16, 16, 3), np.uint8)
    array[:, :8] = 255  # left half white
    Image.fromarray(array).save(tmp_path / "half.png")
    torch.manual_seed(0)
    flipped = ImageFolder(tmp_path, 16, hflip=True)
    lefts = {float(flipped[0][0][0, 0, 0]) for _ in range(30)}
    assert lefts == {1.0, -1.0}
    plain = ImageFolder(tmp_path, 16)
    assert {float(plain[0][0][0, 0, 0]) for _ in range(10)} == {1.0}


def adm_crop_independently(array: np.ndarray, size: int, shift: int = 0) -> np.ndarray:
    """The ADM recipe with other tools: 2x2 block means for BOX halving, torch's antialiased bicubic."""
    x = array.astype(np.float64)
    while min(x.shape[:2]) >= 2 * size:
        h, w = x.shape[0] // 2, x.shape[1] // 2
        x = np.round(x[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3)))
    scale = size / min(x.shape[:2])
    h, w = round(x.shape[0] * scale), round(x.shape[1] * scale)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    y = F.interpolate(t, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    y = y[0].permute(1, 2, 0).numpy().round().clip(0, 255)
    top, left = (h - size) // 2, (w - size) // 2
    if w > h:  # ``shift`` moves the crop along the long side, where there is room
        left += shift
    else:
        top += shift
    return y[top : top + size, left : left + size]


def smooth_image(width: int, height: int, seed: int) -> np.ndarray:
    """Sums of slow sinusoids: bicubic overshoot stays inside [0, 255], so PIL's clipping between
    its two passes (which torch does not do) cannot make the two computations differ."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    out = np.zeros((height, width, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy, phase = rng.uniform(0, 0.08, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
            out[..., c] += np.sin(fx * xs + fy * ys + phase)
    return np.clip(127.5 + 30 * out, 0, 255).astype(np.uint8)


# Even sides wherever BOX halving happens (then a BOX step is exactly a 2x2 mean).
@pytest.mark.parametrize("width,height,size", [(300, 200, 64), (1000, 700, 128), (97, 131, 64), (20, 50, 32)])
def test_center_crop_adm_matches_an_independent_computation(width, height, size):
    array = smooth_image(width, height, seed=width)
    ours = np.asarray(center_crop_adm(Image.fromarray(array), size)).astype(np.float64)
    assert ours.shape == (size, size, 3)
    expected = adm_crop_independently(array, size)
    # Both round to uint8 after each step, at slightly different places (PIL between its passes).
    assert np.abs(ours - expected).max() <= 3
    assert np.abs(ours - expected).mean() <= 1.2
    # A crop one pixel off differs far more: the comparison does pin down the crop's place.
    shifted = adm_crop_independently(array, size, shift=1)
    assert np.abs(ours - shifted).mean() > 2 * np.abs(ours - expected).mean()


def test_center_crop_adm_keeps_a_centred_pattern_centred():
    for width, height in [(400, 240), (240, 400), (401, 257)]:
        array = np.zeros((height, width), np.uint8)
        cy, cx = height // 2, width // 2
        array[cy - 20 : cy + 20, cx - 20 : cx + 20] = 255
        out = np.asarray(center_crop_adm(Image.fromarray(array).convert("RGB"), 64))[..., 0].astype(float)
        ys, xs = np.indices(out.shape)
        centroid = (float((ys * out).sum() / out.sum()), float((xs * out).sum() / out.sum()))
        assert abs(centroid[0] - 31.5) <= 0.75 and abs(centroid[1] - 31.5) <= 0.75, (width, height, centroid)


def test_center_crop_adm_leaves_an_image_of_the_right_size_untouched():
    array = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(center_crop_adm(Image.fromarray(array), 48)), array)
    with pytest.raises(ValueError, match="crop size must be a positive number of pixels, got 0"):
        center_crop_adm(Image.fromarray(array), 0)


def test_random_crop_adm_moves_within_the_scaled_image():
    # A horizontal ramp: the crop's left column tells where it was cut.
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (64, 1, 3))
    image = Image.fromarray(ramp)
    torch.manual_seed(0)
    crops = [np.asarray(random_crop_adm(image, 32)) for _ in range(20)]
    assert all(c.shape == (32, 32, 3) for c in crops)
    starts = {int(c[0, 0, 0]) for c in crops}
    assert len(starts) > 5  # different places
    # With the fractions pinned to 1 and a square image it is exactly the centre crop.
    square = Image.fromarray(np.random.default_rng(2).integers(0, 256, (100, 100, 3), dtype=np.uint8))
    pinned = random_crop_adm(square, 40, min_fraction=1.0, max_fraction=1.0)
    assert np.array_equal(np.asarray(pinned), np.asarray(center_crop_adm(square, 40)))
    with pytest.raises(ValueError, match="need 0 < min_fraction <= max_fraction <= 1"):
        random_crop_adm(square, 40, min_fraction=0.9, max_fraction=0.5)
    # A generator of its own: the same seed gives the same crop, and the global generator is left alone.
    state = torch.get_rng_state()
    again = [np.asarray(random_crop_adm(image, 32, generator=torch.Generator().manual_seed(9))) for _ in range(2)]
    assert np.array_equal(*again) and torch.equal(torch.get_rng_state(), state)


def test_the_sampler_s_seeded_indices_crop_and_flip_each_sample_alike_in_any_worker_or_process(tmp_path):
    """Random crops and flips drawn from the sample's seed: the same for 1 process reading in the main
    process and for 2 processes x 2 workers resumed at step 1, whatever the global generators hold;
    a new epoch draws new ones."""
    for i in range(8):
        Image.fromarray(smooth_image(48 + i, 40, seed=i)).save(tmp_path / f"{i}.png")
    dataset = ImageFolder(tmp_path, 24, crop="random", hflip=True)

    def crops(world, workers, start, steps, global_seed):
        torch.manual_seed(global_seed)  # the workers' generators follow it; the crops must not
        found = {}
        for rank in range(world):
            sampler = GlobalBatchSampler(8, BatchSplit(4, 1, world, rank), seed=5, start_step=start)
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=dataset.collate)
            for step, indices, batch in zip(range(start, start + steps), iter(sampler), loader):
                found.update({(step // 2, int(i)): x for i, x in zip(indices, batch.images, strict=True)})
        return found

    alone = crops(world=1, workers=0, start=0, steps=4, global_seed=0)
    split = crops(world=2, workers=2, start=1, steps=3, global_seed=1)
    assert len(alone) == 16 and len(split) == 12
    assert all(torch.equal(x, alone[key]) for key, x in split.items())
    assert sum(not torch.equal(alone[(0, i)], alone[(1, i)]) for i in range(8)) >= 6
    # A plain index still draws from the global generator, as before.
    def plain(global_seed):
        torch.manual_seed(global_seed)
        return torch.stack([dataset[i][0] for i in range(8)])

    assert torch.equal(plain(2), plain(2)) and not torch.equal(plain(2), plain(3))
