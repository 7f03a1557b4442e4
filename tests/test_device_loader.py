"""The device input path (pipeline/device_loader.py, data.decode gpu) on real JPEG/PNG shards.

No GPU here: the device is the CPU, which runs the very code a GPU runs (torchvision's decode_jpeg
and roi_align take the device as an argument; only nvJPEG itself is left out). The workers are real
DataLoader processes. On CUDA, `bash bench/gpu_pretrain.sh` checks and measures the same path.
"""

from __future__ import annotations

import json
import math
import shutil
import tarfile
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.device_loader import (DeviceEvalLoader, DeviceTrainLoader, draw_crop_uniforms, random_resized_crop_boxes,
                                    resolve_decode)
from pipeline.index import load_index
from pipeline.loader import DataConfig, TrainLoader, _seed, make_eval_loader, make_train_loader
from pipeline.packaged_data import SHAPE_CLASSES, write_shapes
from pipeline.shard import ShardConfig, shard
from vitpipe.config import ConfigError, build_config
from vitpipe.errors import UserError


def _shard(src: Path, out: Path, per_shard: int = 20, val_ratio: float = 0.2) -> Path:
    shard(ShardConfig(src=str(src), out=str(out), val_ratio=val_ratio, max_samples_per_shard=per_shard))
    return out


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> Path:
    """60 colour JPEGs of 64-96 px in 4 classes: train in 3 shards."""
    root = tmp_path_factory.mktemp("photos")
    write_shapes(root / "src", per_class=15, classes=SHAPE_CLASSES[:4], size=80, jitter=0.2, color=True, fmt="jpg")
    return _shard(root / "src", root / "shards")


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """Two classes of PNGs and two of JPEGs in the same shards."""
    root = tmp_path_factory.mktemp("mixed")
    write_shapes(root / "src", per_class=8, classes=SHAPE_CLASSES[:2], size=72, jitter=0.2, color=True, fmt="png")
    write_shapes(root / "src", per_class=8, classes=SHAPE_CLASSES[2:4], size=72, jitter=0.2, color=True, fmt="jpg",
                 seed=1)
    return _shard(root / "src", root / "shards", per_shard=10, val_ratio=0.0)


RAMP_SIZES = [(64, 96), (90, 60), (72, 72), (80, 100)]  # (h, w)


@pytest.fixture(scope="module")
def ramp_shards(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, int]]]:
    """JPEGs whose red channel is the x coordinate and green the y coordinate (blue: 128), so a
    crop's pixels say which box it came from."""
    root = tmp_path_factory.mktemp("ramps")
    sizes = {}
    for i in range(16):
        h, w = RAMP_SIZES[i % len(RAMP_SIZES)]
        x, y = np.meshgrid(np.arange(w) * 255 / (w - 1), np.arange(h) * 255 / (h - 1))
        rgb = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
        folder = root / "src" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i:03d}.jpg", quality=98, subsampling=0)
        sizes[f"{'ab'[i % 2]}/{i:03d}"] = (h, w)
    return _shard(root / "src", root / "shards", per_shard=6, val_ratio=0.0), sizes


def _cfg(shards: Path, **kw) -> DataConfig:
    kw = {"image_size": 24, "batch_size": 8, "num_workers": 2, "shuffle_buffer": 16, "decode": "gpu", **kw}
    return DataConfig(shards=str(shards), **kw)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    return [(x, y, k) for x, y, k in loader]


def test_decode_choice_follows_the_device_and_what_torchvision_can_do(photo_shards):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_decode("cpu", cuda) == "cpu"
    assert resolve_decode("auto", cpu) == "cpu"  # the CPU path stays the default without a GPU
    assert resolve_decode("gpu", cpu) == "gpu"   # the device path, run by the training process
    # No GPU on this machine: torchvision really cannot decode on CUDA here, so auto falls back...
    assert resolve_decode("auto", cuda) == "cpu"
    # ... and an explicit gpu says why, and what to do.
    with pytest.raises(UserError, match="data.decode=gpu: torchvision cannot decode JPEGs on cuda.*data.decode cpu"):
        resolve_decode("gpu", cuda)
    assert type(make_train_loader(_cfg(photo_shards, decode="auto"), device="cpu")) is TrainLoader
    assert type(make_train_loader(_cfg(photo_shards), device="cpu")) is DeviceTrainLoader
    assert type(make_train_loader(_cfg(photo_shards))) is TrainLoader  # no device named: the CPU loader
    assert type(make_eval_loader(_cfg(photo_shards), device="cpu")) is DeviceEvalLoader
    with pytest.raises(ConfigError, match="decode"):
        build_config(DataConfig, None, {"shards": str(photo_shards), "decode": "nvjpeg"})


def test_batches_have_the_shape_dtype_and_normalisation(ramp_shards):
    shards, _ = ramp_shards
    mean, std = (0.2, 0.4, 0.5), (0.3, 0.25, 0.2)
    cfg = _cfg(shards, mean=mean, std=std)
    for dtype in (None, torch.bfloat16):
        loader = make_train_loader(cfg, device="cpu", dtype=dtype)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch == 2
        for x, y in batches:
            assert x.shape == (8, 3, 24, 24) and x.dtype == (dtype or torch.float32) and x.device.type == "cpu"
            assert y.dtype == torch.long and set(y.tolist()) <= {0, 1}
            # the blue channel is 128 everywhere: (128 / 255 - mean) / std after normalisation
            blue = x[:, 2].float()
            assert torch.allclose(blue, torch.full_like(blue, (128 / 255 - 0.5) / 0.2), atol=0.04)
            lo = torch.tensor([(0 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
            hi = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
            assert (x.float() >= lo - 0.05).all() and (x.float() <= hi + 0.05).all()


def test_crops_are_the_boxes_and_flips_the_seeded_generator_draws(ramp_shards):
    shards, sizes = ramp_shards
    size, seed = 16, 7
    cfg = _cfg(shards, image_size=size, mean=(0.0,), std=(1.0,),
               augment={"crop_scale": [0.3, 1.0], "crop_ratio": [0.6, 1.6], "hflip": 0.5})
    loader = make_train_loader(cfg, device="cpu", seed=seed, return_keys=True)
    flips = []
    for step, (x, _, keys) in enumerate(loader):
        worker, batch = step % 2, step // 2  # 2 workers, asked in turn
        g = torch.Generator().manual_seed(_seed(seed, 0, 0, worker, batch))
        trials, flip_u, _ = draw_crop_uniforms(len(keys), g)
        hw = torch.tensor([sizes[k] for k in keys])
        boxes = random_resized_crop_boxes(hw, trials, (0.3, 1.0), (0.6, 1.6))
        for i, ((h, w), (x1, y1, x2, y2), flip) in enumerate(zip(hw.tolist(), boxes.tolist(), (flip_u < 0.5).tolist())):
            area, aspect = (x2 - x1) * (y2 - y1) / (h * w), (x2 - x1) / (y2 - y1)
            assert 0.3 - 0.05 <= area <= 1.0 and 0.6 - 0.05 <= aspect <= 1.6 + 0.05
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            # where each output column and row samples the source (roi_align, pixel centres)
            cols = x1 + (torch.arange(size) + 0.5) * (x2 - x1) / size - 0.5
            rows = y1 + (torch.arange(size) + 0.5) * (y2 - y1) / size - 0.5
            red, green = x[i, 0].mean(0) * 255, x[i, 1].mean(1) * 255
            if flip:
                red = red.flip(0)
            assert torch.allclose(red, cols * 255 / (w - 1), atol=3.0), (keys[i], red, cols * 255 / (w - 1))
            assert torch.allclose(green, rows * 255 / (h - 1), atol=3.0)
            flips.append(flip)
    assert 0 < sum(flips) < len(flips)


def test_same_seed_same_batches_and_a_mid_epoch_resume_continues_exactly(photo_shards):
    cfg = _cfg(photo_shards, augment={"mixup_alpha": 0.8, "label_smoothing": 0.1})
    first = make_train_loader(cfg, device="cpu", seed=3, return_keys=True)
    steps = first.steps_per_epoch
    assert steps >= 4
    run, state = [], None
    for epoch in range(2):
        first.set_epoch(epoch)
        for x, y, k in first:
            run.append((x, y, k))
            if epoch == 1 and len(run) == steps + 3:
                state = first.state_dict()
    assert state["epoch"] == 1 and state["steps"] == 3
    again = make_train_loader(cfg, device="cpu", seed=3, return_keys=True)
    again.set_epoch(0)
    for (x, y, k), (x0, y0, k0) in zip(again, run):
        assert k == k0 and torch.equal(x, x0) and torch.equal(y, y0)
    assert y0.shape == (8, 4) and torch.allclose(y0.sum(1), torch.ones(8))  # mixed, smoothed soft targets
    other = next(iter(make_train_loader(cfg, device="cpu", seed=4, return_keys=True)))
    assert not torch.equal(other[0], run[0][0])

    resumed = make_train_loader(cfg, device="cpu", seed=3, return_keys=True)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    resumed.set_epoch(1)
    tail = list(resumed)
    assert len(tail) == steps - 3
    for (x, y, k), (x0, y0, k0) in zip(tail, run[steps + 3:]):
        assert k == k0 and torch.equal(x, x0) and torch.equal(y, y0)


def test_two_ranks_run_equal_steps_and_cover_the_split(photo_shards):
    cfg = _cfg(photo_shards)
    n = load_index(photo_shards)["splits"]["train"]["num_samples"]
    loaders = [make_train_loader(cfg, rank=r, world_size=2, device="cpu", return_keys=True) for r in range(2)]
    seen: Counter = Counter()
    steps = []
    for loader in loaders:
        batches = _epoch(loader)
        steps.append(len(batches))
        for x, _, keys in batches:
            assert x.shape == (8, 3, 24, 24)
            seen.update(keys)
    assert steps == [loaders[0].steps_per_epoch] * 2 == [-(-n // 16)] * 2
    assert len(seen) == n and sum(seen.values()) == 2 * 8 * steps[0]


def test_png_members_are_decoded_on_the_cpu_and_train_with_the_jpegs(mixed_shards):
    loader = make_train_loader(_cfg(mixed_shards, batch_size=4), device="cpu", return_keys=True)
    keys = [k for _, _, ks in _epoch(loader) for k in ks]
    pngs = [k for k in keys if k.split("/")[0] in SHAPE_CLASSES[:2]]
    assert pngs and len(pngs) < len(keys)
    stats = loader.stats
    assert stats["decode_failures"] == 0 and stats["decoded_on_cpu"] == len(pngs)


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_eval_pixels_agree_with_the_cpu_loader(mixed_shards, crop_pct):
    # 48 px from 58-86 px sources: the CPU loader decodes at full scale here (no draft()), so what
    # differs is the decoder of the JPEGs (the same libjpeg on this CPU) and the resampling filter.
    cfg = _cfg(mixed_shards, image_size=48, eval_crop_pct=crop_pct, eval_batch_size=5, mean=(0.0,), std=(1.0,))
    cpu = {k: x for xs, _, ks in make_eval_loader(cfg, "train") for x, k in zip(xs, ks)}
    dev = {k: x for xs, _, ks in make_eval_loader(cfg, "train", device="cpu") for x, k in zip(xs, ks)}
    assert cpu.keys() == dev.keys() and len(cpu) == 32
    for key in cpu:
        diff = (cpu[key] - dev[key]).abs() * 255
        assert diff.mean() < 1.5 and diff.max() < 30, (key, diff.mean(), diff.max())  # 0.6-1.0 and ~16 here; half a pixel off: 3.5-6 and ~100


def _bogus_huffman(jpeg: bytes) -> bytes:
    """The JPEG with its first Huffman table's code counts overwritten: every marker and length is
    intact (the header check passes), but no decoder can build the table."""
    at = jpeg.index(b"\xff\xc4")  # DHT: marker, length (2), class/id (1), 16 code counts
    return jpeg[:at + 5] + b"\xfe" * 16 + jpeg[at + 21:]


def _break_members(shards: Path, out: Path) -> tuple[Path, str, str]:
    """A copy of the shard set with one JPEG's Huffman table broken (only a decoder finds out) and
    one image replaced by garbage."""
    shutil.copytree(shards, out)
    first = out / load_index(out)["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(first) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    images = [m.name for m, _ in members if m.name.endswith(".jpg")]
    huffman_key, garbage_key = images[2].rsplit(".", 1)[0], images[5].rsplit(".", 1)[0]
    with tarfile.open(first, "w") as tf:
        for m, data in members:
            if m.name == f"{huffman_key}.jpg":
                data = _bogus_huffman(data)
            elif m.name == f"{garbage_key}.jpg":
                data = b"\xff\xd8\xff garbage, not a JPEG"
                m.size = len(data)
            tf.addfile(m, BytesIO(data))
    return out, huffman_key, garbage_key


def test_undecodable_samples_are_skipped_reported_and_refilled(photo_shards, tmp_path):
    bad, huffman_key, garbage_key = _break_members(photo_shards, tmp_path / "bad")
    cfg = _cfg(bad)
    stats, steps = [], []
    for r in range(2):
        loader = make_train_loader(cfg, rank=r, world_size=2, device="cpu", return_keys=True)
        batches = _epoch(loader)
        keys = [k for _, _, ks in batches for k in ks]
        assert huffman_key not in keys and garbage_key not in keys
        assert all(x.shape == (8, 3, 24, 24) for x, _, _ in batches)
        steps.append(len(batches))
        stats.append(loader.stats)
    assert steps == [loader.steps_per_epoch] * 2
    failed = {f["key"]: f["detail"] for s in stats for f in s["failed_samples"]}
    assert failed.keys() == {huffman_key, garbage_key}
    assert "broken data stream" in failed[huffman_key]  # neither torchvision nor then Pillow decodes it
    assert failed[garbage_key].startswith("BadImage: not_an_image")  # refused by the worker's header check
    # each failure refilled; a sample can come twice (the last batch of a rank repeats a few)
    assert sum(s["filled"] for s in stats) == sum(s["decode_failures"] for s in stats) >= 2
    evals = make_eval_loader(cfg, "train", device="cpu")
    keys = [k for _, _, ks in evals for k in ks]
    assert len(keys) == evals.num_samples - 2 and {f["key"] for f in evals.stats["failed_samples"]} == failed.keys()


@pytest.mark.slow
def test_pretrain_with_device_decoding_trains_end_to_end_and_logs_data_wait(photo_shards, tmp_path, mlflow_uri):
    """`vitpipe pretrain --data.decode gpu`, as a user runs it; the CPU stands in for the GPU."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vitpipe.cli", "pretrain", "--model.preset", "micro/4",
           "--data.shards", str(photo_shards), "--data.image-size", "16", "--data.batch-size", "8",
           "--data.num-workers", "1", "--data.decode", "gpu", "--train.steps", "8", "--train.log-every", "2",
           "--train.eval-every", "4", "--schedule.warmup-steps", "2", "--optim.lr", "3e-3",
           "--tracking.uri", mlflow_uri, "--no-tracking.system-metrics", "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 8 and math.isfinite(results["final_loss"]) and results["val/samples"] > 0
    assert 0.0 <= results["data_wait_frac"] <= 1.0
    client = MlflowClient(mlflow_uri)
    run = client.get_run(results["run_id"])
    assert run.data.params["data.decode"] == "gpu"
    waits = client.get_metric_history(results["run_id"], "train/data_wait_frac")
    assert [m.step for m in waits] == [2, 4, 6, 8] and all(0.0 <= m.value <= 1.0 for m in waits)
    assert len(client.get_metric_history(results["run_id"], "train/images_per_s")) == 4


def test_decoding_ahead_in_a_thread_changes_nothing_and_stops_cleanly(photo_shards, tmp_path):
    """decode_ahead (the default, 2) decodes in a background thread: the same batches as decoding when
    asked (0), a loop that stops mid-epoch leaves no thread behind, and its errors reach the caller."""
    import threading

    from pipeline.device_loader import DeviceTrainLoader

    cfg = _cfg(photo_shards, augment={"cutmix_alpha": 1.0, "rand_augment": True})
    index = load_index(photo_shards)
    kw = {"rank": 0, "world_size": 1, "seed": 5, "return_keys": True, "device": "cpu"}
    inline = _epoch(DeviceTrainLoader(cfg, index, decode_ahead=0, **kw))
    ahead = DeviceTrainLoader(cfg, index, decode_ahead=2, **kw)
    for (x, y, k), (x0, y0, k0) in zip(_epoch(ahead), inline, strict=True):
        assert k == k0 and torch.equal(x, x0) and torch.equal(y, y0)
    stopped = DeviceTrainLoader(cfg, index, decode_ahead=2, **kw)
    batches = iter(stopped)
    next(batches)
    batches.close()  # what a training loop that reached train.steps mid-epoch does, eventually
    assert not [t for t in threading.enumerate() if t.name == "vitpipe-decode-ahead"]
    rest = _epoch(stopped)  # the epoch goes on from batch 1, none lost to the batches decoded ahead
    assert [k for _, _, k in rest] == [k for _, _, k in inline[1:]]
    assert torch.equal(rest[-1][0], inline[-1][0])

    # every JPEG of the split undecodable: the thread's UserError is the caller's
    bad = tmp_path / "bad"
    shutil.copytree(photo_shards, bad)
    for s in load_index(bad)["splits"]["train"]["shards"]:
        path = bad / s["name"]
        with tarfile.open(path) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
        with tarfile.open(path, "w") as tf:
            for m, data in members:
                if m.name.endswith(".jpg"):
                    data = _bogus_huffman(data)
                tf.addfile(m, BytesIO(data))
    with pytest.raises(UserError, match="no sample of the shards in .* decodes"):
        next(iter(make_train_loader(_cfg(bad), device="cpu")))


def test_cmyk_and_exif_rotated_jpegs_take_the_cpu_decoders_upright_pixels(tmp_path):
    """JPEGs that the image-mode policy changes (docs/formats.md) are decoded by Pillow, as on the CPU
    path: a rotated photo is upright on both, not sideways on the device."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = src / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        rgb = np.zeros((60, 90, 3), np.uint8)
        rgb[:, :30] = rng.integers(0, 256, 3)  # a coloured band on the left: orientation shows
        img = Image.fromarray(rgb)
        if i % 3 == 0:
            exif = Image.Exif()
            exif[0x0112] = 6  # stored sideways: to be turned 90 degrees
            img.save(folder / f"{i}.jpg", quality=95, exif=exif)
        elif i % 3 == 1:
            img.convert("CMYK").save(folder / f"{i}.jpg", quality=95)
        else:
            img.save(folder / f"{i}.jpg", quality=95)
    shards = _shard(src, tmp_path / "shards", val_ratio=0.0)
    cfg = _cfg(shards, image_size=40, eval_batch_size=3, mean=(0.0,), std=(1.0,))
    cpu = {k: x for xs, _, ks in make_eval_loader(cfg, "train") for x, k in zip(xs, ks)}
    loader = make_eval_loader(cfg, "train", device="cpu")
    dev = {k: x for xs, _, ks in loader for x, k in zip(xs, ks)}
    assert cpu.keys() == dev.keys() and len(dev) == 6
    for key in cpu:
        assert ((cpu[key] - dev[key]).abs() * 255).mean() < 2.0, key
    assert loader.stats["decoded_on_cpu"] == 4  # the rotated and the CMYK ones; the plain two on the "device"


def _workers(loader) -> list:
    return list(loader._loader._iterator._workers)  # torch's DataLoader keeps them there (private)


@pytest.mark.parametrize("kind", ["cpu train", "device train", "device eval"])
def test_a_dropped_or_closed_loader_stops_its_workers_instead_of_killing_them(photo_shards, kind):
    """torch SIGTERMs, after 5 s each, the workers of a DataLoader that the garbage collector frees
    (it closes their queues first), which it is whenever its loader sits in a reference cycle: the
    workers of a loader dropped in one exit by themselves (code 0). close() stops them the same way,
    and the next epoch starts new ones where the loader stood."""
    import gc
    import weakref

    index = load_index(photo_shards)
    train_kw = {"rank": 0, "world_size": 1, "seed": 3, "return_keys": True}
    cfg = _cfg(photo_shards, decode="cpu" if kind == "cpu train" else "gpu")
    make = {"cpu train": lambda: TrainLoader(cfg, index, **train_kw),
            "device train": lambda: DeviceTrainLoader(cfg, index, device="cpu", **train_kw),
            "device eval": lambda: DeviceEvalLoader(cfg, index, "val", rank=0, world_size=1, device="cpu")}[kind]
    dropped = make()
    dropped.cycle = dropped
    _epoch(dropped)
    workers, freed = _workers(dropped), weakref.ref(dropped)
    del dropped
    gc.collect()
    assert freed() is None
    assert [w.exitcode for w in workers] == [0] * len(workers) != []

    closed, kept = make(), make()
    first = _epoch(closed)
    workers = _workers(closed)
    closed.close()
    assert [w.exitcode for w in workers] == [0] * len(workers)
    assert closed._loader._iterator is None
    for a, b in zip(first + _epoch(closed), _epoch(kept) + _epoch(kept), strict=True):
        assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with closed:
        pass
    assert closed._loader._iterator is None
