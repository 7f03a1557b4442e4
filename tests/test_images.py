"""Image checks and re-encoding on real images: reasons for bad bytes, sizes after resize."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.images import BadImage, inspect_image, reencode, resized_size


@pytest.fixture(scope="module")
def photo() -> bytes:
    import skimage.data

    out = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(out, "JPEG", quality=90)  # 451x300 RGB
    return out.getvalue()


def _as(jpeg: bytes, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, fmt)
    return out.getvalue()


def test_good_image_info(photo):
    img, info = inspect_image(photo, max_pixels=10**8, full=True)
    assert (info.format, info.width, info.height) == ("JPEG", 451, 300)


@pytest.mark.parametrize("mangle,reason", [
    (lambda b: b"", "empty"),
    (lambda b: b"GIF89a but not really" * 3, "not_an_image"),
    (lambda b: _as(b, "GIF")[:-40], "truncated"),
    (lambda b: _as(b, "PNG")[:-20], "truncated"),
    (lambda b: b"hello world, plain text", "not_an_image"),
    (lambda b: b[: len(b) // 3], "truncated"),
])
def test_bad_bytes_have_reasons(photo, mangle, reason):
    with pytest.raises(BadImage) as e:
        inspect_image(mangle(photo), max_pixels=10**8, full=False)
    assert e.value.reason == reason and e.value.detail


def test_corrupt_data_needs_full_decode(photo):
    # Garbage inside the compressed pixel data, end marker intact: only decoding every pixel tells.
    data = bytearray(_as(photo, "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 5000: idat + 5400] = b"\x55" * 400
    inspect_image(bytes(data), max_pixels=10**8, full=False)
    with pytest.raises(BadImage) as e:
        inspect_image(bytes(data), max_pixels=10**8, full=True)
    assert e.value.reason == "corrupt"


def test_pixel_limit(photo):
    with pytest.raises(BadImage, match="451x300 = 135300 pixels > max_image_pixels 100000") as e:
        inspect_image(photo, max_pixels=100_000, full=False)
    assert e.value.reason == "decompression_bomb"


def test_resized_size_rules():
    assert resized_size(400, 200, "shorter", 100) == (200, 100)
    assert resized_size(400, 200, "longer", 100) == (100, 50)
    assert resized_size(400, 200, "center_crop", 100) == (200, 100)
    assert resized_size(50, 40, "shorter", 100) == (50, 40)  # never upscale


@pytest.mark.parametrize("fmt,pil", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_reencode_center_crop(photo, fmt, pil):
    img, _ = inspect_image(photo, max_pixels=10**8, full=False)
    data, w, h = reencode(img, fmt=fmt, quality=85, resize="center_crop", size=64)
    out = Image.open(io.BytesIO(data))
    assert (out.format, out.size, (w, h), out.mode) == (pil, (64, 64), (64, 64), "RGB")


def test_reencode_is_deterministic_and_converts_modes(photo):
    rgba = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("RGBA").save(rgba, "PNG")
    first = reencode(Image.open(io.BytesIO(rgba.getvalue())), fmt="jpg", quality=80, resize="longer", size=100)
    again = reencode(Image.open(io.BytesIO(rgba.getvalue())), fmt="jpg", quality=80, resize="longer", size=100)
    assert first == again and first[1:] == (100, 67)
    assert Image.open(io.BytesIO(first[0])).mode == "RGB"
