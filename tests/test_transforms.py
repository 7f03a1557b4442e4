"""Per-sample augmentation, decoding and batch mixing (pipeline/transforms.py), on real images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from image_modes import ModeCase, assert_pixels, luma, mode_cases
from pipeline.images import BadImage
from pipeline.transforms import (AugmentConfig, BatchMixer, batch_buffer, decode_image, eval_transform,
                                 normalize_batch, train_min_side, train_transform)
from vitpipe.config import ConfigError, build_config
from vitpipe.errors import UserError


def _jpeg(width: int, height: int) -> bytes:
    import skimage.data

    img = Image.fromarray(skimage.data.astronaut()).resize((width, height))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _digit_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    return x, torch.tensor(d.target[:n], dtype=torch.long)


def test_augment_config_rejects_bad_ranges_naming_the_value():
    with pytest.raises(ConfigError, match=r"crop_scale.*0 < low <= high <= 1"):
        build_config(AugmentConfig, overrides={"crop_scale": [0.9, 0.2]})
    with pytest.raises(ConfigError, match="hflip"):
        build_config(AugmentConfig, overrides={"hflip": 1.5})
    assert not AugmentConfig().soft_targets
    assert AugmentConfig(label_smoothing=0.1).soft_targets


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_train_transform_shapes_and_is_seeded_by_torch(mode, channels):
    img = decode_image(_jpeg(120, 90), mode=mode)
    t = train_transform(AugmentConfig(rand_augment=True), 48)
    torch.manual_seed(3)
    a = t(img)
    torch.manual_seed(3)
    b = t(img)
    torch.manual_seed(4)
    c = t(img)
    assert a.shape == (channels, 48, 48) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eval_transform_is_resize_then_center_crop():
    img = decode_image(_jpeg(200, 100), mode="RGB")
    out = eval_transform(64, crop_pct=0.8)(img)
    assert out.shape == (3, 64, 64)
    # shorter side 100 -> 80, longer 200 -> 160; the center crop keeps the middle of the image
    full = eval_transform(80, crop_pct=1.0)  # 80x80 center crop of the 160x80 resize
    assert full(img).shape == (3, 80, 80)
    assert torch.equal(eval_transform(64)(img), eval_transform(64)(img))  # no randomness


def test_decode_image_uses_jpeg_draft_but_keeps_enough_pixels():
    data = _jpeg(800, 600)
    small = decode_image(data, mode="RGB", min_side=140)
    assert min(small.size) >= 140 and small.size[0] < 800  # decoded at a reduced scale
    assert decode_image(data, mode="L").size == (800, 600)
    with pytest.raises(Exception):
        decode_image(b"not an image at all", mode="RGB")
    with pytest.raises(Exception):
        decode_image(data[: len(data) // 3], mode="RGB")  # cut short


@pytest.mark.parametrize("case", mode_cases(), ids=lambda c: c.file)
def test_decode_image_reads_every_mode_as_documented(case: ModeCase):
    """The loader's decode (training and evaluation, data.channels 3 and 1): upright 8-bit
    pixels as docs/formats.md says, or BadImage naming why (a shard set written elsewhere may
    hold what the shard stage would refuse)."""
    if case.refused:
        for mode in ("RGB", "L"):
            with pytest.raises(BadImage) as e:
                decode_image(case.data, mode=mode)
            assert e.value.reason == case.refused
        return
    color, gray = decode_image(case.data, mode="RGB"), decode_image(case.data, mode="L")
    assert (color.mode, gray.mode, color.size, gray.size) == ("RGB", "L", (64, 48), (64, 48))
    color, gray = np.asarray(color), np.asarray(gray)
    if case.mode == "L":
        assert_pixels(gray, case)
        assert (color == gray[..., None]).all()
    else:
        assert_pixels(color, case)
        if case.name != "cmyk_icc":
            assert np.abs(gray.astype(int) - luma(color)).max() <= 1


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_draft_and_exif_orientation_together(orientation):
    """A rotated JPEG decoded at reduced scale still comes out upright, with enough pixels."""
    case = next(c for c in mode_cases() if c.name == f"exif{orientation}")
    small = decode_image(case.data, mode="RGB", min_side=20)
    assert small.size == (32, 24)  # 1/2 scale of the upright 64 x 48
    want = np.asarray(Image.fromarray(case.expected).resize((32, 24), Image.Resampling.BOX))
    assert np.abs(np.asarray(small).astype(int) - want).mean() < 8


def test_train_min_side_leaves_the_smallest_crop_at_full_resolution():
    aug = AugmentConfig(crop_scale=(0.25, 1.0), crop_ratio=(1.0, 1.0))
    assert train_min_side(aug, 32) == 64
    wide = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(2.0, 4.0))  # crops at most 1/2 as tall as wide
    assert train_min_side(wide, 32) == 64


def test_normalize_batch_matches_the_formula():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    want = (x.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(normalize_batch(x, mean, std), want)


class _SharedFlags(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.tensor([batch_buffer(2, (3, 4, 4)).is_shared()])


def test_batch_buffer_is_shared_memory_in_a_worker_only():
    assert not batch_buffer(2, (3, 4, 4)).is_shared()
    flags = list(torch.utils.data.DataLoader(_SharedFlags(), batch_size=None, num_workers=1))
    assert flags == [torch.tensor([True])]


def test_label_smoothing_only():
    x, y = _digit_batch()
    images, soft = BatchMixer(AugmentConfig(label_smoothing=0.1), 10)(x.clone(), y)
    assert torch.equal(images, x)
    assert soft.shape == (8, 10)
    torch.testing.assert_close(soft[torch.arange(8), y], torch.full((8,), 0.9 + 0.01))
    torch.testing.assert_close(soft.sum(1), torch.ones(8))


def test_mixup_mixes_each_image_with_its_neighbour_by_the_target_weight():
    x, y = _digit_batch()
    torch.manual_seed(0)
    images, soft = BatchMixer(AugmentConfig(mixup_alpha=0.8), 10)(x.clone(), y)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    prev = y.roll(1)
    i = int(torch.nonzero(y != prev)[0])
    lam = float(soft[i, y[i]])
    assert 0 < lam < 1
    torch.testing.assert_close(images[i], lam * x[i] + (1 - lam) * x.roll(1, 0)[i])


def test_cutmix_pastes_a_box_whose_area_is_the_target_weight():
    x, y = _digit_batch()
    x = x + torch.arange(8.0)[:, None, None, None] * 10  # every image distinguishable per pixel
    torch.manual_seed(1)
    images, soft = BatchMixer(AugmentConfig(cutmix_alpha=1.0, label_smoothing=0.2), 10)(x.clone(), y)
    i = int(torch.nonzero(y != y.roll(1))[0])
    from_self = (images[i] == x[i]).all(0).float().mean()
    from_prev = (images[i] == x.roll(1, 0)[i]).all(0).float().mean()
    assert from_self + from_prev == 1  # every pixel comes from one of the two images
    unsmoothed = (soft[i, y[i]] - 0.2 / 10) / 0.8
    torch.testing.assert_close(unsmoothed, from_self, atol=1e-5, rtol=0)


def test_mixing_an_unlabelled_set_is_a_user_error():
    with pytest.raises(UserError, match="mixup_alpha"):
        BatchMixer(AugmentConfig(mixup_alpha=0.2), 0)
    images = torch.zeros(2, 3, 4, 4)
    targets = torch.tensor([-1, -1])
    assert BatchMixer(AugmentConfig(), 0)(images, targets)[1] is targets
