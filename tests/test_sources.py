"""Listing collections: folder trees (labelled, unlabelled, splits) and manifests (CSV, JSONL, Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.sources import list_source, sort_labels
from vitpipe.errors import UserError


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A small real collection: digits in class folders, nested deeper for one class."""
    from pipeline.packaged_data import write_digits

    root = write_digits(tmp_path_factory.mktemp("tree") / "src", size=8, limit=30)
    nested = root / "3" / "a" / "b"
    nested.mkdir(parents=True)
    next((root / "3").glob("*.png")).rename(nested / "x.y.png")  # dots in a name never reach the key
    return root


def test_folder_tree_keys_labels_and_order(tree):
    src = list_source(str(tree))
    assert src.kind == "folder" and src.rejected == []
    files = sorted(p for p in tree.rglob("*.png"))
    assert len(src.items) == len(files) == 30
    assert [it.key for it in src.items] == sorted(it.key for it in src.items)
    assert len({it.key for it in src.items}) == 30
    assert all("." not in it.key for it in src.items)
    nested = next(it for it in src.items if it.uri.endswith("x.y.png"))
    assert nested.key == "3/a/b/x_y" and nested.label == "3"
    assert all(it.label == Path(it.uri).relative_to(tree).parts[0] for it in src.items)
    assert all(it.size == Path(it.uri).stat().st_size > 0 for it in src.items)
    assert src.classes == sorted({it.label for it in src.items}, key=int)
    assert src.describe() == {"kind": "folder", "uri": str(tree), "num_files": 30}


def test_unlabelled_tree_and_colliding_keys(tmp_path):
    from pipeline.packaged_data import write_photos

    write_photos(tmp_path, names=("coffee", "camera"))
    (tmp_path / "coffee.png").write_bytes((tmp_path / "coffee.jpg").read_bytes())
    src = list_source(str(tmp_path))
    assert src.classes == [] and all(it.label is None for it in src.items)
    keys = [it.key for it in src.items]
    assert len(keys) == len(set(keys)) == 3
    assert "camera" in keys and sum(k.startswith("coffee_") for k in keys) == 2


def test_split_folders_from_source(tmp_path):
    from pipeline.packaged_data import write_digits

    write_digits(tmp_path / "train", size=8, limit=20)
    write_digits(tmp_path / "val", size=8, limit=5)
    src = list_source(str(tmp_path), split_from_source=True)
    assert sorted({it.split for it in src.items}) == ["train", "val"]
    assert sum(it.split == "val" for it in src.items) == 5
    assert src.classes == [str(d) for d in range(10)]
    assert all(it.key.startswith(f"{it.split}/{it.label}/") for it in src.items)


def test_images_outside_class_folders_are_rejected(tree, tmp_path):
    import shutil

    root = tmp_path / "src"
    shutil.copytree(tree, root)
    (root / "stray.png").write_bytes(next(root.rglob("*.png")).read_bytes())
    (root / "3" / "LICENSE").write_text("CC0")
    src = list_source(str(root))
    reasons = {Path(r["source"]).name: r["reason"] for r in src.rejected}
    assert reasons == {"stray.png": "no_class_folder", "LICENSE": "unsupported_format"}
    assert len(src.items) == 30


def _rows(tree: Path) -> list[dict]:
    files = sorted(tree.rglob("*.png"))
    return [{"path": str(p.relative_to(tree)), "label": f"digit{p.relative_to(tree).parts[0]}",
             "split": "val" if i % 5 == 0 else "train", "photographer": f"p{i % 3}", "weight": i / 2}
            for i, p in enumerate(files)]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifests_relative_paths_labels_extra_columns(tree, fmt):
    rows = _rows(tree)
    df = pd.DataFrame(rows)
    manifest = tree / f"manifest.{fmt}"
    if fmt == "csv":
        df.to_csv(manifest, index=False)
    elif fmt == "jsonl":
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        df.to_parquet(manifest)
    try:
        src = list_source(str(manifest), split_from_source=True)
    finally:
        manifest.unlink()
    assert src.kind == "manifest" and len(src.items) == len(rows)
    by_uri = {it.uri: it for it in src.items}
    for r in rows:
        it = by_uri[f"{tree}/{r['path']}"]
        assert it.label == r["label"] and it.split == r["split"]
        assert it.extra["photographer"] == r["photographer"]
        assert float(it.extra["weight"]) == r["weight"]  # CSV keeps text, JSONL/Parquet keep numbers
        assert it.size == Path(it.uri).stat().st_size
    assert src.classes == sorted({r["label"] for r in rows})


def test_manifest_key_column_and_missing_values(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    pd.DataFrame({"image": ["a.png", "", "a.png"], "category": ["cat", "dog", ""],
                  "key": ["first", "second", "third"]}).to_csv(tmp_path / "m.csv", index=False)
    src = list_source(str(tmp_path / "m.csv"))
    assert [it.key for it in src.items] == ["first"]
    assert sorted(r["reason"] for r in src.rejected) == ["no_label", "no_path"]
    assert src.classes == ["cat"]


def test_manifest_errors_name_the_column_and_fix(tmp_path):
    pd.DataFrame({"where": ["a.png"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(UserError, match=r"no path column.*\['where'\].*--path-column"):
        list_source(str(tmp_path / "m.csv"))
    with pytest.raises(UserError, match="no label column 'species'"):
        list_source(str(tmp_path / "m.csv"), path_column="where", label_column="species")
    with pytest.raises(UserError, match="needs a 'split' column"):
        list_source(str(tmp_path / "m.csv"), path_column="where", split_from_source=True)
    (tmp_path / "e.csv").write_text("path,label\n")
    with pytest.raises(UserError, match="no rows"):
        list_source(str(tmp_path / "e.csv"))
    with pytest.raises(UserError, match="does not exist"):
        list_source(str(tmp_path / "missing.parquet"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="is a file but not a manifest"):
        list_source(str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match="must point to a manifest"):
        list_source("s3://bucket/images/")


def test_sort_labels_numeric_when_all_integers():
    assert sort_labels(["10", "2", "1"]) == ["1", "2", "10"]
    assert sort_labels(["b", "a", "10"]) == ["10", "a", "b"]


def test_unlistable_folder_is_reported_and_link_loops_end(tree, tmp_path, monkeypatch):
    """A sub-folder that cannot be listed is a failure record, not files silently gone; a symlink
    back up the tree is followed once, not forever."""
    import os
    import shutil

    root = tmp_path / "src"
    shutil.copytree(tree, root)
    (root / "3" / "again").symlink_to(root / "3", target_is_directory=True)
    locked = root / "5"
    in_5 = len(list(locked.glob("*.png")))
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads any folder: make scandir fail the way it does for a user without permission
        real = os.scandir

        def scandir(path):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        src = list_source(str(root))
    finally:
        locked.chmod(0o755)
    assert [(r["source"], r["reason"]) for r in src.rejected] == [(str(locked), "unreadable")]
    assert "Permission denied" in src.rejected[0]["detail"]
    assert in_5 > 0 and len(src.items) == 30 - in_5 and not any(it.label == "5" for it in src.items)
    assert len({it.uri for it in src.items}) == len(src.items)


def test_a_folder_reached_by_two_paths_is_listed_under_both(tree, tmp_path):
    """A class folder that is a symlink to another one is not a loop: its images are listed under
    both classes, whichever the filesystem lists first."""
    import shutil

    root = tmp_path / "src"
    shutil.copytree(tree, root)
    (root / "7bis").symlink_to(root / "7", target_is_directory=True)
    src = list_source(str(root))
    sevens = sorted(it.key.split("/", 1)[1] for it in src.items if it.label == "7")
    assert sevens and sorted(it.key.split("/", 1)[1] for it in src.items if it.label == "7bis") == sevens
    assert len(src.items) == 30 + len(sevens) and src.rejected == []


def test_split_by_source_on_a_class_tree_is_refused(tree, tmp_path, caplog):
    # SRC/<class>/<image> read as SRC/<split>/...: every class would become a split without classes.
    with pytest.raises(UserError, match=r"--split-by source expects SRC/<split>/<class>/.*holds images directly in "
                                        r"its folders \(0, 1, 2, .*\).*Drop --split-by source.*SRC/train/<class>/"):
        list_source(str(tree), split_from_source=True)
    # the other way round: split folders read as classes is allowed (a class may be called 'test'), with a hint
    from pipeline.packaged_data import write_digits

    for split in ("train", "test"):
        write_digits(tmp_path / split, size=8, limit=10)
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        src = list_source(str(tmp_path))
    assert src.classes == ["test", "train"]
    assert "class folders ['test', 'train'] look like splits" in caplog.text and "--split-by source" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        assert list_source(str(tmp_path), split_from_source=True).classes == [str(d) for d in range(10)]
        list_source(str(tree))
    assert caplog.text == ""
