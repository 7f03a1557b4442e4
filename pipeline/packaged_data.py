"""Real image collections built from data that ships inside installed packages (no downloads).

Call these to get a folder tree (one sub-folder per class) that the shard stage can read, for the
demo, tests and benchmarks:

- `write_digits`: scikit-learn's 1797 real 8x8 handwritten digits, 10 classes, upscaled PNGs.
- `write_faces`: scikit-image's `lfw_subset`, 100 faces and 100 non-faces (25x25 crops).
- `write_photos`: scikit-image's bundled photos (astronaut, coffee, ...), unlabelled or by name.
- `write_shapes`: generated strokes and shapes in N classes, as many as a scale test needs.
- `write_unlabelled`: any of these with the labels dropped (one folder of loose images), the
  kind of collection self-supervised pretraining (`--train.objective mae`) learns from.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def write_digits(out: str | Path, *, size: int = 32, limit: int | None = None) -> Path:
    """Write sklearn's digits as `out/<digit>/<index>.png` (grayscale, `size` x `size`)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out)
    images, targets = digits.images, digits.target
    n = len(images) if limit is None else min(limit, len(images))
    for i in range(n):
        pixels = (images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L")
        if size != 8:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        folder = out / str(int(targets[i]))
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:04d}.png", optimize=False)
    return out


def write_faces(out: str | Path, *, size: int = 32) -> Path:
    """Write skimage's `lfw_subset` as `out/face/*.png` and `out/non_face/*.png`."""
    from skimage.data import lfw_subset

    images = lfw_subset()  # (200, 25, 25) float in [0, 1]: first 100 faces, then 100 non-faces
    out = Path(out)
    for i, arr in enumerate(images):
        label = "face" if i < 100 else "non_face"
        img = Image.fromarray((arr * 255).clip(0, 255).astype(np.uint8), mode="L")
        img = img.resize((size, size), Image.Resampling.BICUBIC)
        (out / label).mkdir(parents=True, exist_ok=True)
        img.save(out / label / f"{i:03d}.png")
    return out


PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "camera", "rocket", "immunohistochemistry", "hubble_deep_field")


def write_photos(out: str | Path, *, names: tuple[str, ...] = PHOTO_NAMES, fmt: str = "jpg") -> Path:
    """Write skimage's bundled photos as `out/<name>.<fmt>` (an unlabelled collection)."""
    import skimage.data

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        arr = getattr(skimage.data, name)()
        img = Image.fromarray(arr)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img.save(out / f"{name}.{fmt}", quality=90) if fmt == "jpg" else img.save(out / f"{name}.{fmt}")
    return out


SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "hline", "vline", "diag", "ring", "dot_pair", "arc")


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, size: int, rng: np.random.Generator) -> None:
    c = size / 2 + rng.uniform(-size / 8, size / 8, size=2)
    r = rng.uniform(size / 5, size / 2.6)
    w = max(1, int(rng.integers(max(1, size // 16), max(2, size // 8) + 1)))
    ink = int(rng.integers(170, 256))
    x0, y0, x1, y1 = c[0] - r, c[1] - r, c[0] + r, c[1] + r
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=ink)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=ink)
    elif kind == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        pts = [(c[0] + r * math.cos(a + k * 2 * math.pi / 3), c[1] + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)]
        draw.polygon(pts, fill=ink)
    elif kind == "cross":
        draw.line((x0, c[1], x1, c[1]), fill=ink, width=w)
        draw.line((c[0], y0, c[0], y1), fill=ink, width=w)
    elif kind == "hline":
        draw.line((x0, c[1], x1, c[1]), fill=ink, width=w)
    elif kind == "vline":
        draw.line((c[0], y0, c[0], y1), fill=ink, width=w)
    elif kind == "diag":
        draw.line((x0, y0, x1, y1), fill=ink, width=w)
    elif kind == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=ink, width=w)
    elif kind == "dot_pair":
        d = r / 3
        for sx in (-1, 1):
            cx = c[0] + sx * r / 2
            draw.ellipse((cx - d, c[1] - d, cx + d, c[1] + d), fill=ink)
    elif kind == "arc":
        start = float(rng.uniform(0, 360))
        draw.arc((x0, y0, x1, y1), start, start + 180, fill=ink, width=w)
    else:  # pragma: no cover - guarded by SHAPE_CLASSES
        raise ValueError(kind)


def write_shapes(out: str | Path, *, per_class: int = 100, classes: tuple[str, ...] = SHAPE_CLASSES,
                 size: int = 32, seed: int = 0, fmt: str = "png", color: bool = False, jitter: float = 0.0,
                 quality: int = 92) -> Path:
    """Generate `per_class` images of each shape class as `out/<class>/<i>.<fmt>` (deterministic).

    Strokes and blobs on a noisy dark background: a stand-in for a large unrelated collection,
    used to pretrain a backbone that digits are then fine-tuned from, and for scale tests.
    `color`: RGB photos instead, a coloured shape on a noisy colour gradient, each side drawn
    within +-`jitter` of `size` (e.g. size 500, jitter 0.25: JPEGs of photo size and weight,
    for loader benchmarks).
    """
    unknown = [c for c in classes if c not in SHAPE_CLASSES]
    if unknown:
        raise ValueError(f"unknown shape classes {unknown}; choose from {SHAPE_CLASSES}")
    out = Path(out)
    for ci, kind in enumerate(classes):
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, ci])
        for i in range(per_class):
            img = _color_shape(kind, size, jitter, rng) if color else _gray_shape(kind, size, rng)
            if fmt == "jpg":
                img.save(folder / f"{i:05d}.jpg", quality=quality)
            else:
                img.save(folder / f"{i:05d}.{fmt}")
    return out


def _gray_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    img = Image.fromarray(rng.integers(0, 40, size=(size, size), dtype=np.uint8), mode="L")
    _draw_shape(ImageDraw.Draw(img), kind, size, rng)
    return img


def _color_shape(kind: str, size: int, jitter: float, rng: np.random.Generator) -> Image.Image:
    w, h = (max(8, int(size * rng.uniform(1 - jitter, 1 + jitter))) for _ in range(2))
    # a smooth gradient between two random colours plus mild noise: JPEG-compresses like a photo
    a, b = rng.uniform(0, 255, size=(2, 3))
    t = (np.linspace(0, 1, w)[None, :, None] + np.linspace(0, 1, h)[:, None, None]) / 2
    bg = a + (b - a) * t + rng.normal(0, 10, size=(h, w, 1))
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8), mode="RGB")
    side = min(w, h)
    mask = Image.new("L", (side, side), 0)
    _draw_shape(ImageDraw.Draw(mask), kind, side, rng)
    img.paste(tuple(int(v) for v in rng.integers(0, 256, size=3)), ((w - side) // 2, (h - side) // 2), mask)
    return img


def write_unlabelled(out: str | Path, *trees: str | Path) -> Path:
    """Copy the images of class-folder trees into one folder, `out/<tree>_<class>_<name>`, without
    classes: the same pixels unlabelled (`vitpipe shard` writes `classes: []` for it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for tree in map(Path, trees):
        for f in sorted(p for p in tree.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg")):
            parts = f.relative_to(tree).parts
            shutil.copyfile(f, out / "_".join((tree.name, *parts)))
    return out
