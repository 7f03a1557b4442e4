"""Check and (optionally) re-encode one image's bytes; bad inputs raise `BadImage` with a reason.

Call `inspect_image(data, ...)` on each input's bytes before it goes into a shard: it finds out
the format and size, and rejects what a training loader would choke on later. `reencode` turns an
opened image into resized jpg/webp/png bytes. Both are pure functions of their inputs, so the same
bytes always give the same result, in any process.
"""

from __future__ import annotations

import io
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
    tail = data.rstrip(b"\x00\r\n ")[-16:]
    if fmt == "JPEG":
        return tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" in data[-64:]
    if fmt == "GIF":
        return tail.endswith(b";")
    return True  # other formats have no end marker; full validation decodes them


def open_image(data: bytes, *, max_pixels: int) -> tuple[Image.Image, ImageInfo]:
    """Open bytes lazily (header only) and check format and pixel count; raises BadImage."""
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
    if w * h > max_pixels:
        raise BadImage("decompression_bomb",
                       f"{w}x{h} = {w * h} pixels > max_image_pixels {max_pixels}")
    return img, ImageInfo(fmt, w, h)


def load_pixels(img: Image.Image) -> None:
    """Decode every pixel; a truncated or corrupt stream raises BadImage('truncated')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception as e:  # noqa: BLE001 - decoders raise anything from OSError to SyntaxError
        raise BadImage("truncated" if "truncat" in str(e).lower() else "corrupt",
                       f"{type(e).__name__}: {e}") from None


def inspect_image(data: bytes, *, max_pixels: int, full: bool) -> tuple[Image.Image, ImageInfo]:
    """Validate bytes: header, pixel count, end marker; with `full`, decode every pixel too."""
    img, info = open_image(data, max_pixels=max_pixels)
    if not _ends_complete(info.format, data):
        raise BadImage("truncated", f"{info.format} data ends before its end marker ({len(data)} bytes)")
    if full:
        load_pixels(img)
    return img, info


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
