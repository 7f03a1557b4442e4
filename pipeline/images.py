"""Check and (optionally) re-encode one image's bytes; bad inputs raise `BadImage` with a reason.

Call `check_image(data, ...)` on each input's bytes before they go into a shard untouched: it
finds out the format and size, and rejects what a training loader would choke on later. To
re-encode, `open_image` then `reencode` (resized jpg/webp/png bytes). Both are pure functions of their inputs, so the same
bytes always give the same result, in any process.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# Formats a shard may hold, by PIL format name -> file extension used for the tar member.
FORMAT_EXTENSIONS = {
    "JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff", "PPM": "ppm",
}
ENCODERS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}

# Failure reasons written to failures.jsonl (stable strings; users grep and count them).
REASONS = ("unreadable", "empty", "not_an_image", "unsupported_format", "truncated", "corrupt",
           "decompression_bomb")


class BadImage(Exception):
    """An input that cannot go into a shard; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    format: str   # PIL format name, e.g. "JPEG"
    width: int
    height: int


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


def _fast_header(data: bytes) -> ImageInfo | None:
    """Format and size of a JPEG or PNG read straight from its header, without Pillow's plugin
    machinery (which costs more than copying the bytes into a tar). None: ask Pillow."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return ImageInfo("PNG", w, h) if w and h else None
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return ImageInfo("JPEG", w, h) if w and h else None
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def _check_pixels(info: ImageInfo, max_pixels: int) -> None:
    if info.width * info.height > max_pixels:
        raise BadImage("decompression_bomb", f"{info.width}x{info.height} = {info.width * info.height} "
                                             f"pixels > max_image_pixels {max_pixels}")


def _check_complete(info: ImageInfo, data: bytes) -> None:
    if not _ends_complete(info.format, data):
        raise BadImage("truncated", f"{info.format} data ends before its end marker ({len(data)} bytes)")


def open_image(data: bytes, *, max_pixels: int) -> tuple[Image.Image, ImageInfo]:
    """Open bytes lazily for re-encoding: header, pixel count and end marker checked; raises BadImage."""
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
    info = ImageInfo(fmt, *img.size)
    _check_pixels(info, max_pixels)
    _check_complete(info, data)
    return img, info


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
    """Validate bytes kept as they are: header, pixel count, end marker; `decode` checks every pixel."""
    info = None if decode else _fast_header(data)
    if info is None:
        img, info = open_image(data, max_pixels=max_pixels)
        if decode:
            load_pixels(img)
        return info
    _check_pixels(info, max_pixels)
    _check_complete(info, data)
    return info


def resized_size(w: int, h: int, mode: str, size: int) -> tuple[int, int]:
    """Target (w, h) before any crop: `shorter`/`center_crop` scale the shorter side to size,
    `longer` scales the longer side; images are never upscaled."""
    side = min(w, h) if mode in ("shorter", "center_crop") else max(w, h)
    if side <= size:
        return w, h
    scale = size / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def reencode(img: Image.Image, *, fmt: str, quality: int, resize: str, size: int | None) -> tuple[bytes, int, int]:
    """Resize (optionally) and encode to jpg/webp/png; returns (bytes, width, height)."""
    if resize != "none" and size:
        target = resized_size(*img.size, resize, size)
        if img.format == "JPEG" and target != img.size:
            # Let libjpeg decode at a reduced scale (>= target): much faster, same quality after resize.
            img.draft("RGB" if img.mode not in ("L",) else "L", target)
    load_pixels(img)  # after draft(): decodes at the reduced scale; reports corrupt data by reason
    img = ImageOps.exif_transpose(img)
    if img.mode not in ("RGB", "L"):
        # JPEG holds only L/RGB; for webp/png too, one channel layout keeps a dataset uniform.
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")
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
