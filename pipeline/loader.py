"""Batches from a shard set for training and evaluation: exact epochs, no hangs, mid-epoch resume.

Call `make_train_loader(cfg, rank=..., world_size=..., seed=...)` once per training process; per
epoch call `loader.set_epoch(e)` and iterate it. Save `loader.state_dict()` in checkpoints (it is
the same on every rank, so rank 0's copy is enough) and pass it to `load_state_dict` on resume.
Call `make_eval_loader(cfg, split)` for evaluation. Both keep their worker processes across epochs;
`loader.close()` (or `with make_train_loader(...) as loader:`) stops them, else freeing the loader does.

How a training epoch is laid out, and why every rank runs the same number of steps:

1. From (seed, epoch) alone, so that all ranks agree without talking, the split's shards are put
   in a random order and a random rotation is drawn. The shards concatenated in that order and
   rotated give the epoch's sample sequence: position p is sample (rotation + p) mod N.
2. The epoch has T = steps_per_epoch x world_size x batch_size positions, fixed by the index's
   counts before any tar is opened. `epoch_fill="repeat"`: T >= N, and the T - N positions past
   the end wrap around, repeating the first samples of this epoch's sequence. "drop": T <= N, and
   the last N - T samples of this epoch's sequence are left out (different ones every epoch).
3. Rank r takes positions [r T/W, (r+1) T/W). The DataLoader asks its K workers for batches in
   turn (0, 1, ..., K-1, 0, ...), so worker k takes a contiguous slice holding exactly as many
   batches as it will be asked for. It reads that slice from the tars (seeking past the samples
   before it, so several workers can share one shard), shuffles it through a buffer, then
   decodes, augments and batches it.
4. Every batch slot consumes exactly one sample of the worker's stream: a sample that fails to
   decode is skipped (warned, counted) and its slot is refilled with a new augmentation of
   another sample of the same batch; a truncated shard ends the slice early, and the stream goes
   on with a reshuffled pass over the whole split. So after `s` steps every worker has consumed
   a number of samples that follows from `s` alone, and the resume state is just (epoch, steps):
   a resumed worker replays its shuffled slice without decoding up to that point, and the
   resumed epoch yields exactly the batches the uninterrupted one would have.
5. Augmentation randomness is seeded per batch from (seed, epoch, rank, worker, batch), so the
   batches are a function of seed, world size and worker count only.

With `data.decode: gpu` (or auto on CUDA; the default is cpu) the same streams run with their decoding replaced: the
workers only read, and the training device decodes and augments whole batches
(pipeline/device_loader.py). Steps 1-5 hold unchanged.
"""

from __future__ import annotations

import logging
import math
import re
import tarfile
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

import fsspec
import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.index import load_index, shard_urls
from pipeline.tar_reader import split_key as _split_key
from pipeline.tar_reader import tar_files as _tar_files
from pipeline.transforms import (AugmentConfig, BatchMixer, batch_buffer, decode_image, eval_transform,
                                 normalize_batch, train_min_side, train_transform)
from vitpipe.config import StageConfig
from vitpipe.errors import UserError

__all__ = ["AugmentConfig", "DataConfig", "TrainLoader", "EvalLoader", "make_train_loader", "make_eval_loader"]

log = logging.getLogger(__name__)

# Per loader, this many bad samples are warned one by one; after that only the epoch summaries.
_MAX_WARNINGS = 20
_MAX_LISTED = 100


class DataConfig(StageConfig):
    """Where the shards are and how they become batches (training and evaluation)."""

    shards: str = Field("", description="directory or URL (any fsspec URL, e.g. s3://bucket/shards) holding "
                        "index.json, as written by 'vitpipe shard'")
    train_split: str = Field("train", description="split of the index used for training")
    val_split: str = Field("val", description="split of the index used for evaluation")
    image_size: int = Field(32, gt=0, description="side of the square images fed to the model (224 for "
                            "ImageNet-sized photos, 32 for digits)")
    channels: Literal[1, 3] = Field(3, description="images are converted to 8-bit RGB (3) or grayscale L (1), "
                                    "any source mode as docs/formats.md 'Image modes' says; must match the "
                                    "model's input channels")
    mean: tuple[float, ...] = Field((0.5,), description="per-channel mean subtracted after scaling "
                                    "to [0, 1] (ImageNet: 0.485 0.456 0.406); one value or one per channel")
    std: tuple[float, ...] = Field((0.5,), description="per-channel std divided by after the mean "
                                   "(ImageNet: 0.229 0.224 0.225); one value or one per channel")
    batch_size: int = Field(64, gt=0, description="training samples per step on each rank (the global batch "
                            "is batch_size x world size x gradient accumulation)")
    eval_batch_size: int = Field(256, gt=0, description="samples per evaluation batch on each rank")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank, about one per free "
                             "CPU core; 0 decodes in the training process (debugging)")
    shuffle_buffer: int = Field(1000, ge=0, description="samples each worker shuffles among (on top of the "
                                "per-epoch shard order); more mixes better and holds more encoded images in "
                                "memory; 0 keeps the order within shards")
    epoch_fill: Literal["repeat", "drop"] = Field(
        "repeat", description="when the split is not a multiple of world size x batch_size: 'repeat' a few "
        "samples so every sample is seen each epoch, or 'drop' the remainder (different samples each epoch)")
    eval_crop_pct: float = Field(1.0, gt=0.0, le=1.0, description="evaluation resizes the shorter side to "
                                 "image_size / eval_crop_pct, then center-crops (timm uses 0.875-0.9 at 224 px)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="training augmentation")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "cpu", description="where images are decoded and augmented: 'cpu' in the DataLoader workers (Pillow); "
        "'gpu' on the training device, whole batches at once (nvJPEG; pipeline/device_loader.py), the workers "
        "only read; 'auto' = gpu when training on CUDA with a torchvision that decodes there, else cpu. The "
        "default stays cpu until the GPU path has been measured on a GPU (docs/benchmarks.md)")

    @model_validator(mode="after")
    def _check_channel_stats(self) -> "DataConfig":
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                example = "[0.5]" if self.channels == 1 else "[0.5, 0.5, 0.5]"
                raise ValueError(f"{name} has {len(values)} values but channels={self.channels}; give one "
                                 f"value or one per channel, e.g. {name}: {example}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std {self.std}: every value must be > 0, e.g. [0.5, 0.5, 0.5]")
        return self

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) with one value per channel (a single value is repeated)."""
        return (tuple(self.mean) * (self.channels // len(self.mean)),
                tuple(self.std) * (self.channels // len(self.std)))


# ---------------------------------------------------------------------------------------------
# Reading samples out of tars


@dataclass(frozen=True)
class _Shard:
    url: str
    name: str
    num_samples: int


@dataclass
class _RawSample:
    key: str
    shard: str
    image: bytes | None      # None: the sample had no image member
    cls: bytes | None        # the .cls member, parsed at decode time so a bad one is a decode failure


def _open_shard(url: str):
    if "://" not in url or url.startswith("file://"):
        return open(url.removeprefix("file://"), "rb", buffering=1 << 17)
    return fsspec.open(url, "rb").open()


def _read_runs(shard: _Shard, runs: list[tuple[int, int]], events: list[dict]) -> Iterator[tuple[int, _RawSample]]:
    """Yield (index in shard, sample) for the samples in the sorted half-open `runs`.

    Members of other samples are skipped by seeking, not read. A shard that cannot be opened,
    breaks, or ends before the last wanted sample is reported in `events`; the stream goes on.
    """
    if not runs:
        return
    last = runs[-1][1]
    index, key, parts, wanted, run = -1, None, {}, False, 0
    try:
        with _open_shard(shard.url) as f:
            for name, size in _tar_files(f):
                member_key, ext = _split_key(name)
                if member_key != key:
                    if wanted:
                        yield index, _RawSample(key, shard.name, parts.get("image"), parts.get("cls"))
                    index, key, parts = index + 1, member_key, {}
                    if index >= last:
                        if index == shard.num_samples:  # a sample past the index's count: the index is wrong
                            events.append({"kind": "miscounted", "shard": shard.name,
                                           "detail": f"holds more than the {shard.num_samples} samples its "
                                                     f"index.json entry lists (the rest are never read)"})
                        return
                    while index >= runs[run][1]:
                        run += 1
                    wanted = index >= runs[run][0]
                if wanted and ext != "json":
                    data = f.read(size)
                    if len(data) < size:
                        raise tarfile.ReadError(f"{name} cut short ({len(data)} of {size} bytes)")
                    parts["cls" if ext == "cls" else "image"] = data
        if wanted:
            yield index, _RawSample(key, shard.name, parts.get("image"), parts.get("cls"))
        if index + 1 < last:
            events.append({"kind": "truncated", "shard": shard.name,
                           "detail": f"ends after {index + 1} of {shard.num_samples} samples"})
    except (OSError, EOFError, ValueError, tarfile.TarError) as e:
        events.append({"kind": "truncated", "shard": shard.name,
                       "detail": f"ends after {max(index, 0)} of {shard.num_samples} samples ({e})"})


def _segments(sizes: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """Positions [start, stop) of the circular concatenation of shards with `sizes` ->
    runs (shard number, begin, end) inside single shards, in order."""
    total = sum(sizes)
    bounds = np.cumsum([0, *sizes])
    out = []
    p = start
    while p < stop:
        s = p % total
        i = int(np.searchsorted(bounds, s, side="right")) - 1  # skips empty shards
        begin = s - int(bounds[i])
        n = min(sizes[i] - begin, stop - p)
        out.append((i, begin, begin + n))
        p += n
    return out


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A shuffle buffer: each incoming item swaps with a random one of the `size` held."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def _decode_label(raw: _RawSample, labelled: bool) -> int:
    if raw.cls is None:
        if labelled:
            raise ValueError("no .cls member in a labelled shard set")
        return -1
    return int(raw.cls)


def _failure(raw: _RawSample, e: Exception) -> dict:
    # PIL names the BytesIO it was handed ("cannot identify image file <_io.BytesIO ...>"): noise
    detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))
    return {"kind": "decode", "shard": raw.shard, "key": raw.key, "detail": f"{type(e).__name__}: {detail}"}


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _drain(events: list[dict]) -> list[dict]:
    out = list(events)
    events.clear()
    return out


# ---------------------------------------------------------------------------------------------
# The training stream (runs in the DataLoader workers)


def _worker_batches(steps: int, workers: int, k: int) -> int:
    """How many of `steps` batches, handed out round-robin, worker k produces."""
    return max(0, (steps - k + workers - 1) // workers)


class _TrainStream(IterableDataset):
    """One rank's batches for the epoch and step in `control`; see the module docstring."""

    def __init__(self, *, shards: list[_Shard], cfg: DataConfig, steps: int, rank: int, world_size: int,
                 seed: int, labelled: bool, num_classes: int, return_keys: bool, control: torch.Tensor):
        self.shards, self.cfg, self.steps, self.rank, self.world_size = shards, cfg, steps, rank, world_size
        self.seed, self.labelled, self.return_keys, self.control = seed, labelled, return_keys, control
        self.num_samples = sum(s.num_samples for s in shards)
        self.workers = max(1, cfg.num_workers)
        self.transform = train_transform(cfg.augment, cfg.image_size)
        self.mixer = BatchMixer(cfg.augment, num_classes)
        self.min_side = train_min_side(cfg.augment, cfg.image_size)
        self.mode = "RGB" if cfg.channels == 3 else "L"
        self.mean, self.std = cfg.channel_stats()

    def epoch_order(self, epoch: int) -> tuple[list[_Shard], int]:
        """This epoch's shard order and rotation; a function of (seed, epoch) only."""
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        order = rng.permutation(len(self.shards))
        return [self.shards[i] for i in order], int(rng.integers(self.num_samples))

    def worker_slice(self, k: int) -> tuple[int, int]:
        """Positions [start, stop) of this rank's epoch sequence that worker k reads."""
        b = self.cfg.batch_size
        before = sum(_worker_batches(self.steps, self.workers, i) for i in range(k))
        start = (self.rank * self.steps + before) * b
        return start, start + b * _worker_batches(self.steps, self.workers, k)

    def _samples(self, shards: list[_Shard], start: int, stop: int, events: list[dict]) -> Iterator[_RawSample]:
        for i, begin, end in _segments([s.num_samples for s in shards], start, stop):
            for _, raw in _read_runs(shards[i], [(begin, end)], events):
                yield raw

    def raw_stream(self, epoch: int, k: int, events: list[dict]) -> Iterator[_RawSample]:
        """Worker k's undecoded samples: its shuffled slice, then reshuffled passes over the whole
        split, which only a truncated or unreadable shard ever reaches."""
        shards, rotation = self.epoch_order(epoch)
        start, stop = self.worker_slice(k)
        for fill_pass in range(3):
            if fill_pass:
                start, stop = 0, self.num_samples
            rng = np.random.default_rng([self.seed, epoch, self.rank, k, fill_pass])
            yield from _shuffled(self._samples(shards, rotation + start, rotation + stop, events),
                                 self.cfg.shuffle_buffer, rng)
        raise UserError(f"the shards in {self.cfg.shards!r} hold too few readable samples to fill an epoch; "
                        f"check them with 'vitpipe verify {self.cfg.shards}' and re-shard")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        epoch, start_step = int(self.control[0]), int(self.control[1])
        # The DataLoader asks its workers round-robin from worker 0 on every new iterator; after a
        # resume at `start_step` the next batch belongs to worker start_step % K, so renumber.
        k = ((info.id if info else 0) + start_step) % self.workers
        done = _worker_batches(start_step, self.workers, k)
        quota = _worker_batches(self.steps, self.workers, k)
        if done >= quota:
            return
        events: list[dict] = []
        stream = self.raw_stream(epoch, k, events)
        b = self.cfg.batch_size
        for _ in range(done * b):  # replay what the interrupted run consumed, without decoding
            next(stream)
        for m in range(done, quota):
            batch = self._batch(stream, events, epoch, k, m)
            batch.update(worker=k, events=_drain(events))
            yield batch

    def _batch(self, stream: Iterator[_RawSample], events: list[dict], epoch: int, k: int, m: int) -> dict:
        good: list[tuple[Any, int, str]] = []
        for _ in range(self.cfg.batch_size):
            raw = next(stream)
            try:
                img = decode_image(raw.image, mode=self.mode, min_side=self.min_side) if raw.image else None
                if img is None:
                    raise ValueError("no image member")
                good.append((img, _decode_label(raw, self.labelled), raw.key))
            except Exception as e:  # any decoder error: PIL raises many types on corrupt data
                events.append(_failure(raw, e))
        with torch.random.fork_rng(devices=[]):  # never disturb the training process's RNG (num_workers=0)
            torch.default_generator.manual_seed(_seed(self.seed, epoch, self.rank, k, m))
            filled = self.cfg.batch_size - len(good)
            if filled and not good:
                good = self._rescue(events)
            while len(good) < self.cfg.batch_size:
                good.append(good[int(torch.randint(len(good), ()))])
            crops = [self.transform(img) for img, _, _ in good]
            images = normalize_batch(crops, self.mean, self.std, out=batch_buffer(len(crops), crops[0].shape))
            targets = torch.tensor([label for _, label, _ in good], dtype=torch.long)
            images, targets = self.mixer(images, targets)
        batch = {"images": images, "targets": targets, "filled": filled}
        if self.return_keys:
            batch["keys"] = [key for _, _, key in good]
        return batch

    def _rescue(self, events: list[dict]) -> list[tuple[Any, int, str]]:
        """A whole batch failed to decode: find any decodable sample in the split to repeat."""
        for shard in self.shards:
            for _, raw in _read_runs(shard, [(0, shard.num_samples)], events):
                try:
                    img = decode_image(raw.image, mode=self.mode, min_side=self.min_side)
                    return [(img, _decode_label(raw, self.labelled), raw.key)]
                except Exception:
                    continue
        raise UserError(f"no sample of the shards in {self.cfg.shards!r} decodes; check them with "
                        f"'vitpipe verify {self.cfg.shards}' and re-shard")


# ---------------------------------------------------------------------------------------------
# Reporting bad data (main process)


class _DataReport:
    """Counts and warns about what the workers skipped; one per loader."""

    def __init__(self, what: str, rank: int):
        self.what, self.rank = what, rank
        self.decode_failures = 0
        self.filled = 0
        self.truncated: dict[str, str] = {}  # every damaged shard (truncated, unreadable, miscounted): why
        self.failed: list[dict] = []  # the first _MAX_LISTED decode failures, for users to look up
        self.failed_keys: set[tuple[str, str]] = set()  # (shard, key) of every sample that failed to decode
        self.warned = 0
        self._epoch_mark = (0, 0, 0)

    def add(self, events: list[dict], filled: int = 0) -> None:
        self.filled += filled
        for ev in events:
            if ev["kind"] == "decode":
                self.decode_failures += 1
                self.failed_keys.add((ev["shard"], ev["key"]))
                if len(self.failed) < _MAX_LISTED:
                    self.failed.append({k: ev[k] for k in ("key", "shard", "detail")})
                msg = (f"{self.what} rank {self.rank}: skipped sample {ev['key']!r} of {ev['shard']}: "
                       f"{ev['detail']}")
            elif ev["shard"] not in self.truncated:
                self.truncated[ev["shard"]] = ev["detail"]
                msg = (f"{self.what} rank {self.rank}: shard {ev['shard']} {ev['detail']}; "
                       f"continuing without the rest")
            else:
                continue
            if self.warned < _MAX_WARNINGS:
                self.warned += 1
                log.warning(msg)

    def as_dict(self) -> dict:
        return {"decode_failures": self.decode_failures, "failed_samples": list(self.failed),
                "truncated_shards": dict(self.truncated), "filled": self.filled}

    def summarize_epoch(self, epoch: int) -> None:
        """Log one line if this epoch skipped anything."""
        mark = (self.decode_failures, len(self.truncated), self.filled)
        bad, trunc, filled = (a - b for a, b in zip(mark, self._epoch_mark))
        self._epoch_mark = mark
        if bad or trunc or filled:
            log.warning(f"{self.what} rank {self.rank} epoch {epoch}: {bad} samples failed to decode and were "
                        f"skipped, {trunc} shards truncated; {filled} batch slots refilled with repeats "
                        f"(totals so far: {self.as_dict()})")


# ---------------------------------------------------------------------------------------------
# Training loader


def _data_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    # Persistent workers keep the (forked or spawned) processes across epochs; they read the epoch
    # and start step from the dataset's shared-memory `control` tensor at every new iterator.
    # Its own generator: the DataLoader draws a base seed per iterator, which would otherwise come
    # from (and shift) the training process's global RNG. The streams seed themselves per batch.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))


class _WorkerProcesses:
    """What both loaders share: `self._loader`, a DataLoader whose worker processes persist across
    epochs, stopped by `close()` (or leaving a `with` block), else when the loader is freed."""

    _loader: DataLoader

    def _keep_workers(self, loader: DataLoader) -> None:
        self._loader = loader
        # The finalizer holds the DataLoader, so that it is never part of a collected cycle: when
        # the loader is, the workers are stopped before any of it is torn down. At exit torch does.
        weakref.finalize(self, _stop_workers, loader).atexit = False

    def close(self) -> None:
        """Stop the worker processes now rather than when the loader is freed; iterating again
        starts new ones, where the loader stood."""
        _stop_workers(self._loader)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop_workers(loader: DataLoader) -> None:
    """Stop a DataLoader's persistent workers now; its next iterator starts new ones. torch keeps
    them until the DataLoader is freed, and a DataLoader freed by the garbage collector (it was in
    a reference cycle) loses that race: the collector closes the index queues first, the workers
    never hear the stop and are killed after 5 s each. (DataLoader has no public call for this.)"""
    iterator, loader._iterator = getattr(loader, "_iterator", None), None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def _split_info(index: dict, split: str) -> list[_Shard]:
    urls = shard_urls(index, split)
    listed = index["splits"][split]["shards"]
    return [_Shard(url, s["name"], int(s["num_samples"])) for url, s in zip(urls, listed)]


class TrainLoader(_WorkerProcesses):
    """Iterate for the rest of the current epoch's batches: (images float [B, C, H, W], targets), and
    keys when built with `return_keys=True`. Targets are long [B] (-1 when unlabelled), or float
    [B, K] soft targets when mixup, cutmix or label smoothing is on. Every rank yields exactly
    `steps_per_epoch` batches per epoch."""

    _stream_class: type = _TrainStream  # pipeline.device_loader swaps in one that leaves batches encoded

    def __init__(self, cfg: DataConfig, index: dict, *, rank: int, world_size: int, seed: int, return_keys: bool):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}; need 0 <= rank < world_size")
        split = cfg.train_split
        shards = _split_info(index, split)
        self.num_samples = sum(s.num_samples for s in shards)
        self.class_names: list[str] = list(index["classes"])
        self.num_classes = len(self.class_names)
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        global_batch = cfg.batch_size * world_size
        if cfg.epoch_fill == "repeat":
            self.steps_per_epoch = math.ceil(self.num_samples / global_batch)
        else:
            self.steps_per_epoch = self.num_samples // global_batch
        if self.num_samples == 0:
            raise UserError(f"split {split!r} of {cfg.shards!r} has no samples (every input of it failed when "
                            f"sharding? see failures.jsonl there); shard a collection with readable images")
        if self.steps_per_epoch == 0:
            raise UserError(f"split {split!r} of {cfg.shards!r} has {self.num_samples} samples, fewer than one "
                            f"global batch ({world_size} ranks x batch_size {cfg.batch_size}); lower "
                            f"data.batch_size or set data.epoch_fill=repeat")
        if global_batch > self.num_samples and rank == 0:
            log.warning(f"split {split!r} of {cfg.shards!r} has {self.num_samples} samples, fewer than one global "
                        f"batch ({world_size} ranks x batch_size {cfg.batch_size}): every batch repeats samples; "
                        f"a data.batch_size of at most {max(1, self.num_samples // world_size)} avoids that")
        self.samples_per_epoch = self.steps_per_epoch * cfg.batch_size  # per rank
        self.epoch = 0
        self._step = 0
        self._resume_epoch: int | None = None
        self._control = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._stream = self._stream_class(shards=shards, cfg=cfg, steps=self.steps_per_epoch, rank=rank,
                                    world_size=world_size, seed=seed, labelled=self.num_classes > 0,
                                    num_classes=self.num_classes, return_keys=return_keys, control=self._control)
        self._keep_workers(_data_loader(self._stream, cfg.num_workers))
        self.report = _DataReport(f"train split {split!r}", rank)
        if rank == 0:
            log.info(self.describe())

    def describe(self) -> str:
        """One line on how an epoch is cut: steps, and what is repeated or dropped to make it even."""
        n, t = self.num_samples, self.samples_per_epoch * self.world_size
        workers = max(1, self.cfg.num_workers)
        how = ("every sample once" if t == n else
               f"{t - n} samples repeated per epoch to fill the last batches (epoch_fill=repeat)" if t > n else
               f"{n - t} samples left out per epoch, different ones each epoch (epoch_fill=drop)")
        return (f"train split {self.cfg.train_split!r}: {n} samples in {len(self._stream.shards)} shards, "
                f"{self.world_size} ranks x {workers} workers x batch {self.cfg.batch_size} -> "
                f"{self.steps_per_epoch} steps per epoch; {how}")

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def stats(self) -> dict:
        """Bad data seen so far by this rank: decode failures, truncated shards, refilled batch slots."""
        return self.report.as_dict()

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch; right after `load_state_dict` for that same epoch,
        continue where the saved run stopped instead."""
        if self._resume_epoch is not None and epoch == self._resume_epoch:
            return
        self._resume_epoch = None
        self.epoch, self._step = int(epoch), 0

    def __iter__(self) -> Iterator[tuple]:
        if self._step >= self.steps_per_epoch and self._resume_epoch is None:
            # a plain `for batch in loader` loop without set_epoch walks through the epochs
            self.epoch, self._step = self.epoch + 1, 0
        self._resume_epoch = None
        if self._step >= self.steps_per_epoch:
            return
        self._control[0], self._control[1] = self.epoch, self._step
        for batch in self._batches():
            batch = self._prepare(batch)
            self.report.add(batch["events"], batch["filled"])
            self._step += 1
            if "keys" in batch:
                yield batch["images"], batch["targets"], batch["keys"]
            else:
                yield batch["images"], batch["targets"]
            if self._step >= self.steps_per_epoch:
                self.report.summarize_epoch(self.epoch)
                return
        # Only reached if the workers stopped early: fail loudly rather than let this rank skip
        # collectives the others will wait in.
        raise RuntimeError(f"train loader rank {self.rank} produced {self._step} of {self.steps_per_epoch} "
                           f"batches of epoch {self.epoch}; this is a bug, please report it")

    def _batches(self) -> Iterable[dict]:
        """The workers' batches for this epoch (the device loader decodes them ahead here)."""
        return self._loader

    def _prepare(self, batch: dict) -> dict:
        """A worker's batch as the step gets it (the device loader decodes and augments here)."""
        return batch

    def state_dict(self) -> dict:
        """Where this epoch stands; identical on every rank, so save it from rank 0."""
        return {"epoch": self.epoch, "steps": self._step, "samples_consumed": self._step * self.cfg.batch_size,
                "steps_per_epoch": self.steps_per_epoch, "world_size": self.world_size,
                "num_workers": max(1, self.cfg.num_workers), "batch_size": self.cfg.batch_size,
                "seed": self.seed, "split": self.cfg.train_split}

    def load_state_dict(self, state: dict) -> None:
        """Resume mid-epoch: the next iteration yields exactly the batches the saved run had not
        consumed yet (same world size, workers and batch size; otherwise an approximate restart
        of the same epoch, logged)."""
        try:
            epoch, steps = int(state["epoch"]), int(state["steps"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"loader state {state!r} lacks 'epoch' and 'steps'; pass what "
                            f"TrainLoader.state_dict() returned") from None
        same = {k: state.get(k) for k in ("world_size", "num_workers", "batch_size", "seed", "split")}
        ours = {k: v for k, v in self.state_dict().items() if k in same}
        if same != ours or state.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
            changed = ", ".join(f"{k} {same[k]} -> {ours[k]}" for k in same if same[k] != ours[k])
            # Same fraction of the epoch's samples, counted globally; the sample order differs.
            seen = steps * int(state.get("batch_size", self.cfg.batch_size)) * int(state.get("world_size", 1))
            steps = min(self.steps_per_epoch, seen // (self.cfg.batch_size * self.world_size))
            if self.rank == 0:
                log.warning(f"resuming epoch {epoch} with a changed layout ({changed or 'split size'}): "
                            f"continuing at loader batch {steps}/{self.steps_per_epoch} of the epoch (by sample "
                            f"count; with grad_accum several batches make one optimizer step); this "
                            f"epoch's remaining samples will not exactly complement the ones already seen")
        self.epoch, self._step = epoch, min(steps, self.steps_per_epoch)
        self._resume_epoch = epoch


def make_train_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                      return_keys: bool = False, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> TrainLoader:
    """Build this rank's training loader from `cfg.shards`/index.json; call once per process.

    `device`: where training runs. Given, and data.decode is gpu (or auto on CUDA), batches are
    decoded there and come as `dtype` (default float32) on it (pipeline/device_loader.py)."""
    from pipeline.device_loader import DeviceTrainLoader, resolve_decode

    index = _load(cfg)
    if device is not None and resolve_decode(cfg.decode, torch.device(device)) == "gpu":
        return DeviceTrainLoader(cfg, index, rank=rank, world_size=world_size, seed=seed, return_keys=return_keys,
                                 device=device, dtype=dtype)
    return TrainLoader(cfg, index, rank=rank, world_size=world_size, seed=seed, return_keys=return_keys)


def _load(cfg: DataConfig) -> dict:
    if not cfg.shards:
        raise UserError("data.shards is empty; set it to the folder holding index.json, e.g. "
                        "--data.shards out/shards (the output of 'vitpipe shard')")
    return load_index(cfg.shards)


# ---------------------------------------------------------------------------------------------
# Evaluation loader


class _EvalStream(IterableDataset):
    """One rank's contiguous range of a split in index order, batch j from worker j % K."""

    def __init__(self, *, shards: list[_Shard], cfg: DataConfig, lo: int, hi: int, num_batches: int,
                 labelled: bool):
        self.shards, self.cfg, self.labelled = shards, cfg, labelled
        self.lo, self.hi, self.num_batches = lo, hi, num_batches
        self.transform = eval_transform(cfg.image_size, cfg.eval_crop_pct)
        self.min_side = math.floor(cfg.image_size / cfg.eval_crop_pct + 1e-6)
        self.mode = "RGB" if cfg.channels == 3 else "L"
        self.mean, self.std = cfg.channel_stats()

    def batch_range(self, j: int) -> tuple[int, int]:
        b = self.cfg.eval_batch_size
        return min(self.lo + j * b, self.hi), min(self.lo + (j + 1) * b, self.hi)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        mine = list(range(wid, self.num_batches, workers))
        sizes = [s.num_samples for s in self.shards]
        offsets = np.cumsum([0, *sizes])
        runs: dict[int, list[tuple[int, int]]] = {}
        for j in mine:
            for i, begin, end in _segments(sizes, *self.batch_range(j)):
                runs.setdefault(i, []).append((begin, end))
        events: list[dict] = []
        pending = iter(mine)
        j, items = next(pending, None), []
        for i in sorted(runs):
            for pos, raw in _read_runs(self.shards[i], runs[i], events):
                while j is not None and int(offsets[i]) + pos >= self.batch_range(j)[1]:
                    yield self._batch(items, events)
                    j, items = next(pending, None), []
                try:
                    items.append(self._item(raw))
                except Exception as e:  # any decoder error: PIL raises many types on corrupt data
                    events.append(_failure(raw, e))
        while j is not None:  # the rest, partial or empty, so every rank yields num_batches
            yield self._batch(items, events)
            j, items = next(pending, None), []

    def _item(self, raw: _RawSample) -> tuple:
        """(uint8 crop, label, key) of one sample; raises on bad data."""
        img = decode_image(raw.image, mode=self.mode, min_side=self.min_side) if raw.image else None
        if img is None:
            raise ValueError("no image member")
        return self.transform(img), _decode_label(raw, self.labelled), raw.key

    def _batch(self, items: list, events: list[dict]) -> dict:
        shape = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        images = normalize_batch([img for img, _, _ in items], self.mean, self.std,
                                 out=batch_buffer(len(items), shape))
        return {"images": images,
                "targets": torch.tensor([label for _, label, _ in items], dtype=torch.long),
                "keys": [key for _, _, key in items], "events": _drain(events)}


class EvalLoader(_WorkerProcesses):
    """Iterate for (images float [B, C, H, W], targets long [B] (-1 when unlabelled), keys).

    The split is cut into contiguous ranges, one per rank, read in index order: across ranks
    every sample is yielded exactly once, never padded with duplicates. Every rank yields exactly
    `num_batches` batches (the last ones may be short or empty), so per-batch collectives cannot
    hang; samples that fail to decode are skipped and reported in `stats`.
    """

    _stream_class: type = _EvalStream  # pipeline.device_loader swaps in one that leaves batches encoded

    def __init__(self, cfg: DataConfig, index: dict, split: str, *, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}; need 0 <= rank < world_size")
        shards = _split_info(index, split)
        self.split = split
        self.class_names: list[str] = list(index["classes"])
        self.num_classes = len(self.class_names)
        self.num_samples = sum(s.num_samples for s in shards)
        lo, hi = rank * self.num_samples // world_size, (rank + 1) * self.num_samples // world_size
        self.rank_num_samples = hi - lo
        self.num_batches = math.ceil(math.ceil(self.num_samples / world_size) / cfg.eval_batch_size)
        self._stream = self._stream_class(shards=shards, cfg=cfg, lo=lo, hi=hi, num_batches=self.num_batches,
                                   labelled=self.num_classes > 0)
        # More workers than batches would only start idle processes.
        self._keep_workers(_data_loader(self._stream, min(cfg.num_workers, self.num_batches)))
        self.report = _DataReport(f"eval split {split!r}", rank)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def stats(self) -> dict:
        """Bad data seen so far by this rank: decode failures and truncated shards."""
        return self.report.as_dict()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        for batch in self._loader:
            batch = self._prepare(batch)
            self.report.add(batch["events"])
            yield batch["images"], batch["targets"], batch["keys"]

    def _prepare(self, batch: dict) -> dict:
        """A worker's batch as evaluation gets it (the device loader decodes here)."""
        return batch


def make_eval_loader(cfg: DataConfig, split: str | None = None, *, rank: int = 0, world_size: int = 1,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EvalLoader:
    """Build this rank's loader over `split` (default `cfg.val_split`): every sample once, fixed order.
    `device`, `dtype`: as for `make_train_loader`."""
    from pipeline.device_loader import DeviceEvalLoader, resolve_decode

    index, split = _load(cfg), split or cfg.val_split
    if device is not None and resolve_decode(cfg.decode, torch.device(device)) == "gpu":
        return DeviceEvalLoader(cfg, index, split, rank=rank, world_size=world_size, device=device, dtype=dtype)
    return EvalLoader(cfg, index, split, rank=rank, world_size=world_size)
