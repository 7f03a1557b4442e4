"""Real image files in every mode the pipeline has to convert, each with the pixels it must become.

`mode_cases()` builds them in memory with Pillow (tifffile for a 16-bit RGB TIFF, a hand-built PNG
for 16-bit RGB, which Pillow cannot write); `write_mode_files(root)` writes them as files. The
expected 8-bit L/RGB upright arrays are computed here with numpy from the values written, never
with the code under test. Every image is 64 x 48 (W x H) as displayed, so a missed EXIF rotation
shows as swapped sides. docs/formats.md ("Image modes") is the policy these encode.
"""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 64, 48


@dataclass(frozen=True)
class ModeCase:
    name: str                     # the file's stem, so also its sample key (unique)
    ext: str
    data: bytes
    expected: np.ndarray | None   # upright uint8 [H, W] (L) or [H, W, 3] (RGB); None: refused
    conversions: tuple[str, ...] = ()
    refused: str | None = None    # the failures.jsonl reason, when refused
    lossy: bool = False           # JPEG source: compare within JPEG error, not exactly

    @property
    def mode(self) -> str:
        return "L" if self.expected is not None and self.expected.ndim == 2 else "RGB"

    @property
    def file(self) -> str:
        return f"{self.name}.{self.ext}"


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _round_div(num: np.ndarray, den: int) -> np.ndarray:
    return ((num + den // 2) // den).astype(np.uint8)


def gradient16() -> np.ndarray:
    """[H, W] uint16: 3072 distinct values spread evenly over 0..65535 (both ends included)."""
    i = np.arange(W)[None, :] * H + np.arange(H)[:, None]
    return (i * 65535 // (W * H - 1)).astype(np.uint16)


def to8(v16: np.ndarray) -> np.ndarray:
    """The documented 16 -> 8 bit scale: round(v / 257) (v * 255 / 65535 has no ties)."""
    return np.rint(v16 / 257).astype(np.uint8)


def on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(c a + 255 (255 - a)) / 255, rounded; `alpha` [H, W] broadcast over channels."""
    a = alpha.astype(np.int64)
    if color.ndim == 3:
        a = a[..., None]
    return _round_div(color.astype(np.int64) * a + 255 * (255 - a), 255)


def cmyk_formula(cmyk: np.ndarray) -> np.ndarray:
    """Pillow's CMYK -> RGB without a profile: (255 - c)(255 - k) / 255."""
    c = cmyk.astype(np.int64)
    return _round_div((255 - c[..., :3]) * (255 - c[..., 3:4]), 255)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma as Pillow computes it (RGB -> L), in 16.16 fixed point."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grayscale only): 2 = RGB, 4 = LA, 6 = RGBA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def grey_proof_cmyk_profile() -> bytes:
    """A real (tiny) ICC v2 CMYK profile for LittleCMS: an A2B0 lut16 whose 2x2x2x2 grid maps
    paper white to L* 100 and every ink corner to L* 0, all neutral (a* = b* = 0). Pillow's
    formula turns cyan ink cyan; through this profile it comes out a neutral grey, so the two
    conversions are told apart by colour alone."""
    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    text = b"vitpipe test grey-proof CMYK\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    lut = b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut += struct.pack(">HH", 2, 2) + struct.pack(">8H", *[0, 65535] * 4)
    for corner in itertools.product((0, 1), repeat=4):
        lightness = 0.0 if any(corner) else 100.0
        lut += struct.pack(">3H", round(lightness / 100 * 0xFF00), 0x8000, 0x8000)
    lut += struct.pack(">6H", *[0, 65535] * 3)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"A2B0", lut)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, payload in tags:
        body += bytes(-(offset + len(body)) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(payload))
        body += payload
    header = (struct.pack(">I", offset + len(body)) + b"lcms" + struct.pack(">I", 0x02100000) + b"spacCMYKLab "
              + bytes(12) + b"acsp" + bytes(24) + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249)
              + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body


def _upright_photo() -> np.ndarray:
    """[H, W, 3] smooth and asymmetric (gradients plus a red top-left block): any flip or turn
    shows, and JPEG keeps it within a few levels."""
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    img = np.stack([x, y, 255 - (x + y) / 2], -1)
    img[:16, :16] = (230, 20, 20)
    return np.rint(img).astype(np.uint8)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def mode_cases() -> list[ModeCase]:
    g16 = gradient16()
    g8 = to8(g16)
    x8 = np.linspace(0, 255, W).round().astype(np.uint8)[None, :].repeat(H, 0)
    y8 = np.linspace(0, 255, H).round().astype(np.uint8)[:, None].repeat(W, 1)
    rgb = np.stack([x8, y8, 255 - x8], -1)
    cases: list[ModeCase] = []
    add = cases.append

    # 8-bit controls: the plain path, exact.
    add(ModeCase("l8", "png", _save(Image.fromarray(x8, "L"), "PNG"), x8))
    add(ModeCase("rgb8", "png", _save(Image.fromarray(rgb, "RGB"), "PNG"), rgb))

    # 16 bits: grayscale scaled by 1/257 (rounded); colour as Pillow's decoder keeps it (high byte).
    add(ModeCase("gray16_png", "png", _save(Image.fromarray(g16), "PNG"), g8, ("16bit_to_8bit",)))
    add(ModeCase("gray16_tiff", "tiff", _save(Image.fromarray(g16), "TIFF"), g8, ("16bit_to_8bit",)))
    rgb16 = np.stack([g16, g16[::-1], 65535 - g16], -1)
    add(ModeCase("rgb16_png", "png", png16(rgb16, 2), (rgb16 >> 8).astype(np.uint8), ("16bit_to_8bit",)))
    import tifffile

    out = io.BytesIO()
    tifffile.imwrite(out, rgb16, photometric="rgb")
    add(ModeCase("rgb16_tiff", "tiff", out.getvalue(), (rgb16 >> 8).astype(np.uint8), ("16bit_to_8bit",)))

    # 32-bit integers: as 16-bit values when they fit in 0..65535, refused otherwise.
    add(ModeCase("int32", "tiff", _save(Image.fromarray(g16.astype(np.int32)), "TIFF"), g8, ("int32_to_8bit",)))
    wide = g16.astype(np.int32) * 2 - 5000
    add(ModeCase("int32_wide", "tiff", _save(Image.fromarray(wide), "TIFF"), None, refused="unsupported_mode"))

    # Floats: [0, 1] scaled by 255 (rounded), any other range refused.
    f = (g16 / 65535).astype(np.float32)
    add(ModeCase("float", "tiff", _save(Image.fromarray(f), "TIFF"), np.rint(f * 255).astype(np.uint8),
                 ("float_to_8bit",)))
    add(ModeCase("float_wide", "tiff", _save(Image.fromarray(f * 1000), "TIFF"), None, refused="unsupported_mode"))

    # Transparency, composited on white. Under the transparent pixels lies a dark colour, so
    # dropping the alpha instead shows.
    alpha = np.linspace(0, 255, H).round().astype(np.uint8)[:, None].repeat(W, 1)
    la = np.stack([x8 // 2, alpha], -1)
    add(ModeCase("la", "png", _save(Image.fromarray(la, "LA"), "PNG"), on_white(x8 // 2, alpha), ("alpha_on_white",)))
    rgba = np.dstack([rgb // 2, alpha])
    add(ModeCase("rgba", "png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), on_white(rgb // 2, alpha),
                 ("alpha_on_white",)))
    index = ((np.arange(W)[None, :] // 16 + np.arange(H)[:, None] // 12) % 4).astype(np.uint8)
    palette = np.array([(0, 0, 0), (200, 30, 30), (30, 200, 30), (30, 30, 200)], np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette(palette.ravel().tolist())
    want = palette[index]
    want[index == 0] = 255
    add(ModeCase("palette_transparent", "png", _save(pal, "PNG", transparency=0), want, ("alpha_on_white",)))

    # CMYK: flat patches of ink (JPEG error then stays within a level or two of what was written).
    inks = np.array([(0, 0, 0, 0), (255, 0, 0, 0), (0, 200, 0, 0), (0, 0, 180, 40), (40, 40, 40, 200),
                     (128, 64, 0, 0), (0, 0, 0, 255), (10, 220, 90, 30)], np.uint8)
    patch = inks[(np.arange(W)[None, :] // 16 + 4 * (np.arange(H)[:, None] // 24)) % len(inks)]
    cmyk = _save(Image.fromarray(patch, "CMYK"), "JPEG", quality=100)
    decoded = np.asarray(Image.open(io.BytesIO(cmyk)))  # what the file holds after JPEG
    add(ModeCase("cmyk", "jpg", cmyk, cmyk_formula(decoded), ("cmyk_to_rgb",)))
    icc = _save(Image.fromarray(patch, "CMYK"), "JPEG", quality=100, icc_profile=grey_proof_cmyk_profile())
    # Expected: neutral grey, white where there is no ink (checked by shape in the tests, as
    # the exact greys are LittleCMS's interpolation); the array marks paper-white patches 255.
    paper = np.where((patch == 0).all(-1, keepdims=True), 255, 0).repeat(3, -1).astype(np.uint8)
    add(ModeCase("cmyk_icc", "jpg", icc, paper, ("cmyk_icc_to_rgb",)))

    # EXIF orientation: stored turned so that applying the tag gives the upright photo back.
    photo = _upright_photo()
    for orientation, stored in ((6, np.rot90(photo, 1)), (8, np.rot90(photo, -1)), (3, photo[::-1, ::-1])):
        data = _save(Image.fromarray(np.ascontiguousarray(stored)), "JPEG", quality=95, exif=_exif(orientation))
        add(ModeCase(f"exif{orientation}", "jpg", data, photo, ("exif_rotated",), lossy=True))
    add(ModeCase("upright", "jpg", _save(Image.fromarray(photo), "JPEG", quality=95), photo, lossy=True))

    # A mode with no defined 8-bit conversion: refused from its header.
    add(ModeCase("lab", "tiff", _save(Image.new("LAB", (W, H), (50, 128, 128)), "TIFF"), None,
                 refused="unsupported_mode"))
    return cases


def write_mode_files(root: Path) -> dict[str, ModeCase]:
    """Each case as `root/<name>.<ext>`; returns file name -> case."""
    root.mkdir(parents=True, exist_ok=True)
    cases = {}
    for case in mode_cases():
        (root / case.file).write_bytes(case.data)
        cases[case.file] = case
    return cases


def assert_pixels(got: np.ndarray, case: ModeCase, *, lossy: bool = False, what: str = "") -> None:
    """`got` matches the case's expected upright pixels: exactly (within 1 level where Pillow
    rounds a blend), or within JPEG error when the source or the stored copy is a JPEG."""
    want = case.expected
    assert got.shape == want.shape, f"{case.file}{what}: shape {got.shape}, expected {want.shape} (upright)"
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    if case.name == "cmyk_icc":
        spread = got.max(-1).astype(np.int64) - got.min(-1)
        assert spread.max() <= 3, f"{case.file}{what}: not neutral (ICC profile not applied?)"
        white = want[..., 0] == 255  # (JPEG rings at patch edges: medians, not extremes)
        assert np.median(got[white]) >= 250 and np.median(got[~white]) < 100, f"{case.file}{what}: paper/ink wrong"
    elif case.lossy or lossy:
        # JPEG at q95 on hard-edged colour patches: ~5 levels; a wrong turn or a dropped alpha: 50+
        assert diff.mean() < 8, f"{case.file}{what}: mean difference {diff.mean():.2f} levels"
    else:
        assert diff.max() <= 1, f"{case.file}{what}: off by up to {diff.max()} levels"
