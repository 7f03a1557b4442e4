"""Sharding throughput against its practical floors, side by side in one run.

    .venv/bin/python bench/bench_shard.py --images 1500 --repeats 3 --workers 1 2

1. Pass-through: `shard()` (list, validate headers, hash, write tar + index) vs GNU `tar -cf`
   packing the same files. Reported as speed ratio tar_time / shard_time (goal >= 0.7).
   Also shown: tar followed by `sync -f` (durable, as each shard is fsync'ed before it is renamed),
   a diagnostic run with sha256 stubbed out, which shows what the two required checksums (per
   sample, per shard) cost, and those two SHA-256 passes alone, from memory.
2. Resize + re-encode: `shard(encode=jpg, resize=shorter)` with W workers vs a bare Pillow
   decode -> resize -> encode loop in one process, times W. Reported as the shard rate per worker
   over the bare loop's rate (goal >= 0.8). The loop is also timed with `draft()` (libjpeg's
   reduced-scale decode, which the stage uses), the stronger baseline.

Inputs are real photos (scikit-image) cut into 384x384 JPEG crops, written once to a temporary
folder; every timing reads them from the page cache, so this measures CPU and tar overhead, not
the disk. Each timing is the median of --repeats runs, taking turns between baseline and candidates;
before each run, untimed, the last output is deleted and the disk flushed (`sync`), so no run pays
for another's clean-up or write-back.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image


def _photos() -> list:
    """scikit-image's photos; where it is not installed (a bare GPU machine), smooth random
    1024x1024 images with some grain, which JPEG-compress to about the same sizes."""
    import numpy as np  # here, not at the top: --workers N processes import this module again

    try:
        import skimage.data
    except ImportError:
        rng = np.random.default_rng(1)
        out = []
        for _ in range(5):
            base = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((1024, 1024),
                                                                                           Image.Resampling.BICUBIC)
            grain = rng.normal(0, 6, (1024, 1024, 3))
            out.append(np.clip(np.asarray(base, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
        return out
    return [np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
            for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]


def make_images(root: Path, n: int, side: int = 384) -> Path:
    """n JPEG crops (quality 90) of scikit-image's photos, in 10 class folders."""
    import numpy as np

    photos = _photos()
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


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process's threads and its reaped child processes).
    CPU time is the load-independent figure on a busy machine."""
    def cpu() -> float:
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + c.ru_utime + c.ru_stime

    start, start_cpu = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - start, cpu() - start_cpu


def run_shard(src: Path, out: Path, **kw) -> None:
    from pipeline.shard import ShardConfig, shard

    with contextlib.redirect_stdout(io.StringIO()):  # the stage's one-line summary, per run
        shard(ShardConfig(**{"src": str(src), "out": str(out), "val_ratio": 0.0, "max_shard_size": "256MB", **kw}))


def run_shard_without_hashing(src: Path, out: Path) -> None:
    """Diagnostic: the same run with sha256 replaced by a no-op, to show what hashing costs."""
    import pipeline.tar_writer as stage

    class NoHash:
        def update(self, data):
            pass

        def digest(self):
            return bytes(32)

        def hexdigest(self):
            return "0" * 64

    real = stage.hashlib.sha256
    stage.hashlib.sha256 = lambda *a: NoHash()
    try:
        run_shard(src, out)
    finally:
        stage.hashlib.sha256 = real


def hash_twice(blobs: list[bytes]) -> None:
    """Diagnostic floor: the two SHA-256 passes the format requires (each image's bytes for its
    JSON, then the whole shard for the index), from memory, one thread, no tar, no I/O."""
    import hashlib

    shard = hashlib.sha256()
    for data in blobs:
        hashlib.sha256(data).digest()
        shard.update(data)
    shard.digest()


def run_tar(src: Path, out: Path, *, durable: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-cf", str(out / "all.tar"), "-C", str(src), "."], check=True)
    if durable:  # what the shard stage does per shard (fsync before rename)
        subprocess.run(["sync", "-f", str(out / "all.tar")], check=True)


def bare_pillow_loop(files: list[Path], size: int, quality: int, *, draft: bool = False) -> None:
    """What a hand-written preprocessing script does: decode, resize the shorter side, encode.
    With `draft`, libjpeg decodes at a reduced scale first (what the shard stage does)."""
    for f in files:
        img = Image.open(f)
        w, h = img.size
        s = size / min(w, h)
        target = (max(1, round(w * s)), max(1, round(h * s)))
        if draft:
            img.draft("RGB", target)
        img = img.convert("RGB").resize(target, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)


def medians(repeats: int, *fns, before=None) -> list[tuple[float, float]]:
    """Median (wall, CPU) seconds of each function, run in turn `repeats` times (noise hits all
    alike). `before()` runs untimed ahead of each (removing the last output, flushing the disk)."""
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            if before is not None:
                before()
            t.append(timed(fn))
    return [(statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for t in times]


def fresh(out: Path):
    """Untimed reset between runs: no output left from the run before (deleting 50 MB of tar is
    neither side's work), and no dirty pages of it still being written back to disk."""
    def reset() -> None:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
    return reset


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
        reset = fresh(out)
        reset()
        run_shard(src, out)  # warm-up: imports, Pillow plugins, page cache
        reset()
        run_tar(src, out)
        blobs = [f.read_bytes() for f in files]
        runs = medians(args.repeats, lambda: run_tar(src, out), lambda: run_tar(src, out, durable=True),
                       lambda: run_shard(src, out), lambda: run_shard_without_hashing(src, out),
                       lambda: run_shard(src, out, decode_check=True), lambda: hash_twice(blobs), before=reset)
        names = ["GNU tar -cf (baseline)", "GNU tar -cf + sync -f", "**vitpipe shard**",
                 "vitpipe shard, sha256 stubbed out (diagnostic only)", "vitpipe shard --decode-check",
                 "SHA-256 of every byte twice, in memory, 1 thread (diagnostic floor)"]
        (t_tar, c_tar), (t_sync, _) = runs[0], runs[1]
        print("| pass-through | wall (s) | CPU (s) | MB/s | speed vs tar | speed vs tar + sync | CPU vs tar |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, (t, c) in zip(names, runs):
            print(f"| {name} | {t:.3f} | {c:.3f} | {mb / t:.0f} | {t_tar / t:.2f} | {t_sync / t:.2f} | "
                  f"{c / c_tar:.2f} |")
        # With several workers the shard is the unit of parallel work: cut the set into 4 shards a worker.
        total = sum(f.stat().st_size for f in files)
        for w in (w for w in args.workers if w > 1):
            per_shard = max(1 << 20, total // (4 * w))
            reset()
            run_shard(src, out, workers=w, max_shard_size=per_shard)  # warm-up: the pool's forkserver
            n_shards = len(list(out.glob("*.tar")))
            (t_w, _), (t_tar_w, _) = medians(args.repeats, lambda: run_shard(src, out, workers=w,
                                                                              max_shard_size=per_shard),
                                             lambda: run_tar(src, out), before=reset)
            # CPU: not measurable here, the workers are children of the pool's forkserver, not of us.
            print(f"| vitpipe shard --workers {w} ({n_shards} shards; tar {t_tar_w:.3f} s in the same turns) | "
                  f"{t_w:.3f} | - | {mb / t_w:.0f} | {t_tar_w / t_w:.2f} | {t_sync / t_w:.2f} | - |")
        print()

        print(f"| resize+re-encode (jpg q90, shorter side {args.size}) | workers | img/s | "
              f"img/s per worker | per worker vs bare loop |\n| --- | --- | --- | --- | --- |")
        for w in args.workers:
            (t_bare, _), (t_draft, _), (t_sh, _) = medians(
                args.repeats, lambda: bare_pillow_loop(files, args.size, 90),
                lambda: bare_pillow_loop(files, args.size, 90, draft=True),
                lambda: run_shard(src, out, encode="jpg", quality=90, resize="shorter", size=args.size, workers=w),
                before=reset)
            bare, draft, rate = len(files) / t_bare, len(files) / t_draft, len(files) / t_sh
            print(f"| bare Pillow loop, 1 process, x{w} (baseline) | - | {bare * w:.0f} | {bare:.0f} | 1.00 |")
            print(f"| bare Pillow loop with draft(), 1 process, x{w} | - | {draft * w:.0f} | {draft:.0f} | "
                  f"{draft / bare:.2f} |")
            print(f"| **vitpipe shard --encode jpg --resize shorter** | {w} | {rate:.0f} | {rate / w:.0f} | "
                  f"{rate / w / bare:.2f} |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
