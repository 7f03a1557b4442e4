"""`vitpipe verify OUT`: recompute a shard set's checksums and counts and compare with its index.

Run it after copying a shard set somewhere (or before a long training run) to prove that every
shard the index lists is there, complete and unchanged. `verify(out)` returns the problems found,
one line each (empty when all is well); the command exits non-zero and names each mismatch.
Each shard is read once, as a stream (memory does not grow with its size); `--workers N` checks N
shards at a time, and `--sample N` checks N shards drawn at random (seeded: the same N every time
for a --seed) instead of all, for a quick look at a set of thousands of shards. The index, the
names of the files present and failures.jsonl are always checked in full.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import random
import sys
import tarfile
from typing import Callable

import fsspec
from tqdm.auto import tqdm

from pipeline.index import INDEX_NAME, index_location, load_index
from pipeline.interop import check_reader_files
from vitpipe.errors import UserError

_TMP_MARK = ".tmp-"


class _HashingReader:
    """A read-only stream that hashes and counts every byte tarfile reads from it."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha256.update(data)
        self.num_bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _check_shard(url: str, entry: dict, num_classes: int, progress: Callable[[int], None] | None = None
                 ) -> list[str]:
    """Problems of one shard: readable tar, sample count, byte size, sha256, sample contents.
    `progress(k)`: k more bytes read."""
    name = entry["name"]
    problems: list[str] = []
    try:
        f = fsspec.open(url, "rb").open()
    except FileNotFoundError:
        return [f"{name}: missing (the index lists it with {entry['num_samples']} samples)"]
    shown = 0

    def tick(reader) -> None:
        nonlocal shown
        if progress is not None and reader.num_bytes > shown:
            progress(reader.num_bytes - shown)
            shown = reader.num_bytes

    with f:
        reader = _HashingReader(f)
        keys: list[str] = []
        members: dict[str, set[str]] = {}
        try:
            # Stream mode: one sequential pass, the way a loader reads it, hashing as we go.
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for m in tar:
                    base = m.name.rsplit("/", 1)
                    stem, _, ext = base[-1].partition(".")
                    key = (base[0] + "/" + stem) if len(base) == 2 else stem
                    if not keys or keys[-1] != key:
                        if key in members:
                            problems.append(f"{name}: sample {key!r} is split across non-adjacent members")
                        keys.append(key)
                        members[key] = set()
                    members[key].add(ext)
                    data = tar.extractfile(m).read() if m.isfile() else b""
                    if ext == "cls" and num_classes:
                        try:
                            cls = int(data)
                            if not 0 <= cls < num_classes:
                                problems.append(f"{name}: {key}.cls is {cls}, outside 0..{num_classes - 1}")
                        except ValueError:
                            problems.append(f"{name}: {key}.cls is {data[:20]!r}, not a class id")
                    elif ext == "json":
                        try:
                            json.loads(data)
                        except ValueError:
                            problems.append(f"{name}: {key}.json is not valid JSON")
                    tick(reader)
            reader.drain()  # the end-of-archive padding counts towards size and checksum
            tick(reader)
        except (tarfile.TarError, OSError, EOFError) as e:
            return [f"{name}: not a readable tar ({type(e).__name__}: {e})"]
    for key, exts in members.items():
        images = exts - {"cls", "json"}
        if len(images) != 1:
            problems.append(f"{name}: sample {key!r} has {len(images)} image members ({sorted(exts)})")
        if num_classes and "cls" not in exts:
            problems.append(f"{name}: sample {key!r} has no .cls but the set is labelled")
    if len(keys) != entry["num_samples"]:
        problems.append(f"{name}: {len(keys)} samples, index says {entry['num_samples']}")
    if reader.num_bytes != entry["num_bytes"]:
        problems.append(f"{name}: {reader.num_bytes} bytes, index says {entry['num_bytes']}")
    digest = reader.sha256.hexdigest()
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest[:16]}..., index says {entry['sha256'][:16]}...")
    return problems


def verify(out: str, *, sample: int | None = None, seed: int = 0, workers: int = 1) -> list[str]:
    """Problems found in the shard set at `out` (a directory or fsspec URL); [] when all is good.
    `sample`: check that many shards, drawn at random with `seed`, instead of all; `workers`:
    shards checked at a time (processes)."""
    index = load_index(out)
    root = index["_root"]
    problems: list[str] = []
    num_classes = len(index["classes"])
    listed = [(split, s) for split, v in index["splits"].items() for s in v["shards"]]
    for split, entry in listed:
        if not entry["name"].startswith(f"{split}-"):
            problems.append(f"{entry['name']}: listed under split {split!r} but named for another")
    chosen = listed
    if sample is not None and sample < len(listed):
        chosen = [listed[i] for i in sorted(random.Random(seed).sample(range(len(listed)), sample))]
    found: dict[str, list[str]] = {}
    with tqdm(total=sum(s["num_bytes"] for _, s in chosen), unit="B", unit_scale=True, desc="verify",
              file=sys.stderr) as bar:
        if workers <= 1 or len(chosen) <= 1:
            for _, entry in chosen:
                found[entry["name"]] = _check_shard(f"{root}/{entry['name']}", entry, num_classes, bar.update)
        else:
            ctx = multiprocessing.get_context("forkserver")  # the caller may have threads (fsspec, tqdm)
            with cf.ProcessPoolExecutor(min(workers, len(chosen)), mp_context=ctx) as pool:
                futures = {pool.submit(_check_shard, f"{root}/{e['name']}", e, num_classes): e for _, e in chosen}
                for fut in cf.as_completed(futures):
                    entry = futures[fut]
                    found[entry["name"]] = fut.result()
                    bar.update(entry["num_bytes"])
    for _, entry in chosen:  # in index order, however they finished
        problems += found[entry["name"]]

    fs, path = fsspec.core.url_to_fs(root)
    try:
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except (OSError, NotImplementedError, ValueError):
        present = set()  # e.g. plain HTTP without directory listings: only listed shards are checked
    names = {s["name"] for _, s in listed}
    for extra in sorted(present - names):
        if extra.endswith(".tar"):
            problems.append(f"{extra}: a shard file the index does not list")
        elif _TMP_MARK in extra:
            problems.append(f"{extra}: a half-written shard (an interrupted run); re-run 'vitpipe shard'")
    # the wids indexes, and the DALI index of each shard checked and sound (a damaged shard's is moot)
    problems += check_reader_files(root, index, [e["name"] for _, e in chosen if not found[e["name"]]])
    if "failures.jsonl" in present:
        with fs.open(f"{path}/failures.jsonl", "rt") as f:
            n = sum(1 for line in f if line.strip())
        if n != index["totals"].get("num_failures", n):
            problems.append(f"failures.jsonl: {n} lines, index says num_failures={index['totals']['num_failures']}")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT",
                        help=f"shard set directory (local or fsspec URL) holding {INDEX_NAME}, or that {INDEX_NAME}")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="check N shards drawn at random (see --seed) instead of all of them")
    parser.add_argument("--seed", type=int, default=0, help="which shards --sample draws (default 0: the same each time)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="shards checked at a time, each in its own process (default 1)")


def run_cli(args: argparse.Namespace) -> int:
    for option in ("sample", "workers"):
        if (value := getattr(args, option)) is not None and value < 1:
            raise UserError(f"--{option} {value}: must be >= 1, e.g. --{option} 8")
    problems = verify(args.out, sample=args.sample, seed=args.seed, workers=args.workers)
    index = load_index(args.out)
    if problems:
        for p in problems:
            print(f"MISMATCH {p}", file=sys.stderr)
        print(f"verify: {len(problems)} problem(s) in {args.out}", file=sys.stderr)
        return 1
    t = index["totals"]
    checked = (f"{args.sample} of {t['num_shards']} shards (drawn with --seed {args.seed})"
               if args.sample is not None and args.sample < t["num_shards"] else f"{t['num_shards']} shards")
    print(f"verify: OK, {checked}, {t['num_samples']} samples, {t['num_bytes'] / 1e6:.1f} MB "
          f"match {index_location(args.out)[0]}")
    return 0
