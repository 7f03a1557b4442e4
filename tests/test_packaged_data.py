"""Packaged collections: real data from installed packages, written as folder trees (no downloads)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from pipeline.packaged_data import PHOTO_NAMES, SHAPE_CLASSES, write_digits, write_faces, write_photos, write_shapes


def test_digits_are_sklearns_digits(tmp_path):
    from sklearn.datasets import load_digits

    out = write_digits(tmp_path, size=8, limit=50)
    digits = load_digits()
    files = sorted(out.rglob("*.png"))
    assert len(files) == 50
    for p in files:
        i = int(p.stem)
        assert int(p.parent.name) == digits.target[i]
        img = Image.open(p)
        assert img.mode == "L" and img.size == (8, 8)
        expected = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(img), expected)


def test_digits_full_set_upscaled(digits_dir):
    files = list(digits_dir.rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in digits_dir.iterdir()) == [str(d) for d in range(10)]
    assert Image.open(files[0]).size == (32, 32)


def test_faces_two_balanced_classes(tmp_path):
    out = write_faces(tmp_path, size=20)
    assert len(list((out / "face").glob("*.png"))) == 100
    assert len(list((out / "non_face").glob("*.png"))) == 100
    assert Image.open(next((out / "face").glob("*.png"))).size == (20, 20)


def test_photos_unlabelled_in_the_requested_format(tmp_path):
    out = write_photos(tmp_path / "jpg")
    assert sorted(p.stem for p in out.iterdir()) == sorted(PHOTO_NAMES)
    assert {Image.open(p).format for p in out.iterdir()} == {"JPEG"}
    png = write_photos(tmp_path / "png", names=("coffee",), fmt="png")
    img = Image.open(png / "coffee.png")
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (600, 400)


def test_shapes_deterministic_per_seed(tmp_path):
    a = write_shapes(tmp_path / "a", per_class=3, classes=("circle", "ring"), size=24, seed=1)
    b = write_shapes(tmp_path / "b", per_class=3, classes=("circle", "ring"), size=24, seed=1)
    c = write_shapes(tmp_path / "c", per_class=3, classes=("circle", "ring"), size=24, seed=2)

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*.png"))}

    assert digest(a) == digest(b) and len(digest(a)) == 6
    assert digest(a) != digest(c)
    assert sorted(p.name for p in a.iterdir()) == ["circle", "ring"]


def test_shapes_jpg_and_unknown_class(tmp_path):
    out = write_shapes(tmp_path, per_class=2, classes=SHAPE_CLASSES[:3], fmt="jpg")
    assert len(list(out.rglob("*.jpg"))) == 6
    with pytest.raises(ValueError, match="unknown shape classes.*hexagon"):
        write_shapes(tmp_path, classes=("hexagon",))
