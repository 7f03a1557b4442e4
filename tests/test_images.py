"""Image checks, mode conversion and re-encoding on real images: reasons for bad bytes, sizes
after resize, and every image mode's pixels as docs/formats.md ("Image modes") promises them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from image_modes import ModeCase, assert_pixels, mode_cases
from pipeline.images import (BadImage, check_image, exif_orientation, load_pixels, open_image, reencode,
                             resized_size, to_model_mode)

MODE_CASES = mode_cases()


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


# An orientation only in XMP (Pillow reads it when EXIF has none): the fast path leaves it to Pillow.
_XMP_ORIENTATION_6 = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
                      b'syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
                      b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("fmt,save", [
    ("JPEG", {}), ("JPEG", {"progressive": True}), ("JPEG", {"mode": "L"}), ("JPEG", {"mode": "CMYK"}),
    ("JPEG", {"mode": "CMYK", "icc_profile": b"not checked here"}), ("JPEG", {"orientation": 3}),
    ("JPEG", {"orientation": 6}), ("JPEG", {"orientation": 8}), ("JPEG", {"xmp": _XMP_ORIENTATION_6}),
    ("PNG", {}), ("PNG", {"mode": "P"}),
    ("PNG", {"mode": "P", "transparency": 0}), ("PNG", {"mode": "LA"}), ("PNG", {"mode": "RGBA"}),
    ("PNG", {"mode": "I;16"}), ("PNG", {"mode": "1"}), ("PNG", {"orientation": 5}), ("WEBP", {}), ("GIF", {}),
    ("BMP", {}), ("TIFF", {}), ("TIFF", {"mode": "I;16"}), ("TIFF", {"orientation": 8}),
])
def test_fast_header_agrees_with_pillow(photo, fmt, save):
    """The pass-through path reads JPEG/PNG headers itself (size, mode, depth, transparency,
    EXIF orientation, ICC); it must say what Pillow says. Orientations 5-8 swap the sides."""
    save = dict(save)
    mode = save.pop("mode", "RGB")
    img = Image.open(io.BytesIO(photo)).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    if "orientation" in save:
        save["exif"] = _exif(save.pop("orientation"))  # JPEG: an APP1 segment; PNG: an eXIf chunk
    out = io.BytesIO()
    img.save(out, fmt, **save)
    data = out.getvalue()
    fast = check_image(data, max_pixels=10**8)
    img, slow = open_image(data, max_pixels=10**8)
    assert fast == slow
    assert (fast.width, fast.height) == ((300, 451) if slow.orientation in (5, 6, 7, 8) else (451, 300))
    load_pixels(img)
    assert to_model_mode(img).size == (fast.width, fast.height)  # what the loader reads


def test_fast_header_of_16bit_png_and_exif_after_the_pixels(photo):
    """A 16-bit RGB PNG opens as RGB in Pillow: only the header says 16 bits. An eXIf chunk
    after the image data is still an orientation (Pillow reads it while decoding)."""
    from image_modes import png16

    data = png16(np.zeros((3, 5, 3), np.uint16), 2)
    assert check_image(data, max_pixels=100) == open_image(data, max_pixels=100)[1]
    assert check_image(data, max_pixels=100).conversions == ("16bit_to_8bit",)
    exif = _exif(6)
    chunk = len(exif).to_bytes(4, "big") + b"eXIf" + exif + __import__("zlib").crc32(b"eXIf" + exif).to_bytes(4, "big")
    late = data[:-12] + chunk + data[-12:]  # just before IEND
    fast, (img, slow) = check_image(late, max_pixels=100), open_image(late, max_pixels=100)
    assert fast == slow and (fast.width, fast.height, fast.orientation) == (3, 5, 6)
    load_pixels(img)
    assert to_model_mode(img).size == (3, 5)


@pytest.mark.parametrize("orientation", range(0, 10))
def test_exif_orientation_is_read_like_pillow(orientation):
    raw = _exif(orientation)  # b"Exif\0\0" and a TIFF header, as in a JPEG's APP1; a PNG's eXIf lacks the prefix
    want = Image.Exif()
    want.load(raw)
    assert exif_orientation(raw) == exif_orientation(raw[6:]) == want.get(0x0112, 0)
    assert exif_orientation(b"Exif\0\0garbage") is None and exif_orientation(b"") is None


# ---------------------------------------------------------------------------------------------
# Every image mode -> 8-bit L/RGB: the pixels docs/formats.md promises, or a refusal with a reason


@pytest.mark.parametrize("case", MODE_CASES, ids=lambda c: c.file)
def test_every_mode_converts_to_its_documented_pixels_or_is_refused(case: ModeCase):
    if case.refused:
        with pytest.raises(BadImage) as e:
            check_image(case.data, max_pixels=10**8)  # refused already where shards are written
        assert e.value.reason == case.refused and ("range" in e.value.detail or "mode" in e.value.detail)
        return
    info = check_image(case.data, max_pixels=10**8)
    img, slow = open_image(case.data, max_pixels=10**8)
    assert info == slow and info.conversions == case.conversions
    assert (info.width, info.height) == (64, 48)  # as displayed, after the EXIF orientation
    load_pixels(img)
    out = to_model_mode(img)
    assert out.mode == case.mode
    assert_pixels(np.asarray(out), case)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("case", [c for c in MODE_CASES if not c.refused], ids=lambda c: c.file)
def test_reencode_stores_the_converted_pixels(case: ModeCase, fmt):
    """--encode writes what the loader would read from the source: 8-bit, upright, converted."""
    img, _ = open_image(case.data, max_pixels=10**8)
    data, w, h = reencode(img, fmt=fmt, quality=95, resize="none", size=None)
    out = Image.open(io.BytesIO(data))
    assert (w, h) == out.size == (64, 48) and out.mode == case.mode
    assert_pixels(np.asarray(out), case, lossy=fmt == "jpg")


def test_float_with_nan_and_a_broken_cmyk_profile():
    nan = np.full((4, 4), 0.5, np.float32)
    nan[1, 1] = np.nan
    out = io.BytesIO()
    Image.fromarray(nan).save(out, "TIFF")
    with pytest.raises(BadImage, match="NaN") as e:
        check_image(out.getvalue(), max_pixels=100)
    assert e.value.reason == "unsupported_mode"
    # A profile LittleCMS cannot read: Pillow's formula, as for a CMYK image without one.
    out = io.BytesIO()
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(out, "JPEG", quality=100, icc_profile=b"not a profile")
    img, info = open_image(out.getvalue(), max_pixels=100)
    load_pixels(img)
    assert info.icc and np.abs(np.asarray(to_model_mode(img)).astype(int) - (0, 255, 255)).max() <= 2


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
