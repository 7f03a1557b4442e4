"""The shard stage on real images, read back by real readers (webdataset, GNU tar)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from image_modes import assert_pixels
from pipeline.index import load_index, shard_urls
from pipeline.plan import _order_key, split_of
from pipeline.shard import ShardConfig, shard
from pipeline.verify import verify
from vitpipe.config import ConfigError
from vitpipe.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _read_samples(index: dict, split: str) -> list[dict]:
    ds = wds.WebDataset(shard_urls(index, split), shardshuffle=False, empty_check=False)
    return list(ds)


def _image_ext(sample: dict) -> str:
    exts = [k for k in sample if not k.startswith("__") and k not in ("cls", "json")]
    assert len(exts) == 1, f"expected one image member, got {sorted(sample)}"
    return exts[0]


# ---------------------------------------------------------------------------------------------
# Folder trees, pass-through


def test_digits_pass_through_read_back_by_webdataset(digits_shards, digits_dir):
    index = load_index(str(digits_shards))
    assert index["classes"] == [str(d) for d in range(10)]
    assert set(index["splits"]) == {"train", "val"}
    assert len(index["splits"]["train"]["shards"]) >= 3
    assert index["totals"]["num_samples"] == 1797
    sources = sorted(p.relative_to(digits_dir).as_posix() for p in digits_dir.rglob("*.png"))

    seen = []
    for split in ("train", "val"):
        samples = _read_samples(index, split)
        assert len(samples) == index["splits"][split]["num_samples"]
        for shard_entry in index["splits"][split]["shards"]:
            with tarfile.open(digits_shards / shard_entry["name"]) as tar:
                assert len({m.name.split(".")[0] for m in tar.getmembers()}) == shard_entry["num_samples"]
        for s in samples:
            meta = json.loads(s["json"])
            src = Path(meta["source"])
            # Pass-through: the stored bytes are the source file's bytes, untouched.
            assert s[_image_ext(s)] == src.read_bytes()
            assert meta["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
            assert (meta["width"], meta["height"], meta["format"]) == (32, 32, "PNG")
            assert int(s["cls"]) == index["classes"].index(meta["label"]) == int(src.parent.name)
            assert split_of(s["__key__"], 0.1) == split
            seen.append(src.relative_to(digits_dir).as_posix())
    assert sorted(seen) == sources  # every image exactly once
    val_share = index["splits"]["val"]["num_samples"] / 1797
    assert 0.06 < val_share < 0.14
    assert verify(str(digits_shards)) == []


def test_shards_listed_by_gnu_tar_with_fixed_headers(digits_shards):
    index = load_index(str(digits_shards))
    name = index["splits"]["val"]["shards"][0]["name"]
    listing = subprocess.run(["tar", "--numeric-owner", "-tvf", str(digits_shards / name)],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(listing) == 3 * index["splits"]["val"]["shards"][0]["num_samples"]
    for line in listing:
        mode, owner, _size, date, _time, member = line.split()
        assert (mode, owner, date) == ("-rw-r--r--", "0/0", "1970-01-01"), line
    keys = [line.split()[-1].split(".")[0] for line in listing[::3]]
    assert keys == sorted(keys, key=_order_key)  # shuffled by a hash of the key: deterministic
    assert keys != sorted(keys)
    assert [line.split()[-1].split(".")[1] for line in listing[:3]] == ["png", "cls", "json"]


def test_output_files_and_stats(digits_shards):
    stats = json.loads((digits_shards / "stats.json").read_text())
    index = load_index(str(digits_shards))
    assert stats["num_samples"] == index["totals"]["num_samples"] == 1797
    assert stats["num_failures"] == 0 and stats["failures_by_reason"] == {}
    assert (digits_shards / "failures.jsonl").read_text() == ""
    assert "max_samples_per_shard: 500" in (digits_shards / "config.yaml").read_text()
    assert index["config"]["max_samples_per_shard"] == 500
    assert not list(digits_shards.glob("*.tmp-*"))


# ---------------------------------------------------------------------------------------------
# Bad input: skipped, listed with the reason, never crashes the run


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression-bomb shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Real digits and skimage photos in class folders, plus planted bad files -> expected reason."""
    from pipeline.packaged_data import write_digits, write_photos

    root = tmp_path_factory.mktemp("messy") / "src"
    write_digits(root / "digit", size=16, limit=60)
    for d in (root / "digit").iterdir():  # write_digits makes digit/<cls>/; flatten to one class
        for p in d.iterdir():
            p.rename(root / "digit" / f"{d.name}_{p.name}")
        d.rmdir()
    write_photos(root / "photo" / "nested" / "deeper")  # any depth below the class folder
    photo = (root / "photo" / "nested" / "deeper" / "astronaut.jpg").read_bytes()
    bad = root / "photo" / "bad"
    bad.mkdir()
    (bad / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image, just text named .jpg\n")
    (bad / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    Image.new("RGB", (16, 16), "red").save(bad / "icon.png", format="ICO")  # real image, unsupported format
    (bad / "notes.txt").write_text("labels come from folder names\n")
    os.symlink(bad / "does-not-exist.jpg", bad / "dangling.jpg")
    os.mkfifo(bad / "pipe.jpg")  # reading it would block forever
    corrupt = bytearray((root / "digit" / "0_0000.png").read_bytes())
    idat = corrupt.index(b"IDAT")
    corrupt[idat + 8: idat + 40] = b"\x55" * 32  # garbage pixels data, end marker intact
    (bad / "corrupt.png").write_bytes(bytes(corrupt))
    expected = {"truncated.jpg": "truncated", "empty.png": "empty", "text.jpg": "not_an_image",
                "bomb.png": "decompression_bomb", "icon.png": "unsupported_format",
                "notes.txt": "unsupported_format", "dangling.jpg": "unreadable", "corrupt.png": "corrupt",
                "pipe.jpg": "unreadable"}
    return root, expected


def test_bad_files_skipped_and_listed_with_reason(messy_dir, tmp_path):
    src, expected = messy_dir
    out = tmp_path / "out"
    stats = shard(ShardConfig(src=str(src), out=str(out), val_ratio=0.2, max_samples_per_shard=16,
                              decode_check=True))
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    got = {Path(f["source"]).name: f["reason"] for f in failures}
    assert got == expected, failures
    assert all(f["detail"] for f in failures)
    assert stats["failures_by_reason"] == dict(sorted({r: list(expected.values()).count(r)
                                                      for r in set(expected.values())}.items()))

    good = sorted(p for p in src.rglob("*") if p.is_file() and p.parent.name != "bad")
    index = load_index(str(out))
    assert index["classes"] == ["digit", "photo"]
    assert index["totals"] == {"num_samples": len(good), "num_bytes": index["totals"]["num_bytes"],
                               "num_shards": index["totals"]["num_shards"], "num_failures": len(expected)}
    stored = {}
    for split in index["splits"]:
        for s in _read_samples(index, split):
            stored[json.loads(s["json"])["source"]] = s[_image_ext(s)]
    assert sorted(stored) == [str(p) for p in good]  # every valid image exactly once
    assert all(stored[str(p)] == p.read_bytes() for p in good)
    assert verify(str(out)) == []


def test_files_bigger_than_a_shard_are_rejected(messy_dir, tmp_path):
    src, _ = messy_dir
    photos = src / "photo" / "nested" / "deeper"
    cap = 60_000
    big = sorted(p.name for p in photos.iterdir() if p.stat().st_size > cap - 14_000)  # headers, json, record
    assert big and len(big) < 7
    out = tmp_path / "out"
    shard(ShardConfig(src=str(photos), out=str(out), max_shard_size=cap, val_ratio=0.0))
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(Path(f["source"]).name for f in failures if f["reason"] == "too_large") == big
    index = load_index(str(out))
    assert index["totals"]["num_samples"] == 7 - len(big)
    assert all(s["num_bytes"] <= cap for s in index["splits"]["train"]["shards"])
    with pytest.raises(UserError, match="no image in .* fits in a shard of --max-shard-size 1000 bytes"):
        shard(ShardConfig(src=str(photos), out=str(tmp_path / "out2"), max_shard_size=1000))


def _few_digits(digits_dir: Path, root: Path, n: int = 5) -> Path:
    """A small class tree: the first `n` digits of class 0, copied."""
    (root / "0").mkdir(parents=True)
    for p in sorted((digits_dir / "0").glob("*.png"))[:n]:
        (root / "0" / p.name).write_bytes(p.read_bytes())
    return root


def test_a_cap_below_the_tar_overhead_names_the_size_that_fits(digits_dir, tmp_path):
    # ~700-byte images, but a shard also holds tar headers, the .cls and .json members and the
    # 10 KiB end record: the message gives that size, not "every image is bigger".
    src = _few_digits(digits_dir, tmp_path / "src")
    with pytest.raises(UserError, match="at least") as e:
        shard(ShardConfig(src=str(src), out=str(tmp_path / "o"), max_shard_size="12KB"))
    assert "bigger" not in str(e.value) and "tar headers" in str(e.value)
    need = int(re.search(r"at least (\d+) bytes", str(e.value)).group(1))
    assert 12_000 < need < 16_000
    with pytest.raises(UserError, match=f"at least {need} bytes"):
        shard(ShardConfig(src=str(src), out=str(tmp_path / "o"), max_shard_size=need - 1))
    stats = shard(ShardConfig(src=str(src), out=str(tmp_path / "o"), max_shard_size=need, val_ratio=0.0))
    assert stats["num_samples"] >= 1 and verify(str(tmp_path / "o")) == []


def test_a_run_where_no_image_can_be_read_fails_after_writing_its_record(digits_dir, tmp_path, capsys):
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    png = next((digits_dir / "0").glob("*.png")).read_bytes()
    (src / "empty.png").write_bytes(b"")
    (src / "half.png").write_bytes(png[: len(png) // 2])
    (src / "text.jpg").write_text("this is not an image, just text named .jpg\n")
    (src / "text2.jpg").write_text("nor is this\n")
    out = tmp_path / "out"
    rc, err = _cli(["shard", str(tmp_path / "src"), str(out)], capsys)
    line = err.splitlines()[-1]
    assert rc == 2 and line.startswith("vitpipe shard: error: no image could be read"), err
    assert "all 4 inputs failed" in line and "not_an_image (2 of 4" in line and str(out / "failures.jsonl") in line
    # the record stays: the reasons, the stats and an index with no samples
    assert len((out / "failures.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "stats.json").read_text())["failures_by_reason"] == \
        {"empty": 1, "not_an_image": 2, "truncated": 1}
    assert load_index(str(out))["totals"]["num_samples"] == 0
    few = _few_digits(digits_dir, tmp_path / "few")
    rc, err = _cli(["shard", str(few), str(tmp_path / "out2"), "--max-image-pixels", "10"], capsys)
    assert rc == 2 and "decompression_bomb (5 of 5" in err and "max_image_pixels 10" in err


def test_own_pixel_limit_names_the_bomb(messy_dir, tmp_path):
    src, _ = messy_dir
    out = tmp_path / "out"
    shard(ShardConfig(src=str(src / "photo"), out=str(out), max_image_pixels=300 * 300))
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    big = {Path(f["source"]).name for f in failures if f["reason"] == "decompression_bomb"}
    assert "astronaut.jpg" in big and "bomb.png" in big  # 512x512 photos exceed 300x300
    assert any("max_image_pixels 90000" in f["detail"] for f in failures)


# ---------------------------------------------------------------------------------------------
# Re-encoding and resizing


@pytest.mark.parametrize("mode,fmt", [("center_crop", "jpg"), ("shorter", "webp"), ("longer", "png")])
def test_reencode_and_resize(messy_dir, tmp_path, mode, fmt):
    src, _ = messy_dir
    out = tmp_path / "out"
    shard(ShardConfig(src=str(src / "photo" / "nested" / "deeper"), out=str(out), encode=fmt, resize=mode, size=64,
                      quality=80, val_ratio=0.0))
    index = load_index(str(out))
    samples = _read_samples(index, "train")
    assert len(samples) == 7 and index["classes"] == []  # loose photos: an unlabelled collection
    for s in samples:
        assert "cls" not in s
        meta = json.loads(s["json"])
        orig = Image.open(meta["source"])
        assert (meta["width"], meta["height"]) == orig.size and meta["label"] is None
        img = Image.open(io.BytesIO(s[fmt]))
        assert img.format == {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]
        w, h = orig.size
        if mode == "center_crop":
            assert img.size == (min(64, w, h), min(64, w, h))
        elif mode == "shorter":
            assert min(img.size) == min(64, w, h) and abs(img.size[0] / img.size[1] - w / h) < 0.05
        else:
            assert max(img.size) == min(64, max(w, h)) and abs(img.size[0] / img.size[1] - w / h) < 0.05


@pytest.mark.parametrize("encode", ["none", "png", "jpg"])
def test_every_image_mode_is_kept_converted_or_refused_and_said(mode_dir, tmp_path, capsys, encode):
    """16-bit, 32-bit, float, alpha, palette, CMYK and EXIF-rotated files, sharded as they are and
    re-encoded, read back by webdataset: sizes upright in the .json, each sample's conversions
    recorded and counted in stats.json and the summary, the unconvertible refused with a reason,
    and a re-encoded copy holding exactly the pixels docs/formats.md promises."""
    from vitpipe.cli import main

    src, cases = mode_dir
    out = tmp_path / "out"
    assert main(["shard", str(src), str(out), "--val-ratio", "0", "--encode", encode, "--quality", "95"]) == 0
    printed = capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    refused = {name: c.refused for name, c in cases.items() if c.refused}
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert {Path(f["source"]).name: f["reason"] for f in failures} == refused
    assert all("range" in f["detail"] or "mode LAB" in f["detail"] for f in failures)

    samples = {Path(json.loads(s["json"])["source"]).name: s for s in _read_samples(load_index(str(out)), "train")}
    assert set(samples) == set(cases) - set(refused)
    for name, s in samples.items():
        case, meta = cases[name], json.loads(s["json"])
        assert (meta["width"], meta["height"]) == (64, 48), name  # as displayed (EXIF 6/8 swap the stored sides)
        assert meta.get("conversions", []) == list(case.conversions), name
        ext = _image_ext(s)
        if encode == "none":
            assert s[ext] == case.data  # untouched: the loader converts when reading
        else:
            img = Image.open(io.BytesIO(s[ext]))  # plain Pillow: the stored copy is converted already
            assert ext == encode and img.mode == case.mode, name
            assert_pixels(np.asarray(img), case, lossy=encode == "jpg")

    want = dict(sorted(Counter(k for n, c in cases.items() if n not in refused for k in c.conversions).items()))
    assert stats["conversions"] == want
    assert want["16bit_to_8bit"] == 4 and want["exif_rotated"] == 3
    assert "4 16-bit images scaled to 8 bits" in printed and "3 images turned upright by their EXIF" in printed
    assert ("converted by --encode" if encode != "none" else "the loader converts them") in printed
    assert verify(str(out)) == []


def test_resize_without_encode_is_a_config_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="--encode jpg"):
        ShardConfig(src="x", out=str(tmp_path), resize="shorter")
    rc, err = _cli(["shard", "x", str(tmp_path / "o"), "--resize", "shorter", "--size", "16"], capsys)
    assert rc == 2 and "\n  resize: needs re-encoding, which --encode none does not do: add --encode jpg" in err
    assert "Value error" not in err and "\n  :" not in err


# ---------------------------------------------------------------------------------------------
# Determinism, resume, overwrite, errors before any work


def test_byte_identical_reruns_and_resume_of_missing_shards(digits_dir, tmp_path):
    cfg = dict(src=str(digits_dir), val_ratio=0.1, max_samples_per_shard=300)
    a, b = tmp_path / "a", tmp_path / "b"
    shard(ShardConfig(out=str(a), **cfg))
    shard(ShardConfig(out=str(b), **cfg))
    first = _shard_bytes(a)
    assert first == _shard_bytes(b) and len(first) >= 6

    (a / "train-000001.tar").unlink()
    (a / "val-000000.tar").write_bytes(b"garbage")  # a damaged shard is rewritten too
    stats = shard(ShardConfig(out=str(a), **cfg))
    assert stats["num_shards_written"] == 2 and stats["num_shards_resumed"] == len(first) - 2
    assert _shard_bytes(a) == first
    assert json.loads((a / "index.json").read_text())["splits"] == \
        json.loads((b / "index.json").read_text())["splits"]


@pytest.mark.multiprocess
def test_one_and_two_workers_give_identical_shards(digits_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        shard(ShardConfig(src=str(digits_dir), out=str(out), max_samples_per_shard=200, workers=workers))
        outs.append(out)
    assert _shard_bytes(outs[0]) == _shard_bytes(outs[1])
    i1, i2 = (json.loads((o / "index.json").read_text()) for o in outs)
    assert i1["splits"] == i2["splits"] and i1["config"]["workers"] == 1 and i2["config"]["workers"] == 2


@pytest.mark.multiprocess
def test_reencoding_on_two_workers_matches_one_with_the_same_failures(messy_dir, tmp_path, monkeypatch):
    """Re-encoding spreads each shard's samples over the pool (here: 3 shards, 2 workers) and the
    parent writes them in order: the same bytes and the same failure list as one process."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src, expected = messy_dir
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        stats = shard(ShardConfig(src=str(src), out=str(out), encode="jpg", resize="shorter", size=12,
                                  val_ratio=0.2, max_samples_per_shard=30, workers=workers))
        assert stats["num_failures"] == len(expected) and stats["num_shards"] >= 3
        outs.append(out)
    assert _shard_bytes(outs[0]) == _shard_bytes(outs[1])
    assert (outs[0] / "failures.jsonl").read_text() == (outs[1] / "failures.jsonl").read_text()
    assert verify(str(outs[1])) == []


def test_threaded_reads_give_the_same_shards(messy_dir, tmp_path, monkeypatch):
    """Slow storage moves reads onto threads (decided per shard from the first reads): forcing
    that path, and forcing it for every file, changes nothing in the output."""
    import pipeline.run as stage

    src, expected = messy_dir
    cfg = dict(src=str(src), val_ratio=0.2, max_samples_per_shard=40)
    shard(ShardConfig(out=str(tmp_path / "direct"), **cfg))
    monkeypatch.setattr(stage, "SLOW_READ_S", -1.0)  # every read counts as slow
    shard(ShardConfig(out=str(tmp_path / "threads"), **cfg))
    monkeypatch.setattr(stage, "PROBE_FILES", 0)      # threads from the first file
    shard(ShardConfig(out=str(tmp_path / "all-threads"), **cfg))
    direct = _shard_bytes(tmp_path / "direct")
    assert _shard_bytes(tmp_path / "threads") == direct == _shard_bytes(tmp_path / "all-threads")
    for name in ("threads", "all-threads"):
        assert (tmp_path / name / "failures.jsonl").read_text() == (tmp_path / "direct" / "failures.jsonl").read_text()


def test_samples_read_on_threads_once_reads_are_slow(tmp_path, monkeypatch):
    """The probe: fast reads stay on the calling thread, slow ones move to reader threads."""
    import threading

    import pipeline.run as stage
    from pipeline.packaged_data import write_digits
    from pipeline.sources import list_source

    write_digits(tmp_path / "src", size=8, limit=60)
    source = list_source(str(tmp_path / "src"))
    items, class_ids = source.items, {name: i for i, name in enumerate(source.classes)}
    opt = stage.EncodeOptions("none", 90, "none", 0, False, 10**8)
    seen: list[str] = []
    real_fetch = stage._fetch

    def fetch(item):
        seen.append(threading.current_thread().name)
        return real_fetch(item)

    monkeypatch.setattr(stage, "_fetch", fetch)
    samples = list(stage.iter_samples(items, class_ids, opt, threads=False))
    assert len(samples) == 60 and all(isinstance(s, list) for _, s in samples)
    assert set(seen) == {threading.current_thread().name}
    seen.clear()
    monkeypatch.setattr(stage, "SLOW_READ_S", -1.0)
    assert [s for _, s in stage.iter_samples(items, class_ids, opt)] == [s for _, s in samples]
    assert seen[:stage.PROBE_FILES] == [threading.current_thread().name] * stage.PROBE_FILES
    assert all(name.startswith("shard-read") for name in seen[stage.PROBE_FILES:])


def test_thread_executor_gives_identical_shards(digits_dir, tmp_path):
    """`executor=` is how a Dask client plugs in; any Executor must give the same bytes."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = tmp_path / "a", tmp_path / "b"
    shard(ShardConfig(src=str(digits_dir), out=str(a), max_samples_per_shard=400))
    with ThreadPoolExecutor(3) as pool:
        shard(ShardConfig(src=str(digits_dir), out=str(b), max_samples_per_shard=400), executor=pool)
    assert _shard_bytes(a) == _shard_bytes(b)


def test_splits_taken_from_source_folders(tmp_path):
    from pipeline.packaged_data import write_digits

    for split, n in (("train", 30), ("val", 10), ("test", 12)):
        write_digits(tmp_path / "src" / split, size=8, limit=n)
    out = tmp_path / "out"
    shard(ShardConfig(src=str(tmp_path / "src"), out=str(out), split_by="source", max_samples_per_shard=8))
    index = load_index(str(out))
    assert list(index["splits"]) == ["train", "val", "test"]
    assert [index["splits"][s]["num_samples"] for s in ("train", "val", "test")] == [30, 10, 12]
    assert [s["name"] for s in index["splits"]["test"]["shards"]] == ["test-000000.tar", "test-000001.tar"]
    for split in index["splits"]:
        assert all(s["__key__"].startswith(split + "/") for s in _read_samples(index, split))


def test_shards_capped_by_bytes(digits_dir, tmp_path):
    out = tmp_path / "out"
    shard(ShardConfig(src=str(digits_dir), out=str(out), max_shard_size="200KB"))
    index = load_index(str(out))
    sizes = [s["num_bytes"] for v in index["splits"].values() for s in v["shards"]]
    assert len(sizes) > 20 and max(sizes) <= 200_000
    assert all(p.stat().st_size <= 200_000 for p in out.glob("*.tar"))
    assert index["totals"]["num_samples"] == 1797


def _copies_of_photo(root: Path, n: int) -> Path:
    from pipeline.packaged_data import write_photos

    write_photos(root / "orig", names=("astronaut",))
    data = (root / "orig" / "astronaut.jpg").read_bytes()
    src = root / "src"
    for i in range(n):
        (src / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        (src / ("a" if i % 2 else "b") / f"{i:04d}.jpg").write_bytes(data)
    return src


def _descendants(pid: int) -> set[int]:
    """Live processes below `pid` (from /proc), e.g. a process pool's forkserver and workers."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _running(pids: set[int]) -> list[int]:
    """Those of `pids` still running (an exited one may linger as a zombie until reaped)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_then_rerun_is_byte_identical_to_a_clean_run(tmp_path, workers):
    src = _copies_of_photo(tmp_path, 90)
    # PNG re-encoding of 512x512 photos is slow enough to kill the run part-way.
    opts = ["--encode", "png", "--max-samples-per-shard", "5", "--val-ratio", "0.2", "--workers", str(workers)]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    cmd = [sys.executable, "-m", "vitpipe.cli", "shard", str(src)]
    subprocess.run(cmd + [str(clean)] + opts, check=True, capture_output=True, cwd=REPO)
    expected = _shard_bytes(clean)
    assert len(expected) >= 15

    proc = subprocess.Popen(cmd + [str(killed)] + opts, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO)
    deadline = time.monotonic() + 120
    while len(list(killed.glob("*.tar"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; give it more work"
    pool = _descendants(proc.pid)
    assert len(pool) >= (3 if workers > 1 else 0)  # forkserver + 2 workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30  # the pool's processes notice and end too
    while _running(pool) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pool)
    assert not (killed / "index.json").exists()
    partial = _shard_bytes(killed)
    assert 3 <= len(partial) < len(expected)
    assert all(expected[name] == data for name, data in partial.items())  # no half shard under a final name

    done = subprocess.run(cmd + [str(killed)] + opts, check=True, capture_output=True, text=True, cwd=REPO)
    # A shard renamed just before the kill may lack its receipt; it is rewritten (same bytes).
    resumed = int(re.search(r"(\d+) resumed", done.stdout).group(1))
    assert len(partial) - 1 <= resumed <= len(partial)
    assert _shard_bytes(killed) == expected
    assert not list(killed.glob("*.tmp-*"))
    assert verify(str(killed)) == []


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_killed_pool_worker_is_explained_and_the_rerun_resumes(tmp_path):
    """The kernel's OOM killer takes a --workers process: a clear error (not a BrokenProcessPool
    traceback), finished shards kept, and the same command finishes the job with identical bytes."""
    src = _copies_of_photo(tmp_path, 90)
    opts = ["--encode", "png", "--max-samples-per-shard", "5", "--val-ratio", "0.2", "--workers", "2"]
    cmd = [sys.executable, "-m", "vitpipe.cli", "shard", str(src)]
    subprocess.run(cmd + [str(tmp_path / "clean")] + opts, check=True, capture_output=True, cwd=REPO)
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + [str(out)] + opts, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while len(list(out.glob("*.tar"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in _descendants(proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"forkserver" in cmdline:
            workers += [p for p in _descendants(pid)]
    assert proc.poll() is None and workers, "the run finished before a worker could be killed"
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "a --workers process died" in err and "Traceback" not in err, err[-3000:]
    assert not (out / "index.json").exists() and list(out.glob("*.tar"))

    subprocess.run(cmd + [str(out)] + opts, check=True, capture_output=True, cwd=REPO)
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "clean")


def test_out_holding_another_dataset_needs_overwrite(digits_dir, tmp_path):
    out = tmp_path / "out"
    shard(ShardConfig(src=str(digits_dir), out=str(out), max_samples_per_shard=500))
    with pytest.raises(UserError, match="holds another shard set: its --max-samples-per-shard was 500, now 900; "
                                        "pass --overwrite"):
        shard(ShardConfig(src=str(digits_dir), out=str(out), max_samples_per_shard=900))
    stats = shard(ShardConfig(src=str(digits_dir), out=str(out), max_samples_per_shard=900, overwrite=True))
    assert stats["num_shards_resumed"] == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert verify(str(out)) == []


def test_resume_however_src_is_written(digits_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = dict(out=str(out), max_samples_per_shard=500)
    monkeypatch.chdir(digits_dir.parent)
    first = shard(ShardConfig(src=digits_dir.name, **cfg))
    for src in (f"./{digits_dir.name}/", str(digits_dir)):
        assert shard(ShardConfig(src=src, **cfg))["num_shards_resumed"] == first["num_shards"]
    monkeypatch.chdir(tmp_path)
    assert shard(ShardConfig(src=os.path.relpath(digits_dir), **cfg))["num_shards_resumed"] == first["num_shards"]
    assert load_index(str(out))["source"]["uri"] == os.path.realpath(digits_dir)
    # another source, or the same one with other files, is refused, saying which
    other = _few_digits(digits_dir, tmp_path / "other")
    with pytest.raises(UserError, match=f"its SRC was {re.escape(repr(os.path.realpath(digits_dir)))}, now "
                                        f"{re.escape(repr(os.path.realpath(other)))}"):
        shard(ShardConfig(src=str(other), **cfg))
    shard(ShardConfig(src=str(other), out=str(tmp_path / "out2")))
    (other / "0" / "new.png").write_bytes(next((digits_dir / "1").glob("*.png")).read_bytes())
    with pytest.raises(UserError, match="same options, but the files in SRC changed"):
        shard(ShardConfig(src=str(other), out=str(tmp_path / "out2")))


def test_overwrite_refuses_to_delete_foreign_files(digits_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty and holds no vitpipe shard set.*thesis.tex"):
        shard(ShardConfig(src=str(digits_dir), out=str(out)))
    with pytest.raises(UserError, match="thesis.tex"):
        shard(ShardConfig(src=str(digits_dir), out=str(out), overwrite=True))
    assert (out / "thesis.tex").read_text() == "precious"


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from vitpipe.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def test_user_errors_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _cli(["shard", str(tmp_path / "nope"), str(out)], capsys)
    assert rc == 2 and "does not exist" in err and "nope" in err
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("no images here")
    rc, err = _cli(["shard", str(tmp_path / "empty"), str(out)], capsys)
    assert rc == 2 and "holds no images" in err
    rc, err = _cli(["shard", str(tmp_path / "empty"), str(out), "--max-shard-size", "12 parsecs"], capsys)
    assert rc == 2 and "max_shard_size" in err and "12 parsecs" in err and "512MB" in err
    rc, err = _cli(["shard", str(tmp_path / "empty"), str(out), "--max-shard-size", "0"], capsys)
    assert rc == 2 and "must be > 0" in err
    assert not out.exists()  # nothing was created by the failed runs
    with pytest.raises(ConfigError, match="unknown key 'max_shard_bytes'"):
        from vitpipe.config import build_config

        build_config(ShardConfig, overrides={"src": "a", "out": "b", "max_shard_bytes": 5})


def test_cli_help_explains_every_option(capsys):
    from vitpipe.cli import main

    with pytest.raises(SystemExit):
        main(["shard", "--help"])
    help_text = capsys.readouterr().out
    for field in ShardConfig.model_fields:
        if field not in ("src", "out"):
            assert "--" + field.replace("_", "-") in help_text
    assert "SRC" in help_text and "OUT" in help_text and "512MB" in help_text


# ---------------------------------------------------------------------------------------------
# Manifests with fsspec URLs: file:// and http:// (a real http.server on 127.0.0.1)


@contextlib.contextmanager
def _serve(www: Path, handler):
    """Serve folder `www` over HTTP on 127.0.0.1 with `handler` (a SimpleHTTPRequestHandler class)
    until the context ends; yields the base URL."""
    import functools
    import threading
    from http.server import ThreadingHTTPServer

    www.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/www over HTTP on 127.0.0.1 for the test's duration; yields (dir, base URL)."""
    from http.server import SimpleHTTPRequestHandler

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

    with _serve(tmp_path / "www", Quiet) as base:
        yield tmp_path / "www", base


def test_manifest_with_file_and_http_urls(http_root, tmp_path):
    import pandas as pd

    from pipeline.packaged_data import write_photos

    www, base = http_root
    write_photos(www, names=("coffee", "chelsea", "camera"))
    local = write_photos(tmp_path / "local", names=("astronaut", "rocket"), fmt="png")
    rows = [
        {"url": f"{base}/coffee.jpg", "label": "food", "credit": "skimage"},
        {"url": f"{base}/chelsea.jpg", "label": "animal", "credit": "skimage"},
        {"url": f"{base}/missing.jpg", "label": "animal", "credit": "nobody"},  # HTTP 404
        {"url": f"file://{local}/astronaut.png", "label": "person", "credit": "NASA"},
        {"url": f"file://{local}/rocket.png", "label": "object", "credit": "NASA"},
    ]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    out = tmp_path / "out"
    stats = shard(ShardConfig(src=f"file://{manifest}", out=str(out), val_ratio=0.0))
    assert stats["failures_by_reason"] == {"unreadable": 1}
    assert "missing.jpg" in (out / "failures.jsonl").read_text()

    index = load_index(str(out))
    assert index["classes"] == ["animal", "food", "object", "person"]
    assert index["source"]["kind"] == "manifest"
    samples = _read_samples(index, "train")
    assert len(samples) == 4 == index["totals"]["num_samples"]
    for s in samples:
        meta = json.loads(s["json"])
        row = next(r for r in rows if r["url"] == meta["source"])
        expected = (www / "coffee.jpg" if "coffee" in row["url"] else www / "chelsea.jpg" if "chelsea" in row["url"]
                    else Path(row["url"].removeprefix("file://")))
        assert s[_image_ext(s)] == expected.read_bytes()
        assert index["classes"][int(s["cls"])] == row["label"] == meta["label"]
        assert meta["extra"] == {"credit": row["credit"]}
    assert verify(str(out)) == []


@pytest.mark.multiprocess
def test_manifest_served_over_http_with_relative_paths(http_root, tmp_path):
    from pipeline.packaged_data import write_digits

    www, base = http_root
    write_digits(www / "img", size=16, limit=40)
    lines = ["path,label"] + [f"{p.relative_to(www).as_posix()},{p.parent.name}" for p in sorted(www.rglob("*.png"))]
    (www / "list.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    stats = shard(ShardConfig(src=f"{base}/list.csv", out=str(out), max_samples_per_shard=8, workers=2))
    assert stats["num_samples"] == 40 and stats["num_failures"] == 0
    index = load_index(str(out))
    got = sorted(json.loads(s["json"])["source"] for split in index["splits"] for s in _read_samples(index, split))
    assert got == sorted(f"{base}/{line.split(',')[0]}" for line in lines[1:])


@pytest.mark.parametrize("background", [True, False], ids=["sink-thread", "inline"])
def test_tar_writer_matches_tarfile_byte_for_byte(background, tmp_path):
    """The fast header path writes exactly what Python's tarfile writes with the same fixed fields,
    whether a second thread writes the chunks or the caller does (pool workers); 1 KiB chunks
    make each sample a chunk of its own, and writeback is started every 2 KiB of a real file."""
    from pipeline.tar_writer import ShardTarWriter

    members = [("0/0001.png", b"p" * 700), ("0/0001.cls", b"3"), ("k" * 100 + ".json", b"{}"),
               ("deep/" + "n" * 150 + ".jpg", b"j" * 1025), ("e.json", b""), ("x.bin", b"b" * 512)]
    with open(tmp_path / "out.tar", "wb") as f, \
            ShardTarWriter(f, chunk_bytes=1024, writeback_every=2048, background=background) as writer:
        writer.add(members[:2])
        writer.add(members[2:4])
        writer.add(members[4:])
        writer.close()
    got = io.BytesIO((tmp_path / "out.tar").read_bytes())
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    assert got.getvalue() == ref.getvalue()
    assert writer.num_bytes == len(ref.getvalue()) and writer.sha256.hexdigest() == hashlib.sha256(ref.getvalue()).hexdigest()


def test_manifest_on_s3_served_by_moto(tmp_path, monkeypatch):
    """s3:// works through fsspec/s3fs; the S3 service is moto's server on 127.0.0.1 (no AWS here)."""
    import socket

    import fsspec
    from moto.server import ThreadedMotoServer

    from pipeline.packaged_data import write_digits

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        fsspec.config.conf.pop("s3", None)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("bucket")
        local = write_digits(tmp_path / "digits", size=16, limit=30)
        files = sorted(local.rglob("*.png"))
        for p in files:
            fs.pipe(f"bucket/img/{p.parent.name}/{p.name}", p.read_bytes())
        manifest = "path,label\n" + "".join(f"img/{p.parent.name}/{p.name},{p.parent.name}\n" for p in files)
        fs.pipe("bucket/manifest.csv", manifest.encode())
        fsspec.filesystem("s3").invalidate_cache()

        out = tmp_path / "out"
        stats = shard(ShardConfig(src="s3://bucket/manifest.csv", out=str(out), max_samples_per_shard=10))
        assert stats["num_samples"] == 30 and stats["num_failures"] == 0
        index = load_index(str(out))
        for split in index["splits"]:
            for s in _read_samples(index, split):
                meta = json.loads(s["json"])
                assert meta["source"].startswith("s3://bucket/img/")
                rel = meta["source"].removeprefix("s3://bucket/img/")
                assert s["png"] == (local / rel).read_bytes()
    finally:
        server.stop()


def test_concurrent_run_on_same_out_is_refused(digits_dir, tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running 'vitpipe shard' holds
        with pytest.raises(UserError, match="another 'vitpipe shard' is writing"):
            shard(ShardConfig(src=str(digits_dir), out=str(out)))
    finally:
        os.close(fd)
    assert not list(out.iterdir())


def test_split_names_must_be_file_safe(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "m.csv").write_text("path,split\na.png,train set\n")
    with pytest.raises(UserError, match=r"split names \['train set'\]"):
        shard(ShardConfig(src=str(tmp_path / "m.csv"), out=str(tmp_path / "out"), split_by="source"))


@pytest.mark.multiprocess
def test_dask_executor_gives_identical_shards(digits_dir, tmp_path):
    """The cluster stage fans shards out with dask.distributed; the bytes must not change."""
    from distributed import Client, LocalCluster

    a, b = tmp_path / "a", tmp_path / "b"
    cfg = dict(src=str(digits_dir), max_samples_per_shard=400)
    shard(ShardConfig(out=str(a), **cfg))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        shard(ShardConfig(out=str(b), **cfg), executor=client.get_executor())
    assert _shard_bytes(a) == _shard_bytes(b)


def test_cli_config_file_and_overrides(digits_dir, tmp_path, capsys):
    """`vitpipe shard --config FILE` with a command-line override: CLI > file > defaults, and the
    resolved config lands next to the output."""
    import yaml

    from vitpipe.cli import main

    out = tmp_path / "out"
    cfg_file = tmp_path / "shard.yaml"
    cfg_file.write_text(yaml.safe_dump({"src": str(tmp_path / "elsewhere"), "max_samples_per_shard": 100,
                                        "val_ratio": 0.5, "max_shard_size": "50MB"}))
    argv = ["shard", str(digits_dir), str(out), "--config", str(cfg_file), "--max-samples-per-shard", "700"]
    assert main(argv) == 0
    assert "sharded 1797 images" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["src"] == str(digits_dir)
    assert (saved["max_samples_per_shard"], saved["val_ratio"], saved["max_shard_size"]) == (700, 0.5, 50_000_000)
    index = load_index(str(out))
    assert max(s["num_samples"] for v in index["splits"].values() for s in v["shards"]) == 700
    assert 0.45 < index["splits"]["val"]["num_samples"] / 1797 < 0.55
    assert main(["verify", str(out)]) == 0


def test_byte_cap_holds_with_unicode_and_quoted_metadata(digits_dir, tmp_path):
    """The planner's byte bound covers JSON escaping of paths, labels and extra columns."""
    import pandas as pd

    files = sorted(digits_dir.rglob("*.png"))[:120]
    pd.DataFrame({"path": [str(p) for p in files],
                  "label": [f"ziffer «{p.parent.name}» \"q\"" for p in files],
                  "caption": [f"handgeschriebene Ziffer {p.stem} " + "— 手書き \\ \t" * 300 for p in files]}
                 ).to_csv(tmp_path / "m.csv", index=False)
    cap = 60_000  # ~5 samples of ~9 KB (mostly the caption) per shard
    out = tmp_path / "out"
    shard(ShardConfig(src=str(tmp_path / "m.csv"), out=str(out), max_shard_size=cap, val_ratio=0.0))
    index = load_index(str(out))
    assert index["totals"]["num_samples"] == 120 and index["totals"]["num_failures"] == 0
    sizes = [p.stat().st_size for p in out.glob("*.tar")]
    assert len(sizes) > 15 and max(sizes) <= cap
    sample = _read_samples(index, "train")[0]
    assert json.loads(sample["json"])["extra"]["caption"].endswith("手書き \\ \t")


def test_every_shard_mixes_classes_by_default(digits_shards):
    """Class-ordered shards starve a finite shuffle buffer of whole classes for many steps."""
    index = load_index(str(digits_shards))
    for entry in index["splits"]["train"]["shards"]:
        with tarfile.open(digits_shards / entry["name"]) as tar:
            classes = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")}
        assert len(classes) == 10, (entry["name"], classes)


def test_sorted_sample_order_keeps_keys_sorted(digits_dir, tmp_path):
    files = sorted(digits_dir.rglob("*.png"))[:60]
    src = tmp_path / "src"
    for f in files:
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        (src / f.parent.name / f.name).write_bytes(f.read_bytes())
    shard(ShardConfig(src=str(src), out=str(tmp_path / "out"), val_ratio=0.0, sample_order="sorted"))
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        keys = [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".cls")]
    assert len(keys) == 60 and keys == sorted(keys)


def test_read_bytes_reads_to_the_end_whatever_the_listed_size(tmp_path):
    """The listed size is a hint for one read; a file that grew or shrank since, or a short read,
    still comes back whole."""
    from pipeline.run import read_bytes

    path = tmp_path / "f.bin"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    for hint in (0, 1, len(data) - 1, len(data), len(data) + 5, 10 << 20):
        assert read_bytes(str(path), size=hint) == data, hint
    assert read_bytes(f"file://{path}", size=len(data)) == data


# ---------------------------------------------------------------------------------------------
# At scale: bounded memory (runs on disk, planning ranges), manifest parts, faults while listing


def _all_outputs(out: Path) -> dict[str, bytes]:
    """What must not change whoever writes a shard set: the shards, failures.jsonl, index splits."""
    files = _shard_bytes(out)
    files["failures.jsonl"] = (out / "failures.jsonl").read_bytes()
    files["splits"] = json.dumps(json.loads((out / "index.json").read_text())["splits"]).encode()
    return files


def _tiny_limits(monkeypatch) -> None:
    """Spill, merge and cut the plan into ranges after a handful of lines, as tens of millions would."""
    import pipeline.plan as plan

    for name, value in {"RUN_LINES": 40, "FAN_IN": 3, "INDEX_EVERY": 7, "BUCKET_LINES": 90,
                        "TREE_PARTS_PER_TASK": 2}.items():
        monkeypatch.setattr(plan, name, value)


@pytest.mark.multiprocess
def test_bounded_plan_gives_the_same_bytes_however_the_work_is_divided(messy_dir, tmp_path, monkeypatch):
    """Sorted runs of 40 lines merged 3 at a time, planning ranges of ~90 items, 2 class folders per
    listing task: the same shards and failures as one in-memory chunk, in one process, on threads
    and on a 2-process pool (which lists, plans and writes in its workers)."""
    from concurrent.futures import ThreadPoolExecutor

    src, expected = messy_dir
    photos = src / "photo" / "nested" / "deeper"
    for i in range(6):  # more class folders than one listing task takes, and keys that collide
        (src.parent / "wide" / f"c{i}").mkdir(parents=True, exist_ok=True)
        for p in sorted((src / "digit").glob("*.png"))[i * 10:(i + 1) * 10]:
            (src.parent / "wide" / f"c{i}" / p.name).write_bytes(p.read_bytes())
        (src.parent / "wide" / f"c{i}" / "same.jpg").write_bytes((photos / "coffee.jpg").read_bytes())
        (src.parent / "wide" / f"c{i}" / "same.png").write_bytes(next((src / "digit").glob("*.png")).read_bytes())
    wide = src.parent / "wide"
    for root, kw in ((src, dict(val_ratio=0.2, max_samples_per_shard=16)),
                     (wide, dict(val_ratio=0.3, max_shard_size="20KB", sample_order="sorted")),
                     (wide, dict(val_ratio=0.3, max_samples_per_shard=7))):
        cfg = dict(src=str(root), **kw)
        shard(ShardConfig(out=str(tmp_path / "plain"), overwrite=True, **cfg))
        reference = _all_outputs(tmp_path / "plain")
        assert len(reference) > 5
        shard(ShardConfig(out=str(tmp_path / "pool"), workers=2, overwrite=True, **cfg))
        assert _all_outputs(tmp_path / "pool") == reference
        with monkeypatch.context() as m:
            _tiny_limits(m)
            shard(ShardConfig(out=str(tmp_path / "tiny"), overwrite=True, **cfg))
            assert _all_outputs(tmp_path / "tiny") == reference
            with ThreadPoolExecutor(3) as pool:
                shard(ShardConfig(out=str(tmp_path / "threads"), overwrite=True, **cfg), executor=pool)
            assert _all_outputs(tmp_path / "threads") == reference
        assert verify(str(tmp_path / "tiny")) == []
        assert not list((tmp_path / "tiny" / ".vitpipe").glob("*/"))  # listing and plan files gone
    keys = [s["__key__"] for s in _read_samples(load_index(str(tmp_path / "plain")), "train")]
    assert sum(k.startswith("c0/same_") for k in keys + [s["__key__"] for s in _read_samples(
        load_index(str(tmp_path / "plain")), "val")]) == 2  # same.jpg and same.png: both kept, suffixed


def _digit_rows(digits_dir: Path, n: int) -> list[dict]:
    files = sorted(digits_dir.rglob("*.png"))[:n]
    return [{"path": str(p), "label": p.parent.name} for p in files]


def test_a_manifest_folder_of_parts_is_one_manifest(digits_dir, tmp_path):
    """Large collections ship their manifest as many part files: a folder of them (or a glob, or
    a mix of Parquet and JSONL parts) gives the same shards as the rows in one file."""
    import pandas as pd

    rows = _digit_rows(digits_dir, 300)
    (tmp_path / "one").mkdir()  # keys are paths relative to the manifest file: same depth for all
    one = tmp_path / "one" / "all.parquet"
    pd.DataFrame(rows).to_parquet(one)
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):
        pd.DataFrame(rows[i * 100:(i + 1) * 100]).to_parquet(parts / f"part-{i:03d}.parquet")
    (parts / "_SUCCESS").write_text("")  # what Spark leaves next to its parts
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pd.DataFrame(rows[:150]).to_parquet(mixed / "a.parquet")
    (mixed / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[150:]))
    cfg = dict(val_ratio=0.2, max_samples_per_shard=70)
    shard(ShardConfig(src=str(one), out=str(tmp_path / "o1"), **cfg))
    expected = _shard_bytes(tmp_path / "o1")
    for src in (parts, f"{parts}/part-*.parquet", mixed):
        out = tmp_path / f"o-{Path(str(src)).name.replace('*', 'x')}"
        stats = shard(ShardConfig(src=str(src), out=str(out), **cfg))
        assert stats["num_samples"] == 300 and _shard_bytes(out) == expected, src
        assert load_index(str(out))["source"]["kind"] == "manifest"


def _bad_part_case(tmp_path: Path, digits_dir: Path, fault: str) -> tuple[Path, list[dict]]:
    import pandas as pd

    rows = _digit_rows(digits_dir, 90)
    src = tmp_path / f"manifest-{fault}"
    src.mkdir()
    for i in range(3):
        pd.DataFrame(rows[i * 30:(i + 1) * 30]).to_parquet(src / f"part-{i}.parquet")
    if fault == "unreadable":
        (src / "part-1.parquet").write_bytes(b"PAR1 this is not parquet, a copy cut short")
    else:
        pd.DataFrame(rows[30:60]).rename(columns={"path": "file_name"}).to_parquet(src / "part-1.parquet")
    return src, rows


@pytest.mark.parametrize("fault,message", [("unreadable", "could not be read as parquet"),
                                           ("schema", r"has another schema.*lacks the column\(s\) \['path'\]")])
def test_a_bad_manifest_part_is_named_and_the_rerun_finishes_with_the_same_bytes(digits_dir, tmp_path, capsys,
                                                                                 monkeypatch, fault, message):
    import pandas as pd

    import pipeline.plan as plan

    src, rows = _bad_part_case(tmp_path, digits_dir, fault)
    out = tmp_path / "out"
    rc, err = _cli(["shard", str(src), str(out), "--max-samples-per-shard", "20"], capsys)
    assert rc == 2 and re.search(message, err) and str(src / "part-1.parquet") in err, err
    assert "Traceback" not in err and not (out / "index.json").exists() and not list(out.glob("*.tar"))
    # fixed, the same command finishes; the parts listed before the error are not listed again
    pd.DataFrame(rows[30:60]).to_parquet(src / "part-1.parquet")
    listed = []
    real = plan.iter_part
    monkeypatch.setattr(plan, "iter_part", lambda part, reject: (listed.append(Path(part.uri).name),
                                                                   real(part, reject))[1])
    rc, _ = _cli(["shard", str(src), str(out), "--max-samples-per-shard", "20"], capsys)
    assert rc == 0 and "part-1.parquet" in listed and "part-0.parquet" not in listed
    shard(ShardConfig(src=str(src), out=str(tmp_path / "clean"), max_samples_per_shard=20))
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "clean") and len(_shard_bytes(out)) >= 4
    assert verify(str(out)) == []


def test_a_folder_that_disappears_while_listing_is_reported(digits_dir, tmp_path, monkeypatch):
    """A class folder deleted after SRC was looked at, before its files are listed (another job
    cleaning up): its loss is a failure record naming it, the rest is sharded, and a re-run
    finds the same collection and resumes every shard."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(digits_dir, src)
    doomed = src / "7"
    n7 = len(list(doomed.iterdir()))
    real = os.scandir

    def scandir(path="."):
        if isinstance(path, str) and Path(path) == doomed and doomed.exists():
            monkeypatch.setattr(os, "scandir", real)  # rmtree scans too
            shutil.rmtree(doomed)  # for real: the listing below then fails as it would
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    stats = shard(ShardConfig(src=str(src), out=str(out), max_samples_per_shard=400))
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failures == [{"source": str(doomed), "reason": "unreadable",
                         "detail": "cannot list this folder (No such file or directory); its files are not sharded"}]
    assert stats["num_samples"] == 1797 - n7 and "7" not in load_index(str(out))["classes"]
    again = shard(ShardConfig(src=str(src), out=str(out), max_samples_per_shard=400))
    assert again["num_shards_resumed"] == stats["num_shards"] and verify(str(out)) == []


@pytest.fixture
def slow_http_root(tmp_path):
    """tmp_path/www over HTTP on 127.0.0.1, answering each HEAD (a size lookup) after 30 ms, as a
    far object store does; counts the HEADs per path."""
    from http.server import SimpleHTTPRequestHandler

    heads: Counter = Counter()

    class Slow(SimpleHTTPRequestHandler):
        def do_HEAD(self):
            heads[self.path] += 1
            time.sleep(0.03)
            super().do_HEAD()

        def log_message(self, *args):
            pass

    with _serve(tmp_path / "www", Slow) as base:
        yield tmp_path / "www", base, heads


@pytest.mark.slow
def test_kill_9_while_listing_then_rerun_keeps_the_listed_parts(digits_dir, slow_http_root, tmp_path):
    """A manifest of 6 parts whose images sit on a slow HTTP store: `vitpipe shard` killed with
    SIGKILL once some parts are listed (their receipts written) and before any plan; the re-run
    lists only the parts not finished and writes the same bytes as a clean run."""
    www, base, heads = slow_http_root
    files = sorted(digits_dir.rglob("*.png"))[:240]
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    for p in files:
        (www / p.parent.name).mkdir(exist_ok=True)
        (www / p.parent.name / p.name).write_bytes(p.read_bytes())
    for i in range(6):
        lines = ["url,label"] + [f"{base}/{p.parent.name}/{p.name},{p.parent.name}" for p in files[i * 40:(i + 1) * 40]]
        (manifest / f"part-{i}.csv").write_text("\n".join(lines) + "\n")
    out, clean = tmp_path / "out", tmp_path / "clean"
    cmd = [sys.executable, "-m", "vitpipe.cli", "shard", str(manifest)]
    opts = ["--max-samples-per-shard", "25", "--val-ratio", "0.2"]
    proc = subprocess.Popen(cmd + [str(out)] + opts, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 120
    while len(list((out / ".vitpipe" / "listing").glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / ".vitpipe" / "plan.json").exists(), "the listing ended before the kill; slow it down"
    listed_before = {p.name for p in (out / ".vitpipe" / "listing").glob("*.json")}
    assert 2 <= len(listed_before) < 6
    heads.clear()
    subprocess.run(cmd + [str(out)] + opts, check=True, capture_output=True, cwd=REPO)
    rerun = dict(heads)
    heads.clear()
    subprocess.run(cmd + [str(clean)] + opts, check=True, capture_output=True, cwd=REPO)
    # Listing looks up each file's size once (a HEAD); reading it later may too. The re-run
    # looked up the files of the parts listed before the kill one time fewer than a clean run.
    done_parts = {int(name.split("-")[1].split(".")[0]) for name in listed_before}  # list-<part>.json
    for i, p in enumerate(files):
        path = f"/{p.parent.name}/{p.name}"
        assert rerun[path] == heads[path] - (i // 40 in done_parts), (path, rerun[path], heads[path])
    assert _shard_bytes(out) == _shard_bytes(clean) and len(_shard_bytes(out)) >= 8
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name] and verify(str(out)) == []


# ---------------------------------------------------------------------------------------------
# Faults of issue #14: names that are not UTF-8, a full disk, temporary files left by a kill


def test_file_names_that_are_not_utf8_are_kept_under_safe_keys(digits_dir, tmp_path, capsys):
    """Linux names are bytes: b'\\xff\\xfe.jpg' is a valid file name (Python holds it with surrogate
    escapes). It used to crash the stage in plan_fingerprint; now the image is sharded under an
    ASCII key, its JSON `source` shows the bytes as \\xNN, and webdataset and GNU tar read the shard."""
    from pipeline.packaged_data import write_photos

    write_photos(tmp_path / "photos", names=("coffee",))
    jpg = (tmp_path / "photos" / "coffee.jpg").read_bytes()
    png = next((digits_dir / "3").glob("*.png")).read_bytes()
    src = tmp_path / "src"
    (src / "cls").mkdir(parents=True)
    bad = {b"\xff\xfe.jpg": jpg, b"caf\xe9.png": png, b"\xfe\xff.png": png}  # the first and last collide
    for name, data in bad.items():
        with open(os.path.join(os.fsencode(src / "cls"), name), "wb") as f:
            f.write(data)
    (src / "cls" / "ok.png").write_bytes(png)
    (src / b"\xe9t\xe9".decode("utf-8", "surrogateescape")).mkdir()  # a class folder name, too
    (src / b"\xe9t\xe9".decode("utf-8", "surrogateescape") / "x.png").write_bytes(png)
    out = tmp_path / "out"
    rc, err = _cli(["shard", str(src), str(out), "--val-ratio", "0"], capsys)
    assert rc == 0, err
    index = load_index(str(out))
    samples = _read_samples(index, "train")
    assert len(samples) == 5 and len({s["__key__"] for s in samples}) == 5
    assert all(re.fullmatch(r"[A-Za-z0-9_/-]+", s["__key__"]) for s in samples)
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    # pass-through keeps the bytes; the members share the set's one extension (the most names say png)
    assert by_source[f"{src}/cls/\\xff\\xfe.jpg"]["png"] == jpg
    assert by_source[f"{src}/cls/caf\\xe9.png"]["png"] == png
    assert index["classes"] == ["\\xe9t\\xe9", "cls"]  # a class is named by its folder, shown the same way
    assert index["classes"][int(by_source[f"{src}/\\xe9t\\xe9/x.png"]["cls"])] == "\\xe9t\\xe9"
    listing = subprocess.run(["tar", "-tf", str(out / "train-000000.tar")], capture_output=True, check=True)
    assert listing.stdout.decode("ascii").count(".json") == 5  # member names are plain ASCII
    assert verify(str(out)) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 3 MB tmpfs (a full disk on demand); unmounted whatever happens."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_after_freeing_space_is_exact(tmp_path, small_tmpfs):
    src = _copies_of_photo(tmp_path, 60)  # ~6 MB of JPEGs for a 3 MB filesystem
    opts = ["--max-samples-per-shard", "5", "--val-ratio", "0.2"]
    cmd = [sys.executable, "-m", "vitpipe.cli", "shard", str(src)]
    subprocess.run(cmd + [str(tmp_path / "clean")] + opts, check=True, capture_output=True, cwd=REPO)
    expected = _shard_bytes(tmp_path / "clean")
    out = small_tmpfs / "shards"
    proc = subprocess.run(cmd + [str(out)] + opts, capture_output=True, text=True, cwd=REPO)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(rf"vitpipe shard: error: no space left on the device writing {re.escape(str(out))}/"
                        r"(train|val)-\d{6}\.tar: the \d+ shards still to write need about [\d.]+ MB, [\d.]+ \w?B "
                        r"free there now; free some space \(or choose another OUT\) and re-run the same command: "
                        r"the finished shards are kept and nothing half-written counts as done", line), line
    need = float(re.search(r"need about ([\d.]+) MB", line).group(1))
    assert 1 < need < 7
    assert not (out / "index.json").exists() and not [p for p in out.rglob("*") if ".tmp-" in p.name]
    partial = _shard_bytes(out)
    assert partial and all(expected[name] == data for name, data in partial.items())  # complete or absent
    subprocess.run(["mount", "-o", "remount,size=40m", str(small_tmpfs)], check=True)  # space freed
    done = subprocess.run(cmd + [str(out)] + opts, check=True, capture_output=True, text=True, cwd=REPO)
    assert f"{len(partial)} resumed" in done.stdout
    assert _shard_bytes(out) == expected and verify(str(out)) == []


def test_temporary_files_a_kill_leaves_are_removed_everywhere_in_out(digits_dir, tmp_path):
    """A writer killed between writing and renaming leaves NAME.tmp-<host>-<pid>: a shard, a
    receipt in .vitpipe/, a listing file below it. The window is microseconds, so the files are
    made here the way a kill leaves them; the next run removes all of them (it used to look at
    the top of OUT only, leaving .vitpipe/*.tar.json.tmp-PID forever)."""
    out = tmp_path / "out"
    cfg = dict(src=str(digits_dir), out=str(out), max_samples_per_shard=500)
    shard(ShardConfig(**cfg))
    left = [out / "train-000001.tar.tmp-host-4242", out / ".vitpipe" / "train-000000.tar.json.tmp-4242",
            out / ".vitpipe" / "plan.json.tmp-host-77"]
    (out / ".vitpipe" / "listing").mkdir()
    left.append(out / ".vitpipe" / "listing" / "list-000000.json.tmp-host-9")
    for p in left:
        p.write_bytes(b"half")
    (out / "train-000001.tar").unlink()  # and a shard to write again
    stats = shard(ShardConfig(**cfg))
    assert stats["num_shards_written"] == 1
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert verify(str(out)) == []


def test_a_shard_set_an_older_vitpipe_planned_asks_for_overwrite_before_listing(digits_dir, tmp_path, monkeypatch):
    import pipeline.plan as plan

    out = tmp_path / "out"
    shard(ShardConfig(src=str(digits_dir), out=str(out), max_samples_per_shard=500))
    (out / ".vitpipe" / "plan.json").write_text(json.dumps({"fingerprint": "0" * 64}))  # as vitpipe <= 2026-12 wrote
    monkeypatch.setattr(plan, "list_task", lambda *a: pytest.fail("listed SRC before refusing"))
    with pytest.raises(UserError, match=r"an older vitpipe planned \(plan format 1, now 2\); pass --overwrite"):
        shard(ShardConfig(src=str(digits_dir), out=str(out), max_samples_per_shard=500))
    monkeypatch.undo()
    stats = shard(ShardConfig(src=str(digits_dir), out=str(out), max_samples_per_shard=500, overwrite=True))
    assert stats["num_shards_written"] == stats["num_shards"]


def test_progress_covers_listing_planning_and_writing(digits_dir, tmp_path):
    """Listing tens of millions of files on network storage takes minutes: it has its own bar
    (files, rate, parts done, an ETA from them), as planning and writing do, then one summary."""
    proc = subprocess.run([sys.executable, "-m", "vitpipe.cli", "shard", str(digits_dir), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, check=True,
                          env={**os.environ, "TQDM_MININTERVAL": "0"})
    bars = proc.stderr.replace("\r", "\n")
    assert re.search(r"list images: 100%.*1797/1797 \[.*file/s, parts=11/11\]", bars), bars[-2000:]
    assert re.search(r"plan: 100%.*1797/1797 .*img/s", bars) and re.search(r"shard images: 100%.*img/s", bars)
    assert re.fullmatch(r"sharded 1797 images \(train \d+ / val \d+\) into \d+ shards \[\d+ written, 0 resumed\], "
                        r"0 failures, [\d.]+ MB in [\d.]+s \(listing and planning [\d.]+s\) -> .*\n", proc.stdout)
