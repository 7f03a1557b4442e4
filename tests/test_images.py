"""Image checks and re-encoding on real images: reasons for bad bytes, sizes after resize."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.images import BadImage, check_image, open_image, reencode, resized_size


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
    for decode in (False, True):
        info = check_image(photo, max_pixels=10**8, decode=decode)
        assert (info.format, info.width, info.height) == ("JPEG", 451, 300)


@pytest.mark.parametrize("fmt,save", [
    ("JPEG", {}), ("JPEG", {"progressive": True}), ("JPEG", {"mode": "L"}), ("JPEG", {"mode": "CMYK"}),
    ("JPEG", {"exif": True}), ("PNG", {}), ("PNG", {"mode": "P"}), ("WEBP", {}), ("GIF", {}), ("BMP", {}),
    ("TIFF", {}),
])
def test_fast_header_agrees_with_pillow(photo, fmt, save):
    """The pass-through path reads JPEG/PNG sizes itself; it must say what Pillow says."""
    save = dict(save)
    img = Image.open(io.BytesIO(photo)).convert(save.pop("mode", "RGB"))
    if save.pop("exif", False):
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation; the APP1 segment comes before the frame header
        save["exif"] = exif.tobytes()
    out = io.BytesIO()
    img.save(out, fmt, **save)
    data = out.getvalue()
    fast = check_image(data, max_pixels=10**8)
    _, slow = open_image(data, max_pixels=10**8)
    assert fast == slow and (fast.width, fast.height) == (451, 300)


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
        check_image(mangle(photo), max_pixels=10**8)
    assert e.value.reason == reason and e.value.detail


def test_corrupt_data_needs_full_decode(photo):
    # Garbage inside the compressed pixel data, end marker intact: only decoding every pixel tells.
    data = bytearray(_as(photo, "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 5000: idat + 5400] = b"\x55" * 400
    check_image(bytes(data), max_pixels=10**8)
    with pytest.raises(BadImage) as e:
        check_image(bytes(data), max_pixels=10**8, decode=True)
    assert e.value.reason == "corrupt"


def test_pixel_limit(photo):
    for check in (check_image, open_image):
        with pytest.raises(BadImage, match="451x300 = 135300 pixels > max_image_pixels 100000") as e:
            check(photo, max_pixels=100_000)
        assert e.value.reason == "decompression_bomb"


def test_resized_size_rules():
    assert resized_size(400, 200, "shorter", 100) == (200, 100)
    assert resized_size(400, 200, "longer", 100) == (100, 50)
    assert resized_size(400, 200, "center_crop", 100) == (200, 100)
    assert resized_size(50, 40, "shorter", 100) == (50, 40)  # never upscale


@pytest.mark.parametrize("fmt,pil", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_reencode_center_crop(photo, fmt, pil):
    img, _ = open_image(photo, max_pixels=10**8)
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
