"""Check, convert and (optionally) re-encode one image; bad inputs raise `BadImage` with a reason.

Call `check_image(data, ...)` on each input's bytes before they go into a shard untouched: it
finds out the format, size and mode, and rejects what a training loader would choke on later. To
re-encode, `open_image` then `reencode` (resized jpg/webp/png bytes). Both are pure functions of
their inputs, so the same bytes always give the same result, in any process.

`to_model_mode(img, mode)` is the one place that turns a decoded image of any mode (16-bit,
float, alpha, palette, CMYK, EXIF-rotated...) into the upright 8-bit L or RGB the model reads; the
loader and `--encode` both call it, so a pass-through shard and a re-encoded one train on the same
pixels. The policy per mode is the table in docs/formats.md ("Image modes"); `ImageInfo.conversions`
names, from the header alone, which of its value-changing steps an image will go through, so the
shard stage can count them (`CONVERSIONS`).
"""

from __future__ import annotations

import functools
import io
import re
import struct
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

# Formats a shard may hold, by PIL format name -> file extension used for the tar member.
FORMAT_EXTENSIONS = {
    "JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff", "PPM": "ppm",
}
ENCODERS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}

# Failure reasons written to failures.jsonl (stable strings; users grep and count them).
REASONS = ("unreadable", "empty", "not_an_image", "unsupported_format", "unsupported_mode", "truncated",
           "corrupt", "decompression_bomb")

# What `to_model_mode` does to an image's values on the way to 8-bit L/RGB, by a stable id (each
# sample's .json and stats.json use the ids; the summary line the text). Lossless steps (palette
# lookup, 1-bit -> L) and the L <-> RGB choice of data.channels are not listed.
CONVERSIONS = {
    "16bit_to_8bit": "16-bit images scaled to 8 bits",
    "int32_to_8bit": "32-bit integer images scaled to 8 bits (as 16-bit values)",
    "float_to_8bit": "float images scaled from [0, 1] to 8 bits",
    "alpha_on_white": "images with transparency composited on white",
    "cmyk_icc_to_rgb": "CMYK images converted to RGB with their ICC profile",
    "cmyk_to_rgb": "CMYK images converted to RGB by Pillow's formula (no ICC profile)",
    "exif_rotated": "images turned upright by their EXIF orientation",
}

BACKGROUND = 255  # white: what transparent pixels are composited on (web images are drawn on white)

# Source modes and the 8-bit mode each becomes when data.channels does not decide (--encode).
_GRAY = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_COLOR = ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
_UINT16 = ("I;16", "I;16B", "I;16L", "I;16N")
# Modes whose pixel values decide whether they convert at all (their range is checked).
_RANGE_CHECKED = ("I", "F")
# EXIF orientation -> the transpose that makes the image upright (as PIL.ImageOps.exif_transpose).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
# A float image may overshoot [0, 1] by rounding error: less than half an 8-bit step rounds the
# same whether clipped or not, so such values are clipped, anything further refused.
_FLOAT_SLACK = 0.5 / 255


class BadImage(Exception):
    """An input that cannot go into a shard; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ImageInfo(NamedTuple):  # not a frozen dataclass: built per pass-through image, a NamedTuple is 3x cheaper
    format: str   # PIL format name, e.g. "JPEG"
    width: int    # as displayed: after the EXIF orientation (a 6 or 8 swaps the stored sides)
    height: int
    mode: str = "RGB"       # the PIL mode it opens in ("RGB", "I;16", "P", "CMYK"...)
    bits: int = 8           # bits per stored sample: 16 for 16-bit PNG/TIFF, which Pillow may open as RGB(A)
    alpha: bool = False     # an alpha channel or a transparent colour (PNG tRNS, GIF)
    orientation: int = 1    # EXIF orientation tag (1: upright)
    icc: bool = False       # carries an ICC profile (used for CMYK)

    @property
    def conversions(self) -> tuple[str, ...]:
        """Ids of the `CONVERSIONS` that `to_model_mode` applies to this image, in order."""
        out = []
        if self.mode == "F":
            out.append("float_to_8bit")
        elif self.mode == "I" and self.bits > 16:
            out.append("int32_to_8bit")
        elif self.bits == 16:
            out.append("16bit_to_8bit")
        if self.alpha:
            out.append("alpha_on_white")
        if self.mode == "CMYK":
            out.append("cmyk_icc_to_rgb" if self.icc else "cmyk_to_rgb")
        if self.orientation in _UPRIGHT:
            out.append("exif_rotated")
        return tuple(out)


def _ends_complete(fmt: str, data: bytes) -> bool:
    """Cheap check that a file was not cut short: the format's end marker is present."""
    tail = data[-64:].rstrip(b"\x00\r\n ")  # some writers pad after the marker
    if fmt == "JPEG":
        return tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" in tail
    if fmt == "GIF":
        return tail.endswith(b";")
    return True  # other formats have no end marker; full validation decodes them


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # by number of components, as Pillow opens them
# PNG (colour type, bit depth) -> the mode Pillow opens it in (PngImagePlugin._MODES)
_PNG_MODES = {(0, 1): "1", (0, 2): "L", (0, 4): "L", (0, 8): "L", (0, 16): "I;16", (2, 8): "RGB", (2, 16): "RGB",
              (3, 1): "P", (3, 2): "P", (3, 4): "P", (3, 8): "P", (4, 8): "LA", (4, 16): "RGBA", (6, 8): "RGBA",
              (6, 16): "RGBA"}
# Text chunks Pillow reads an orientation from when there is no eXIf: left to Pillow.
_PNG_TEXT_ORIENTATION = (b"Raw profile type exif\0", b"XML:com.adobe.xmp\0")


def exif_orientation(exif: bytes) -> int | None:
    """The Orientation tag (0x0112) of EXIF data (a TIFF header and IFD0, optionally after
    b"Exif\\0\\0"): 1-8, 0 when the tag is absent, None when the data cannot be parsed here."""
    tiff = exif[6:] if exif[:6] == b"Exif\0\0" else exif
    try:
        e = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(e + "I", tiff[4:8])
        (count,) = struct.unpack(e + "H", tiff[ifd:ifd + 2])
        for i in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind, n = struct.unpack(e + "HHI", tiff[i:i + 8])
            if tag == 0x0112:
                return struct.unpack(e + "H", tiff[i + 8:i + 10])[0] if (kind, n) == (3, 1) else None
        return 0
    except (KeyError, struct.error):
        return None


def _png_header(data: bytes) -> ImageInfo | None:
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    w, h, depth, color = struct.unpack(">IIBB", data[16:26])
    mode = _PNG_MODES.get((color, depth))
    if not (w and h and mode):
        return None
    alpha, orientation, icc = color in (4, 6), 1, False
    pos, n = 33, len(data)
    while pos + 8 <= n:  # every chunk, not only those before IDAT: Pillow reads an eXIf after it too
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IEND":
            break
        if kind == b"tRNS":
            alpha = True
        elif kind == b"iCCP":
            icc = True
        elif kind == b"eXIf":
            if (orientation := exif_orientation(data[pos + 8:pos + 8 + length])) is None:
                return None
        elif kind in (b"tEXt", b"zTXt", b"iTXt") and data[pos + 8:pos + 8 + 22].startswith(_PNG_TEXT_ORIENTATION):
            return None
        pos += 12 + length
    orientation = orientation or 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return ImageInfo("PNG", w, h, mode, max(8, depth), alpha, orientation, icc)


def _jpeg_header(data: bytes) -> ImageInfo | None:
    i, n = 2, len(data)
    frame, exif, orientation, icc, xmp = None, False, 0, False, False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan: Pillow has read its header by now
            break
        end = i + 2 + (data[i + 2] << 8 | data[i + 3])
        if marker in _JPEG_SOF:
            if frame is None:
                if end > n or end - i < 12:
                    return None
                frame = struct.unpack_from(">BHHB", data, i + 4)  # precision, height, width, components
        elif marker == 0xE1:
            if data.startswith(b"Exif\0\0", i + 4):
                if not exif:  # Pillow reads the first
                    exif = True
                    if (orientation := exif_orientation(data[i + 4:end])) is None:
                        return None
            elif data.startswith(b"http://ns.adobe.com/xap/1.0/\0", i + 4):
                xmp = True
        elif marker == 0xE2 and data.startswith(b"ICC_PROFILE\0", i + 4):
            icc = True
        i = end
    if frame is None or frame[0] != 8 or frame[3] not in _JPEG_MODES or not frame[1] or not frame[2]:
        return None  # 12-bit, odd components, no frame header: Pillow decides
    if orientation == 0 and xmp:
        return None  # Pillow then looks for an orientation in the XMP
    _, h, w, components = frame
    orientation = orientation or 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return ImageInfo("JPEG", w, h, _JPEG_MODES[components], 8, False, orientation, icc)


def _fast_header(data: bytes) -> ImageInfo | None:
    """What `open_image` finds for a JPEG or PNG, read straight from its markers/chunks without
    Pillow's plugin machinery (which costs more than copying the bytes into a tar). None: ask Pillow."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return _png_header(data)
        if data[:3] == b"\xff\xd8\xff":
            return _jpeg_header(data)
    except struct.error:  # a length field pointing past the end
        return None
    return None


def _check_pixels(info: ImageInfo, max_pixels: int) -> None:
    if info.width * info.height > max_pixels:
        raise BadImage("decompression_bomb", f"{info.width}x{info.height} = {info.width * info.height} "
                                             f"pixels > max_image_pixels {max_pixels}")


def _check_complete(info: ImageInfo, data: bytes) -> None:
    if not _ends_complete(info.format, data):
        raise BadImage("truncated", f"{info.format} data ends before its end marker ({len(data)} bytes)")


def _check_mode(info: ImageInfo) -> None:
    if info.mode not in _GRAY + _COLOR:
        raise BadImage("unsupported_mode", f"{info.format} in mode {info.mode} has no defined conversion to 8-bit "
                                           f"L or RGB; convert it to RGB (or 16-bit/8-bit grayscale) first")


def _stored_bits(img: Image.Image) -> int:
    """Bits per sample in the file, from the decoder's raw mode ("RGB;16B": 16) before loading."""
    for tile in img.tile[:1]:
        args = tile[3]  # (decoder, extents, offset, args): a plain tuple before Pillow 11
        rawmode = args[0] if isinstance(args, tuple) else args
        if isinstance(rawmode, str) and (m := re.search(r";(\d+)", rawmode)):
            return max(8, int(m[1]))
    return 16 if img.mode in _UINT16 else 32 if img.mode in _RANGE_CHECKED else 8


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation Pillow reads (EXIF, then XMP; a PNG's eXIf may follow its pixels)."""
    if img.format == "JPEG" and "exif" not in img.info and "xmp" not in img.info:
        return 1  # where Image.getexif looks in a JPEG; skipping it saves ~2% of a small JPEG's decode
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: treated as none, the same in every path
        return 1
    return value if isinstance(value, int) else 1


def open_image(data: bytes, *, max_pixels: int) -> tuple[Image.Image, ImageInfo]:
    """Open bytes lazily for re-encoding: header, pixel count, mode and end marker checked; raises BadImage."""
    if not data:
        raise BadImage("empty", "zero-byte file")
    with warnings.catch_warnings():
        # Pillow's own bomb guard warns at MAX_IMAGE_PIXELS and raises at twice that; we apply
        # `max_pixels` ourselves so the limit is the configured one and the reason is named.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise BadImage("decompression_bomb", str(e)) from None
        except UnidentifiedImageError:
            raise BadImage("not_an_image", f"not a recognised image ({len(data)} bytes, starts {data[:8]!r})") from None
        except Exception as e:  # noqa: BLE001 - corrupt headers raise anything from SyntaxError to struct.error
            raise BadImage("truncated" if "truncat" in str(e).lower() else "not_an_image",
                           f"{type(e).__name__}: {e}") from None
    fmt = img.format or "?"
    if fmt not in FORMAT_EXTENSIONS:
        raise BadImage("unsupported_format",
                       f"format {fmt} is not supported; supported: {', '.join(FORMAT_EXTENSIONS)}")
    w, h = img.size
    stored = ImageInfo(fmt, w, h, img.mode, _stored_bits(img), img.mode in _ALPHA or "transparency" in img.info,
                       1, bool(img.info.get("icc_profile")))
    _check_pixels(stored, max_pixels)
    _check_complete(stored, data)
    _check_mode(stored)
    if fmt == "PNG" and "exif" not in img.info:
        load_pixels(img)  # Pillow reads an eXIf chunk after the pixel data only while decoding
    orientation = _orientation(img)
    if fmt == "TIFF":
        # Pillow >= 11 reports a TIFF's size upright already (and turns it while loading): the
        # stored sides are its tags.
        w, h = img.tag_v2.get(256, w), img.tag_v2.get(257, h)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return img, ImageInfo(fmt, w, h, stored.mode, stored.bits, stored.alpha, orientation, stored.icc)


def load_pixels(img: Image.Image) -> None:
    """Decode every pixel; a truncated or corrupt stream raises BadImage('truncated')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception as e:  # noqa: BLE001 - decoders raise anything from OSError to SyntaxError
        raise BadImage("truncated" if "truncat" in str(e).lower() else "corrupt",
                       f"{type(e).__name__}: {e}") from None


def check_image(data: bytes, *, max_pixels: int, decode: bool = False) -> ImageInfo:
    """Validate bytes kept as they are: header, pixel count, mode, end marker; `decode` checks every
    pixel and that it converts. Integer and float images are always decoded: whether they
    convert depends on their range (docs/formats.md, "Image modes")."""
    info = None if decode else _fast_header(data)
    if info is None:
        img, info = open_image(data, max_pixels=max_pixels)
        if decode or info.mode in _RANGE_CHECKED:
            load_pixels(img)
            to_model_mode(img)
        return info
    _check_pixels(info, max_pixels)
    _check_complete(info, data)
    _check_mode(info)
    return info


# ---------------------------------------------------------------------------------------------
# Any mode -> the model's 8-bit L or RGB (the table in docs/formats.md, "Image modes")


def natural_mode(mode: str) -> str:
    """The 8-bit mode an image of `mode` becomes when the model's channels do not decide: "L" for
    one-channel sources (with or without alpha, any depth), "RGB" for the rest."""
    return "L" if mode in _GRAY else "RGB"


def to_model_mode(img: Image.Image, mode: str | None = None) -> Image.Image:
    """A decoded image of any mode -> upright 8-bit `mode` ("RGB" or "L"; None: `natural_mode`).

    Call it on every image decoded for the model (the loader, `--encode`); raises
    BadImage("unsupported_mode") for what has no faithful 8-bit form (docs/formats.md):
    16-bit values are scaled by 255/65535 (rounded), 32-bit integers as 16-bit values when they
    fit in 0..65535, floats from [0, 1]; transparency is composited on white; CMYK goes to sRGB
    through its ICC profile when it has one (else Pillow's formula); the EXIF orientation is
    applied. RGB -> L is Pillow's ITU-R 601-2 luma, L -> RGB repeats the channel.
    """
    target = mode or natural_mode(img.mode)
    orientation = _orientation(img)  # read before converting: the new image has no EXIF
    if img.mode != target or "transparency" in img.info:
        img = _to_8bit(img)
        if img.mode != target:
            img = img.convert(target)
    if orientation in _UPRIGHT:
        img = img.transpose(_UPRIGHT[orientation])
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """One image -> 8-bit L or RGB with the same content (no orientation)."""
    m = img.mode
    if m in _UINT16:
        return _from_16bit(img, np.asarray(img))
    if m == "I":
        a = np.asarray(img)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise BadImage("unsupported_mode", f"32-bit integer pixels range {lo}..{hi}, outside 0..65535; "
                                               f"save the image as 8- or 16-bit")
        return _from_16bit(img, a)
    if m == "F":
        a = np.asarray(img)
        if not np.isfinite(a).all():
            raise BadImage("unsupported_mode", "float pixels include NaN or infinity; save the image as 8- or "
                                               "16-bit, or as float in [0, 1]")
        lo, hi = float(a.min()), float(a.max())
        if lo < -_FLOAT_SLACK or hi > 1 + _FLOAT_SLACK:
            raise BadImage("unsupported_mode", f"float pixels range {lo:.6g}..{hi:.6g}, outside [0, 1] (the only "
                                               f"float range with a defined 8-bit scale); scale them to [0, 1] "
                                               f"or save the image as 8- or 16-bit")
        return Image.fromarray(np.rint(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8))
    if m == "CMYK":
        return _cmyk_to_rgb(img)
    if m in _ALPHA or "transparency" in img.info:
        base = natural_mode(m)
        rgba = img.convert("LA" if base == "L" else "RGBA")  # a tRNS colour becomes alpha here
        return _on_white(rgba.convert(base), rgba.getchannel("A"))
    if m not in _GRAY + _COLOR:
        raise BadImage("unsupported_mode", f"mode {m} has no defined conversion to 8-bit L or RGB; convert it "
                                           f"to RGB first")
    return img if m in ("L", "RGB") else img.convert(natural_mode(m))  # no copy before RGB -> L


def _from_16bit(img: Image.Image, a: np.ndarray) -> Image.Image:
    """0..65535 -> 0..255 by x 255/65535 rounded (= v/257: 257 k -> k, 65535 -> 255)."""
    out = Image.fromarray(((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    if (t := img.info.get("transparency")) is not None:  # a 16-bit PNG's tRNS grey value
        out = _on_white(out, Image.fromarray(np.where(a == t, 0, 255).astype(np.uint8)))
    return out


def _on_white(img: Image.Image, alpha: Image.Image) -> Image.Image:
    """8-bit L/RGB `img` composited over BACKGROUND by `alpha`: (c a + 255 (255 - a)) / 255."""
    out = Image.new(img.mode, img.size, (BACKGROUND,) * len(img.getbands()))
    out.paste(img, mask=alpha)
    return out


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            return ImageCms.applyTransform(img, _cmyk_transform(icc))
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # a profile LittleCMS cannot use: Pillow's formula, as without one
    return img.convert("RGB")


@functools.lru_cache(maxsize=8)
def _cmyk_transform(icc: bytes) -> ImageCms.ImageCmsTransform:
    """The embedded CMYK profile -> sRGB (perceptual intent); a collection mostly shares a few profiles."""
    return ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"),
                                   "CMYK", "RGB")  # default intent: perceptual


def describe_conversions(counts: dict[str, int], *, encoded: bool) -> str:
    """One line for the shard stage's summary: '312 16-bit images scaled to 8 bits, ...'."""
    when = "converted by --encode" if encoded else "kept as they are; the loader converts them when reading"
    listed = ", ".join(f"{n} {CONVERSIONS.get(k, k)}" for k, n in counts.items())
    return f"image modes ({when}, see docs/formats.md 'Image modes'): {listed}"


def resized_size(w: int, h: int, mode: str, size: int) -> tuple[int, int]:
    """Target (w, h) before any crop: `shorter`/`center_crop` scale the shorter side to size,
    `longer` scales the longer side; images are never upscaled."""
    side = min(w, h) if mode in ("shorter", "center_crop") else max(w, h)
    if side <= size:
        return w, h
    scale = size / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def reencode(img: Image.Image, *, fmt: str, quality: int, resize: str, size: int | None) -> tuple[bytes, int, int]:
    """Convert to 8-bit L/RGB (`to_model_mode`), resize (optionally) and encode to jpg/webp/png;
    returns (bytes, width, height)."""
    if resize != "none" and size:
        target = resized_size(*img.size, resize, size)
        if img.format == "JPEG" and target != img.size:
            # Let libjpeg decode at a reduced scale (>= target): much faster, same quality after resize.
            img.draft("RGB" if img.mode not in ("L",) else "L", target)
    load_pixels(img)  # after draft(): decodes at the reduced scale; reports corrupt data by reason
    # 8-bit L or RGB, upright, exactly as the loader would read the source: JPEG holds only those,
    # and for webp/png one channel layout keeps a dataset uniform.
    img = to_model_mode(img)
    if resize != "none" and size:
        target = resized_size(*img.size, resize, size)
        if target != img.size:
            img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
        if resize == "center_crop":
            w, h = img.size
            cw, ch = min(w, size), min(h, size)
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
    out = io.BytesIO()
    pil_fmt = ENCODERS[fmt]
    if pil_fmt == "PNG":
        img.save(out, "PNG", compress_level=6)
    elif pil_fmt == "WEBP":
        img.save(out, "WEBP", quality=quality, method=4)
    else:
        img.save(out, "JPEG", quality=quality)
    return out.getvalue(), img.size[0], img.size[1]
