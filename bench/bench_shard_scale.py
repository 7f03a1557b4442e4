"""Sharding at scale: wall time, images/s and peak RSS of `vitpipe shard` as the collection grows.

    .venv/bin/python bench/bench_shard_scale.py --sizes 20000 200000 1000000 --manifest 1000000 --work /big/tmp

For each size N: N tiny real PNGs (16x16, ~100 bytes; the same pixels, so generating a million
takes seconds) in 100 class folders, sharded by the real command line (`python -m vitpipe.cli
shard SRC OUT`, one process, default options) in a child process whose peak RSS (VmHWM, read by
the child as it exits: ru_maxrss would also count the benchmark's own memory, shared until exec)
and CPU time (user + system) are recorded. Before each run the files are read once, untimed,
so every run finds them in the page cache (the machine's other work and its disk then move the
wall time, not the CPU time: images per CPU-second is the figure to compare across sizes). `--manifest N` also shards each size up to N through a Parquet manifest
split in 10 part files (a manifest folder, each part one row group, as pyarrow writes them). Goals (issue #17): peak RSS flat (at most
1.3x from the smallest to the largest size) and images/s not falling with size (at least 0.9x).
With `--baseline DIR` (a checkout of an older vitpipe), the same runs of that code for sizes up
to 200,000 are shown side by side. `--index-shards N` also writes a real set of N shards (2 tiny
images each) and times what a consumer does with its index: `load_index`, building the training
loaders of 8 ranks (equal steps), and `vitpipe verify --sample 100` and of all shards. The files go to `--work` (check its free space: about 9 KB per
image for the files, shards and plan) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 100


def tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def make_files(root: Path, n: int, start: int = 0) -> None:
    """Files start..n-1 of the collection, in 100 class folders (written with plain os calls)."""
    data = tiny_png()
    for c in range(CLASSES):
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for i in range(start, n):
        fd = os.open(f"{root}/c{i % CLASSES:03d}/{i:08d}.png", flags, 0o644)
        os.write(fd, data)
        os.close(fd)


def make_manifest(root: Path, files: Path, n: int, parts: int = 10) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    per = -(-n // parts)
    for p in range(parts):
        ids = range(p * per, min(n, (p + 1) * per))
        pq.write_table(pa.table({"path": [f"{files}/c{i % CLASSES:03d}/{i:08d}.png" for i in ids],
                                 "label": [f"c{i % CLASSES:03d}" for i in ids]}), root / f"part-{p:03d}.parquet")
    return root


def warm(files: Path) -> None:
    """Read every file once (untimed), so the timed run finds them in the page cache."""
    for folder in os.scandir(files):
        for e in os.scandir(folder.path):
            fd = os.open(e.path, os.O_RDONLY)
            os.read(fd, 1 << 16)
            os.close(fd)


# The child: the command line as `python -m vitpipe.cli`, then its own peak RSS into $PEAK_RSS_FILE.
CHILD = """
import os, runpy
try:
    runpy.run_module("vitpipe.cli", run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_RSS_FILE"], "w") as f:
        f.write(kb)
"""


def run_shard(src: Path, out: Path, code: Path, files: Path) -> dict:
    """`vitpipe shard SRC OUT` in a child process: wall and CPU seconds, images, peak RSS (MB)."""
    shutil.rmtree(out, ignore_errors=True)
    warm(files)
    peak_file = out.parent / "peak-rss-kb"
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_MININTERVAL": "5", "PEAK_RSS_FILE": str(peak_file)}
    cmd = [sys.executable, "-c", CHILD, "shard", str(src), str(out)]
    subprocess.run(["sync"], check=False)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    summary = proc.stdout.read().decode().strip()
    if proc.returncode:
        raise RuntimeError(f"vitpipe shard {src} {out} failed ({proc.returncode}): {summary}")
    stats = json.loads((out / "stats.json").read_text())
    shutil.rmtree(out)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "images": stats["num_samples"],
            "rss_mb": int(peak_file.read_text()) / 1024,
            "list_plan_s": stats.get("phases_s", {}).get("list_plan")}


def index_at_scale(work: Path, num_shards: int) -> list[tuple[str, float]]:
    """Seconds for what consumers do with an index of `num_shards` real shards."""
    from pipeline.index import load_index
    from pipeline.loader import DataConfig, TrainLoader

    files, out = work / "index-files", work / "index-shards"
    make_files(files, 2 * num_shards)
    subprocess.run([sys.executable, "-m", "vitpipe.cli", "shard", str(files), str(out), "--val-ratio", "0",
                    "--max-samples-per-shard", "2"], check=True, capture_output=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    timings = []
    t = time.perf_counter()
    index = load_index(str(out))
    timings.append((f"load_index ({index['totals']['num_shards']:,} shards)", time.perf_counter() - t))
    t = time.perf_counter()
    loaders = [TrainLoader(DataConfig(shards=str(out), batch_size=64, num_workers=0), index, rank=r,
                           world_size=8, seed=0, return_keys=False) for r in range(8)]
    assert len({len(loader) for loader in loaders}) == 1
    timings.append(("TrainLoader for each of 8 ranks", time.perf_counter() - t))
    for label, extra in (("vitpipe verify --sample 100", ["--sample", "100"]),
                         ("vitpipe verify --workers 2 (all)", ["--workers", "2"])):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vitpipe.cli", "verify", str(out), *extra], check=True,
                       capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        timings.append((label, time.perf_counter() - t))
    shutil.rmtree(files)
    shutil.rmtree(out)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--manifest", type=int, default=0,
                        help="also shard each size up to this one through a Parquet manifest in 10 parts")
    parser.add_argument("--baseline", type=Path, help="a checkout of an older vitpipe to run side by side")
    parser.add_argument("--index-shards", type=int, default=0, help="also time an index of this many real shards")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vitpipe-bench-scale"))
    args = parser.parse_args()
    files, out = args.work / "files", args.work / "out"
    shutil.rmtree(args.work, ignore_errors=True)
    rows = []
    made = 0
    try:
        for n in sorted(args.sizes):
            t = time.perf_counter()
            make_files(files, n, start=made)  # each size is the previous one plus more files
            made = n
            print(f"[{n} files written in {time.perf_counter() - t:.0f}s]", file=sys.stderr, flush=True)
            rows.append(("folder tree", n, "this", run_shard(files, out, REPO, files)))
            if args.baseline and n <= 200_000:
                rows.append(("folder tree", n, "baseline", run_shard(files, out, args.baseline, files)))
            if args.manifest and n <= args.manifest:
                manifest = make_manifest(args.work / f"manifest-{n}", files, n)
                rows.append(("parquet manifest, 10 parts", n, "this", run_shard(manifest, out, REPO, files)))
        index_timings = index_at_scale(args.work, args.index_shards) if args.index_shards else []
    finally:
        shutil.rmtree(args.work, ignore_errors=True)

    first = {}
    print("| input | images | code | wall | listing+planning | images/s | CPU | images per CPU-s | peak RSS "
          "| RSS vs first | images per CPU-s vs first |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for what, n, who, r in rows:
        f = first.setdefault((what, who), r)  # each input kind and code against its own smallest run
        per_cpu, first_per_cpu = r["images"] / r["cpu_s"], f["images"] / f["cpu_s"]
        lp = f"{r['list_plan_s']:.1f} s" if r["list_plan_s"] is not None else "-"
        print(f"| {what} | {n:,} | {who} | {r['wall_s']:.1f} s | {lp} | {r['images'] / r['wall_s']:,.0f} | "
              f"{r['cpu_s']:.1f} s | {per_cpu:,.0f} | {r['rss_mb']:.0f} MB | {r['rss_mb'] / f['rss_mb']:.2f}x | "
              f"{per_cpu / first_per_cpu:.2f}x |")
    if index_timings:
        print("\n| with an index of many shards | seconds |\n| --- | ---: |")
        for label, seconds in index_timings:
            print(f"| {label} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
