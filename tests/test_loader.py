"""Training and evaluation loaders (pipeline/loader.py) on real digits shards from the shard stage.

Ranks are simulated in one process by building loaders with rank=0/1 (that exercises the split
logic, with real DataLoader worker processes); one test runs two real gloo processes.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_modes import ModeCase, assert_pixels, luma
from pipeline.index import load_index
from pipeline.loader import AugmentConfig, DataConfig, make_eval_loader, make_train_loader
from pipeline.shard import ShardConfig, shard
from vitpipe.config import ConfigError, build_config
from vitpipe.errors import UserError


@pytest.fixture(scope="module")
def three_shards(digits_dir, tmp_path_factory) -> Path:
    """The digits with the train split in exactly 3 shards (the issue's layout)."""
    out = tmp_path_factory.mktemp("loader") / "shards"
    shard(ShardConfig(src=str(digits_dir), out=str(out), val_ratio=0.1, max_samples_per_shard=600, workers=1))
    assert len(load_index(out)["splits"]["train"]["shards"]) == 3
    return out


def _tar_keys(shards: Path, split: str) -> list[str]:
    """Sample keys of a split in index order, listed by the `tar` program (an independent reader)."""
    keys: list[str] = []
    for s in load_index(shards)["splits"][split]["shards"]:
        names = subprocess.run(["tar", "-tf", str(shards / s["name"])], check=True, capture_output=True,
                               text=True).stdout.split()
        for name in names:
            key = name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def _cfg(shards: Path, **kw) -> DataConfig:
    kw.setdefault("batch_size", 32)
    kw.setdefault("num_workers", 2)
    kw.setdefault("shuffle_buffer", 200)
    return DataConfig(shards=str(shards), **kw)


def _epoch(loader) -> tuple[list[str], list[torch.Tensor]]:
    keys, images = [], []
    for x, _, k in loader:
        assert len(k) == len(x)
        keys += k
        images.append(x)
    return keys, images


def test_two_ranks_two_workers_three_shards_cover_the_split_with_equal_steps(three_shards, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.loader")
    cfg = _cfg(three_shards)
    split = _tar_keys(three_shards, "train")
    loaders = [make_train_loader(cfg, rank=r, world_size=2, return_keys=True) for r in range(2)]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == -(-len(split) // 64)
    assert loaders[0].num_classes == 10 and loaders[0].class_names == [str(i) for i in range(10)]
    for epoch in range(2):
        seen: Counter = Counter()
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = 0
            for x, y, keys in loader:
                assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
                batches += 1
                seen.update(keys)
            assert batches == loader.steps_per_epoch
        assert set(seen) == set(split)  # every sample of the split, each epoch
        repeated = sum(seen.values()) - len(split)
        assert repeated == 2 * loaders[0].samples_per_epoch - len(split)
        assert max(seen.values()) == 2  # the fill repeats a few samples once, never more
    assert f"{repeated} samples repeated per epoch" in caplog.text


def test_drop_mode_never_repeats(three_shards):
    cfg = _cfg(three_shards, epoch_fill="drop")
    split = set(_tar_keys(three_shards, "train"))
    keys = []
    for r in range(2):
        loader = make_train_loader(cfg, rank=r, world_size=2, return_keys=True)
        assert loader.steps_per_epoch == len(split) // 64
        keys += _epoch(loader)[0]
    assert len(keys) == len(set(keys)) == 2 * 32 * (len(split) // 64)
    assert set(keys) <= split


def test_a_global_batch_bigger_than_the_split_is_said(three_shards, caplog):
    n = load_index(three_shards)["splits"]["train"]["num_samples"]
    with caplog.at_level("WARNING", logger="pipeline.loader"):
        make_train_loader(_cfg(three_shards, batch_size=n), rank=0, world_size=2)
    assert f"has {n} samples, fewer than one global batch (2 ranks x batch_size {n})" in caplog.text
    assert f"at most {n // 2} avoids that" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.loader"):
        make_train_loader(_cfg(three_shards, batch_size=n // 2), rank=0, world_size=2)
    assert "fewer than one global batch" not in caplog.text


def test_fewer_shards_than_ranks_times_workers(three_shards):
    cfg = _cfg(three_shards, batch_size=16, num_workers=2)
    split = set(_tar_keys(three_shards, "train"))
    seen: set[str] = set()
    for r in range(4):  # 4 ranks x 2 workers = 8 readers for 3 shards
        loader = make_train_loader(cfg, rank=r, world_size=4, return_keys=True)
        keys = _epoch(loader)[0]
        assert len(keys) == loader.steps_per_epoch * 16
        seen |= set(keys)
    assert seen == split


def test_same_seed_same_batches_other_seed_or_epoch_differs(three_shards):
    cfg = _cfg(three_shards, augment={"mixup_alpha": 0.8, "label_smoothing": 0.1})
    a = make_train_loader(cfg, rank=1, world_size=2, seed=7)
    b = make_train_loader(cfg, rank=1, world_size=2, seed=7)
    c = make_train_loader(cfg, rank=1, world_size=2, seed=8)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    xc, _ = next(iter(c))
    assert ya.shape == (32, 10) and ya.dtype == torch.float32  # soft targets
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    b.set_epoch(1)
    assert not torch.equal(next(iter(b))[0], xa)


def test_loading_in_process_leaves_the_training_rng_alone(three_shards):
    loader = make_train_loader(_cfg(three_shards, num_workers=0, augment={"mixup_alpha": 0.5}))
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    next(iter(loader))
    assert torch.equal(torch.rand(3), want)


def test_plain_loop_without_set_epoch_moves_to_the_next_epoch(three_shards):
    loader = make_train_loader(_cfg(three_shards, num_workers=0), return_keys=True)
    first = _epoch(loader)[0]
    assert loader.epoch == 0
    second = _epoch(loader)[0]
    assert loader.epoch == 1 and len(second) == len(first) and second != first


@pytest.mark.parametrize("rank,steps", [(0, 5), (1, 4)])
def test_resume_yields_exactly_the_tail_of_the_uninterrupted_epoch(three_shards, rank, steps):
    cfg = _cfg(three_shards, augment={"rand_augment": True})
    full = make_train_loader(cfg, rank=rank, world_size=2, seed=3, return_keys=True)
    full.set_epoch(2)
    keys, images = _epoch(full)

    # The run that saved a checkpoint is rank 0 (DeepSpeed keeps rank 0's client state only).
    saving = make_train_loader(cfg, rank=0, world_size=2, seed=3, return_keys=True)
    saving.set_epoch(2)
    for i, _ in enumerate(saving, 1):
        if i == steps:
            break
    state = saving.state_dict()
    assert state["epoch"] == 2 and state["steps"] == steps and state["samples_consumed"] == steps * 32

    resumed = make_train_loader(cfg, rank=rank, world_size=2, seed=3, return_keys=True)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a training loop does right after loading: must not restart
    tail_keys, tail_images = _epoch(resumed)
    assert tail_keys == keys[steps * 32:]
    assert all(torch.equal(a, b) for a, b in zip(tail_images, images[steps:]))
    assert len(tail_images) == full.steps_per_epoch - steps
    resumed.set_epoch(3)
    assert len(_epoch(resumed)[0]) == full.samples_per_epoch
    if rank == 0:  # iterating the interrupted loader again continues its epoch (workers restarted)
        assert _epoch(saving)[0] == keys[steps * 32:]


def test_resume_with_another_world_size_restarts_the_epoch_by_sample_count(three_shards, caplog):
    cfg = _cfg(three_shards)
    saving = make_train_loader(cfg, rank=0, world_size=2)
    saving.set_epoch(1)
    for i, _ in enumerate(saving, 1):
        if i == 6:
            break
    resumed = make_train_loader(cfg, rank=0, world_size=4)
    resumed.load_state_dict(saving.state_dict())
    assert "world_size 2 -> 4" in caplog.text and f"at loader batch 3/{resumed.steps_per_epoch} of the epoch" in caplog.text
    assert resumed.epoch == 1
    assert sum(1 for _ in resumed) == resumed.steps_per_epoch - 3  # 6 x 64 samples = 3 x 128


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_walk_matches_tarfile_including_long_names(tmp_path, fmt):
    from pipeline.loader import _tar_files

    path = tmp_path / "t.tar"
    names = ["a.png", "a.cls", "d" * 60 + "/" + "k" * 80 + ".jpg", "b" * 120 + ".json", "é/ü.webp"]
    if fmt == tarfile.USTAR_FORMAT:
        names = names[:3]  # ustar holds long paths only by splitting them into prefix + name
    with tarfile.open(path, "w", format=fmt) as tf:
        for i, name in enumerate(names):
            data = bytes([i]) * (i * 700 + 3)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, __import__("io").BytesIO(data))
    with tarfile.open(path) as tf:
        want = [(m.name, tf.extractfile(m).read()) for m in tf]
    got = []
    with open(path, "rb") as f:
        for i, (name, size) in enumerate(_tar_files(f)):
            got.append((name, f.read(size) if i % 2 == 0 else b"skipped"))
    assert [n for n, _ in got] == names == [n for n, _ in want]
    assert all(g == w for (_, g), (_, w) in zip(got, want) if g != b"skipped")
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"X" + data[101:])  # damage the first header
    with open(path, "rb") as f, pytest.raises(tarfile.ReadError, match="checksum"):
        list(_tar_files(f))


def _corrupt(shards: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of the shard set with one image replaced by garbage and one shard cut in half."""
    out = tmp_path / "bad"
    shutil.copytree(shards, out)
    names = [s["name"] for s in load_index(out)["splits"]["train"]["shards"]]
    broken, cut = out / names[0], out / names[1]
    with tarfile.open(broken) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    bad_key = members[9][0].name.split(".", 1)[0]
    with tarfile.open(broken, "w") as tf:
        for m, data in members:
            if m.name.split(".", 1)[0] == bad_key and m.name.rsplit(".", 1)[1] not in ("cls", "json"):
                data = b"\x89PNG garbage, not an image"
                m.size = len(data)
            tf.addfile(m, __import__("io").BytesIO(data))
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    return out, bad_key, names[1]


def test_corrupt_image_and_truncated_shard_are_reported_and_steps_stay_equal(three_shards, tmp_path, caplog):
    bad, bad_key, cut_name = _corrupt(three_shards, tmp_path)
    cfg = _cfg(bad)
    stats, steps = [], []
    for r in range(2):
        loader = make_train_loader(cfg, rank=r, world_size=2, return_keys=True)
        keys, _ = _epoch(loader)
        assert bad_key not in keys
        steps.append(len(keys) // 32)
        stats.append(loader.stats)
    assert steps == [loader.steps_per_epoch] * 2
    failed = [f for s in stats for f in s["failed_samples"]]
    # The bad image (met again when the rank short of samples tops up from the whole split) and
    # at most the sample cut in half at the end of the truncated shard.
    assert {f["key"] for f in failed if f["shard"] != cut_name} == {bad_key}
    assert len([f for f in failed if f["shard"] == cut_name]) <= 1
    assert sum(s["decode_failures"] for s in stats) == len(failed)
    assert sum(s["filled"] for s in stats) == len(failed)  # each failed slot refilled with a repeat
    assert any(cut_name in s["truncated_shards"] for s in stats)
    assert bad_key in caplog.text and f"shard {cut_name} ends after" in caplog.text

    evals = [make_eval_loader(cfg, "train", rank=r, world_size=2) for r in range(2)]
    eval_keys = [k for e in evals for _, _, keys in e for k in keys]
    assert bad_key not in eval_keys
    assert len(eval_keys) < evals[0].num_samples - 1  # half of a shard is gone
    failed = [f for e in evals for f in e.stats["failed_samples"]]
    assert {f["key"] for f in failed if f["shard"] != cut_name} == {bad_key}
    assert "UnidentifiedImageError: cannot identify image file" in failed[0]["detail"]


def test_eval_sees_every_sample_once_in_index_order_with_equal_batch_counts(three_shards):
    split = _tar_keys(three_shards, "val")
    index = load_index(three_shards)
    cfg = _cfg(three_shards, eval_batch_size=21)
    keys, counts = [], []
    for r in range(4):
        loader = make_eval_loader(cfg, rank=r, world_size=4)
        assert loader.num_samples == len(split) == index["splits"]["val"]["num_samples"]
        batches = list(loader)
        counts.append(len(batches))
        for x, y, k in batches:
            assert x.shape == (len(k), 3, 32, 32) and y.shape == (len(k),)
            assert ((y >= 0) & (y < 10)).all()
            keys += k
    assert keys == split  # exactly once, ranks' contiguous ranges concatenated in index order
    assert len(set(counts)) == 1 and counts[0] == loader.num_batches


def test_eval_targets_are_the_cls_members_read_by_webdataset(three_shards):
    import webdataset as wds

    urls = [str(three_shards / s["name"]) for s in load_index(three_shards)["splits"]["val"]["shards"]]
    want = {s["__key__"]: int(s["cls"]) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    got = {}
    for _, y, keys in make_eval_loader(_cfg(three_shards, num_workers=0, eval_batch_size=50)):
        got.update(zip(keys, y.tolist()))
    assert got == want


def test_shards_behind_an_fsspec_url(three_shards):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in [three_shards / "index.json", *three_shards.glob("*.tar")]:
        fs.pipe(f"/loader-test/{path.name}", path.read_bytes())
    cfg = _cfg(Path("."), num_workers=0).model_copy(update={"shards": "memory://loader-test"})
    remote = _epoch(make_train_loader(cfg, return_keys=True))[0]
    local = _epoch(make_train_loader(_cfg(three_shards, num_workers=0), return_keys=True))[0]
    assert remote == local


def test_bad_configuration_is_a_user_error(three_shards):
    with pytest.raises(UserError, match="data.shards is empty"):
        make_train_loader(DataConfig())
    with pytest.raises(UserError, match="'nope'"):
        make_eval_loader(_cfg(three_shards), "nope")
    with pytest.raises(UserError, match="fewer than one global batch"):
        make_train_loader(_cfg(three_shards, batch_size=4096, epoch_fill="drop"))
    with pytest.raises(UserError, match="rank 2"):
        make_train_loader(_cfg(three_shards), rank=2, world_size=2)
    with pytest.raises(ConfigError, match=r"mean has 3 values but channels=1"):
        build_config(DataConfig, overrides={"channels": 1, "mean": [0.5, 0.5, 0.5]})
    # the defaults are one value each, so they fit either channel count
    assert build_config(DataConfig, overrides={"channels": 1}).channel_stats() == ((0.5,), (0.5,))
    assert build_config(DataConfig).channel_stats() == ((0.5,) * 3, (0.5,) * 3)
    cfg = build_config(DataConfig, overrides={"channels": 1, "mean": [0.5], "std": [0.25]})
    assert cfg.channel_stats() == ((0.5,), (0.25,))
    with pytest.raises(UserError, match="'epoch'"):
        make_train_loader(_cfg(three_shards)).load_state_dict({"step": 3})


def test_grayscale_loader(three_shards):
    cfg = _cfg(three_shards, channels=1, mean=[0.5], std=[0.5], num_workers=0)
    x, y = next(iter(make_train_loader(cfg)))
    assert x.shape == (32, 1, 32, 32)
    x, y, _ = next(iter(make_eval_loader(cfg)))
    assert x.shape[1:] == (1, 32, 32)


# ---------------------------------------------------------------------------------------------
# Image modes: what the model reads from 16-bit, float, alpha, palette, CMYK and rotated files


@pytest.fixture(scope="module")
def mode_shards(mode_dir, tmp_path_factory) -> dict[str, Path]:
    """The mode_dir images sharded as they are ("none") and re-encoded to PNG ("png")."""
    src, _ = mode_dir
    root = tmp_path_factory.mktemp("mode_shards")
    for encode in ("none", "png"):
        shard(ShardConfig(src=str(src), out=str(root / encode), val_ratio=0.0, encode=encode))
    return {encode: root / encode for encode in ("none", "png")}


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    """A [C, H, W] batch image normalised with mean 0, std 1 -> uint8 [H, W, C]."""
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _in_channels(case: ModeCase, want: np.ndarray, channels: int) -> ModeCase:
    if channels == 1:
        want = luma(want) if want.ndim == 3 else want
        return replace(case, expected=np.repeat(want[..., None], 3, -1) if case.name == "cmyk_icc" else want)
    return replace(case, expected=want if want.ndim == 3 else np.repeat(want[..., None], 3, -1))


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("encode", ["none", "png"])
def test_eval_loader_reads_every_mode_upright_and_scaled(mode_dir, mode_shards, encode, channels):
    """What evaluation (and `vitpipe evaluate`) feeds the model, pixel for pixel: a 16-bit
    gradient as the matching 8-bit one, transparency on white, CMYK through its profile, EXIF
    rotations upright; the same from pass-through and re-encoded shards, in RGB and in L."""
    _, cases = mode_dir
    by_key = {c.name: c for c in cases.values()}
    cfg = _cfg(mode_shards[encode], image_size=48, channels=channels, mean=[0.0], std=[1.0], eval_batch_size=8,
               num_workers=1)
    loader = make_eval_loader(cfg, "train")
    seen = set()
    for x, _, keys in loader:
        for img, key in zip(x, keys):
            case = by_key[key]
            got = _as_uint8(img)
            if channels == 1:
                got = np.repeat(got, 3, -1) if key == "cmyk_icc" else got[..., 0]
            # eval: the shorter side is 48 already, then the centre 48 x 48 of the 64-wide image
            assert_pixels(got, _in_channels(case, case.expected[:, 8:56], channels),
                          what=f" (encode {encode}, channels {channels})")
            seen.add(key)
    assert seen == {c.name for c in cases.values() if not c.refused}
    assert loader.stats["decode_failures"] == 0


def test_train_loader_reads_every_mode_upright_and_scaled(mode_dir, mode_shards):
    """Training crops of the whole image (scale 1, no flip) match the expected pixels resized."""
    _, cases = mode_dir
    by_key = {c.name: c for c in cases.values()}
    cfg = _cfg(mode_shards["none"], image_size=32, batch_size=4, num_workers=1, mean=[0.0], std=[1.0],
               augment=AugmentConfig(crop_scale=(1.0, 1.0), hflip=0.0))
    loader = make_train_loader(cfg, return_keys=True)
    seen = set()
    for x, _, keys in loader:
        for img, key in zip(x, keys):
            case = by_key[key]
            want = np.asarray(Image.fromarray(case.expected).resize((32, 32), Image.Resampling.BILINEAR))
            got = _as_uint8(img)
            assert_pixels(got, _in_channels(case, want, 3), lossy=True)
            if key == "gray16_png":
                assert (got == 255).mean() < 0.05  # a gradient, not the clipped 255s of old
            seen.add(key)
    assert seen == {c.name for c in cases.values() if not c.refused}
    assert loader.stats["decode_failures"] == 0


def test_a_foreign_shard_with_an_unconvertible_image_skips_it_with_the_reason(mode_dir, mode_shards, tmp_path):
    """A shard set written elsewhere may hold what the shard stage refuses (a float image
    outside [0, 1]): the loaders skip it and say why, the rest trains."""
    out = tmp_path / "foreign"
    shutil.copytree(mode_shards["none"], out)
    wide = mode_dir[1]["float_wide.tiff"].data
    name = load_index(out)["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(out / name) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(out / name, "w") as tf:
        for m, data in members:
            if m.name.split(".")[0] == "float" and not m.name.endswith((".cls", ".json")):  # its image member
                data = wide
                m.size = len(data)
            tf.addfile(m, __import__("io").BytesIO(data))
    loader = make_eval_loader(_cfg(out, num_workers=0), "train")
    keys = [k for _, _, batch in loader for k in batch]
    assert "float" not in keys and len(keys) == loader.num_samples - 1
    (failed,) = loader.stats["failed_samples"]
    assert failed["key"] == "float" and "unsupported_mode: float pixels range 0..1000" in failed["detail"]


def _gloo_rank(rank: int, world_size: int, shards: str, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    import torch.multiprocessing as mp

    # Ranks started by torchrun/deepspeed are fresh processes whose DataLoader workers fork; a
    # spawned child would otherwise spawn its workers too (re-importing torch, ~10 s each here).
    mp.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    loader = make_train_loader(_cfg(Path(shards), batch_size=48), rank=rank, world_size=world_size)
    steps = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        n = 0
        for x, _ in loader:
            total = torch.tensor([float(len(x))])
            dist.all_reduce(total)  # would hang if the other rank ran out of batches first
            n += 1
        steps.append(n)
    torch.save({"steps": steps, "steps_per_epoch": loader.steps_per_epoch}, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_two_gloo_processes_run_equal_steps_without_hanging(three_shards, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_gloo_rank, args=(2, str(three_shards), port, str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    while not ctx.join(timeout=240):
        pass
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["steps"] == [results[0]["steps_per_epoch"]] * 2
