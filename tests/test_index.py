"""index.json: loading, validation with actionable errors, shard URLs per split."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.index import INDEX_NAME, load_index, shard_urls, validate_index
from vitpipe.errors import UserError


def test_load_index_from_dir_or_file(digits_shards):
    by_dir = load_index(str(digits_shards))
    by_file = load_index(str(digits_shards / INDEX_NAME))
    assert by_dir == by_file
    assert by_dir["_root"] == str(digits_shards)
    urls = shard_urls(by_dir, "train")
    assert urls == [f"{digits_shards}/{s['name']}" for s in by_dir["splits"]["train"]["shards"]]
    assert all((digits_shards / u.rsplit("/", 1)[1]).is_file() for u in urls)
    assert sum(s["num_samples"] for s in by_dir["splits"]["train"]["shards"]) == \
        by_dir["splits"]["train"]["num_samples"]


def test_load_index_over_fsspec_memory_filesystem(digits_shards):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/shards/index.json", (digits_shards / INDEX_NAME).read_bytes())
    index = load_index("memory://shards")
    assert shard_urls(index, "val") == [f"memory://shards/{s['name']}" for s in index["splits"]["val"]["shards"]]


def test_unknown_split_names_the_available_ones(digits_shards):
    with pytest.raises(UserError, match=r"split 'test' is not in the shard set; available splits: \['train', 'val'\]"):
        shard_urls(load_index(str(digits_shards)), "test")


def test_missing_and_corrupt_index_are_user_errors(tmp_path, digits_shards):
    with pytest.raises(UserError, match="no shard index.*vitpipe shard SRC"):
        load_index(str(tmp_path))
    (tmp_path / INDEX_NAME).write_text('{"format": "vitpipe-sh')
    with pytest.raises(UserError, match="not valid JSON"):
        load_index(str(tmp_path))


@pytest.mark.parametrize("edit,message", [
    (lambda ix: ix.update(format="other"), "'format' is 'other'"),
    (lambda ix: ix.update(version=99), "this vitpipe reads version 1"),
    (lambda ix: ix["splits"]["train"].update(num_samples=1), "split 'train' says num_samples=1"),
    (lambda ix: ix["splits"]["val"]["shards"][0].pop("sha256"), "needs name, num_samples, num_bytes, sha256"),
    (lambda ix: ix["totals"].update(num_shards=0), "'totals'"),
])
def test_validation_names_what_is_wrong(digits_shards, tmp_path, edit, message):
    index = json.loads((digits_shards / INDEX_NAME).read_text())
    validate_index(index)
    edit(index)
    with pytest.raises(UserError, match=message):
        validate_index(index)
    shutil.copytree(digits_shards, tmp_path / "copy")
    (tmp_path / "copy" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(UserError, match="re-create it with 'vitpipe shard"):
        load_index(str(tmp_path / "copy"))


def test_counts_must_be_integers(digits_shards):
    index = json.loads((digits_shards / INDEX_NAME).read_text())
    index["splits"]["train"]["num_samples"] = str(index["splits"]["train"]["num_samples"])
    with pytest.raises(UserError, match=r"split 'train': num_samples must be an integer, got '\d+'"):
        validate_index(index)


def test_an_index_of_10000_shards_loads_and_every_rank_gets_equal_steps(tmp_path):
    """A collection of tens of millions is thousands of shards of uneven size: the index loads and
    validates, every one of 8 ranks gets the same number of steps, and their workers' slices
    cover the epoch exactly once (no tar is opened to plan this)."""
    import random

    from pipeline.loader import DataConfig, EvalLoader, TrainLoader

    rng = random.Random(0)
    shards = [{"name": f"train-{i:06d}.tar", "num_samples": rng.randint(1, 300), "num_bytes": 10240,
               "sha256": "0" * 64} for i in range(10_000)]
    n = sum(s["num_samples"] for s in shards)
    index = {"format": "vitpipe-shards", "version": 1, "classes": ["a", "b"],
             "splits": {"train": {"num_samples": n, "num_bytes": 10240 * len(shards), "shards": shards}},
             "totals": {"num_samples": n, "num_bytes": 10240 * len(shards), "num_shards": len(shards),
                        "num_failures": 0},
             "source": {}, "config": {}}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    loaded = load_index(str(tmp_path))
    assert len(shard_urls(loaded, "train")) == 10_000
    cfg = DataConfig(shards=str(tmp_path), batch_size=64, num_workers=2)
    world = 8
    loaders = [TrainLoader(cfg, loaded, rank=r, world_size=world, seed=1, return_keys=False) for r in range(world)]
    steps = {len(loader) for loader in loaders}
    assert steps == {-(-n // (64 * world))}  # equal on every rank, every sample seen once per epoch
    covered = sorted(loader._stream.worker_slice(k) for loader in loaders for k in range(2))
    assert covered[0][0] == 0 and covered[-1][1] == len(loaders[0]) * 64 * world
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # contiguous, no overlap
    evals = [EvalLoader(cfg, loaded, "train", rank=r, world_size=world) for r in range(world)]
    assert sum(e.rank_num_samples for e in evals) == n and len({len(e) for e in evals}) == 1
