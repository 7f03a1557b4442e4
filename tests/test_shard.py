"""The shard stage on real images, read back by real readers (webdataset, GNU tar)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from pipeline.index import load_index, shard_urls
from pipeline.shard import ShardConfig, shard, split_of
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
    keys = [line.split()[-1].split(".")[0] for line in listing]
    assert keys == sorted(keys)  # sorted keys: a deterministic order
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
