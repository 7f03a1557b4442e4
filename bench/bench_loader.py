"""Training-loader throughput: vitpipe's shard loader vs torchvision ImageFolder + DataLoader.

Writes N JPEG photos (random crops of scikit-image's bundled photos, in 10 class folders), shards
them with the real shard stage (bytes untouched), then measures in one process, alternating
rounds (A B C, C B A, ...) so that machine noise hits all alike:

- `vitpipe`: `make_train_loader` over the shards;
- `imagefolder`: `torchvision.datasets.ImageFolder` over the same files + `DataLoader`
  (shuffle, drop_last, persistent workers), with the same decode function, transforms, batch
  size, workers and batch normalisation;
- `limit`: as many plain processes as workers, each decoding, transforming and batching its
  share of the images from bytes in memory: what the workers could do if reading the data and
  handing batches over cost nothing (one core's rate times the workers on an idle machine).

Both loaders run a warm-up epoch first (page cache, worker start). Prints one line per contender
and the two ratios, then one JSON line.

    python bench/bench_loader.py                                   # 4000 images 256x192 -> 128 px
    python bench/bench_loader.py --images 2000 --workers 4 --image-size 224 --source-size 320
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil  # installed with deepspeed
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.loader import DataConfig, make_train_loader  # noqa: E402
from pipeline.shard import ShardConfig, shard  # noqa: E402
from pipeline.transforms import (batch_buffer, decode_image, normalize_batch, train_min_side,  # noqa: E402
                                 train_transform)


def write_photos(out: Path, n: int, width: int, height: int) -> Path:
    """`n` JPEGs (q90) cropped at random from skimage's photos, `out/<class 0-9>/<i>.jpg`."""
    import skimage.data
    from PIL import Image

    sources = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
               for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
    rng = np.random.default_rng(0)
    for i in range(n):
        src = sources[i % len(sources)]
        w = int(rng.integers(src.width // 4, src.width // 2))
        h = w * height // width
        x, y = int(rng.integers(0, src.width - w)), int(rng.integers(0, src.height - h))
        folder = out / str(i % 10)
        folder.mkdir(parents=True, exist_ok=True)
        src.crop((x, y, x + w, y + h)).resize((width, height)).save(folder / f"{i:06d}.jpg", quality=90)
    return out


def imagefolder_loader(root: Path, cfg: DataConfig) -> torch.utils.data.DataLoader:
    """The torchvision baseline with exactly the loader's per-sample work and batch normalisation."""
    from torchvision.datasets import ImageFolder

    min_side = train_min_side(cfg.augment, cfg.image_size)
    mean, std = cfg.channel_stats()

    def load(path: str):
        with open(path, "rb") as f:
            return decode_image(f.read(), mode="RGB", min_side=min_side)

    def collate(items):
        crops = [img for img, _ in items]
        images = normalize_batch(crops, mean, std, out=batch_buffer(len(crops), crops[0].shape))
        return images, torch.tensor([label for _, label in items])

    dataset = ImageFolder(str(root), loader=load, transform=train_transform(cfg.augment, cfg.image_size))
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                       num_workers=cfg.num_workers, persistent_workers=True, collate_fn=collate)


def _bare_loop(blobs: list[bytes], cfg: DataConfig, barrier, results) -> None:
    torch.set_num_threads(1)
    transform = train_transform(cfg.augment, cfg.image_size)
    min_side = train_min_side(cfg.augment, cfg.image_size)
    mean, std = cfg.channel_stats()
    barrier.wait()
    cpu, start = time.process_time(), time.perf_counter()
    done = 0
    for i in range(0, len(blobs) - cfg.batch_size + 1, cfg.batch_size):
        batch = [transform(decode_image(b, mode="RGB", min_side=min_side)) for b in blobs[i:i + cfg.batch_size]]
        normalize_batch(batch, mean, std)
        done += len(batch)
    results.put((done, start, time.perf_counter(), time.process_time() - cpu))


def limit_rate(root: Path, cfg: DataConfig, max_images: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of `num_workers` processes that only decode, transform and
    batch, from bytes already in memory, each its share of the images: one core's rate times the
    workers on an idle machine, and what the same number of busy processes get on a shared one."""
    blobs = [p.read_bytes() for p in sorted(root.rglob("*.jpg"))[:max_images]]
    workers = max(1, cfg.num_workers)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_bare_loop, args=(blobs[k::workers], cfg, barrier, results))
             for k in range(workers)]
    for p in procs:
        p.start()
    runs = [results.get() for _ in procs]
    for p in procs:
        p.join()
    n = sum(r[0] for r in runs)
    wall = max(r[2] for r in runs) - min(r[1] for r in runs)
    return n / wall, 1000 * sum(r[3] for r in runs) / n


def tree_cpu_seconds() -> float:
    """CPU time of this process and its live children (the DataLoader workers), user + system."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def epoch_rate(loader) -> tuple[float, float]:
    """(images/s of one epoch, CPU ms per image spent by this process and its workers)."""
    cpu, start = tree_cpu_seconds(), time.perf_counter()
    n = sum(len(batch[0]) for batch in loader)
    return n / (time.perf_counter() - start), 1000 * (tree_cpu_seconds() - cpu) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--source-size", type=int, default=256, help="width of the JPEGs (height is 3/4 of it)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="keep the images and shards here (default: a temp dir)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.dir or tmp)
        images, shards = work / "images", work / "shards"
        if not (shards / "index.json").exists():
            write_photos(images, args.images, args.source_size, args.source_size * 3 // 4)
            shard(ShardConfig(src=str(images), out=str(shards), val_ratio=0.0,
                              max_samples_per_shard=max(1, args.images // 8), workers=1))
        cfg = DataConfig(shards=str(shards), image_size=args.image_size, batch_size=args.batch_size,
                         num_workers=args.workers, epoch_fill="drop")
        ours = make_train_loader(cfg)
        theirs = imagefolder_loader(images, cfg)
        epoch_rate(ours), epoch_rate(theirs)  # warm-up: start workers, fill the page cache
        runs: dict[str, list[tuple[float, float]]] = {"vitpipe": [], "imagefolder": [], "limit": []}
        contenders = {"vitpipe": lambda: epoch_rate(ours), "imagefolder": lambda: epoch_rate(theirs),
                      "limit": lambda: limit_rate(images, cfg, args.images)}
        order = list(contenders)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                runs[name].append(contenders[name]())
    # Wall-clock rates need an otherwise idle machine; CPU ms per image (all processes of a
    # contender) holds up better on a busy one.
    rate = {k: statistics.median(r for r, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    for name, v in runs.items():
        print(f"{name:12s} {rate[name]:7.0f} images/s {cpu[name]:6.2f} CPU ms/image   "
              f"(rounds: {', '.join(f'{r:.0f}/s {c:.2f} ms' for r, c in v)})")
    result = {"vs_imagefolder": rate["vitpipe"] / rate["imagefolder"], "vs_limit": rate["vitpipe"] / rate["limit"],
              "cpu_vs_imagefolder": cpu["imagefolder"] / cpu["vitpipe"],
              "cpu_vs_limit": cpu["limit"] / cpu["vitpipe"]}
    print(f"images/s: vitpipe / imagefolder = {result['vs_imagefolder']:.2f}x (goal >= 1.0), "
          f"vitpipe / limit = {result['vs_limit']:.2f}x (goal >= 0.85)")
    print(f"CPU per image: imagefolder / vitpipe = {result['cpu_vs_imagefolder']:.2f}x, "
          f"limit / vitpipe = {result['cpu_vs_limit']:.2f}x (higher = vitpipe cheaper)")
    print(json.dumps({"images_per_s": rate, "cpu_ms_per_image": cpu, **{k: round(v, 3) for k, v in result.items()},
                      "args": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
