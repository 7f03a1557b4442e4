"""Sharding throughput against its practical floors, side by side in one run.

    .venv/bin/python bench/bench_shard.py --images 1500 --repeats 3 --workers 1 2

1. Pass-through: `shard()` (list, validate headers, hash, write tar + index) vs GNU `tar -cf`
   packing the same files. Reported as speed ratio tar_time / shard_time (goal >= 0.7).
2. Resize + re-encode: `shard(encode=jpg, resize=shorter)` with W workers vs a bare Pillow
   decode -> resize -> encode loop in one process, times W. Reported as the shard rate per worker
   over the bare loop's rate (goal >= 0.8).

Inputs are real photos (scikit-image) cut into 384x384 JPEG crops, written once to a temporary
folder; every timing reads them from the page cache, so this measures CPU and tar overhead, not
the disk. Each timing is the median of --repeats runs, alternating baseline and candidate.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, n: int, side: int = 384) -> Path:
    """n JPEG crops (quality 90) of scikit-image's photos, in 10 class folders."""
    import skimage.data

    photos = [np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
              for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
    rng = np.random.default_rng(0)
    for i in range(n):
        p = photos[i % len(photos)]
        y = int(rng.integers(0, p.shape[0] - side // 2))
        x = int(rng.integers(0, p.shape[1] - side // 2))
        crop = Image.fromarray(p[y:y + side, x:x + side]).resize((side, side))
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_shard(src: Path, out: Path, **kw) -> None:
    from pipeline.shard import ShardConfig, shard

    shutil.rmtree(out, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the stage's one-line summary, per run
        shard(ShardConfig(src=str(src), out=str(out), val_ratio=0.0, max_shard_size="256MB", **kw))


def run_tar(src: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run(["tar", "-cf", str(out / "all.tar"), "-C", str(src), "."], check=True)


def bare_pillow_loop(files: list[Path], size: int, quality: int) -> None:
    """What a hand-written preprocessing script does: decode, resize the shorter side, encode."""
    for f in files:
        img = Image.open(f).convert("RGB")
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)


def median_pair(repeats: int, base, cand) -> tuple[float, float]:
    b, c = [], []
    for _ in range(repeats):
        b.append(timed(base))
        c.append(timed(cand))
    return statistics.median(b), statistics.median(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=160, help="shorter side after resize")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["TQDM_DISABLE"] = "1"

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_shard_"))
    try:
        src = make_images(work / "src", args.images)
        files = sorted(src.rglob("*.jpg"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} JPEG files, {mb:.1f} MB, {os.cpu_count()} CPUs, command: {' '.join(sys.argv)}\n")

        out = work / "out"
        t_tar, t_shard = median_pair(args.repeats, lambda: run_tar(src, out), lambda: run_shard(src, out))
        print("| pass-through | time (s) | MB/s | speed vs tar |\n| --- | --- | --- | --- |")
        print(f"| GNU tar -cf | {t_tar:.2f} | {mb / t_tar:.0f} | 1.00 |")
        print(f"| vitpipe shard | {t_shard:.2f} | {mb / t_shard:.0f} | {t_tar / t_shard:.2f} |")
        t_check = timed(lambda: run_shard(src, out, decode_check=True))
        print(f"| vitpipe shard --decode-check (1 run) | {t_check:.2f} | {mb / t_check:.0f} | "
              f"{t_tar / t_check:.2f} |\n")

        print("| resize+re-encode (jpg q90, shorter side "
              f"{args.size}) | workers | img/s | img/s per worker | per worker vs bare loop |")
        print("| --- | --- | --- | --- | --- |")
        for w in args.workers:
            t_bare, t_sh = median_pair(
                args.repeats, lambda: bare_pillow_loop(files, args.size, 90),
                lambda: run_shard(src, out, encode="jpg", quality=90, resize="shorter", size=args.size, workers=w))
            bare_rate, rate = len(files) / t_bare, len(files) / t_sh
            print(f"| bare Pillow loop x{w} (1 process, scaled) | - | {bare_rate * w:.0f} | {bare_rate:.0f} | 1.00 |")
            print(f"| vitpipe shard | {w} | {rate:.0f} | {rate / w:.0f} | {rate / w / bare_rate:.2f} |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
