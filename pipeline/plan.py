"""Planning a shard set in bounded memory: which item goes to which split and shard, before any image is read.

The plan depends only on the listing and the options that change bytes (never on workers, on how
the work is divided, or on timing), so a shard set is a pure function of its input: byte-identical
whatever runs it, and a resumed run can tell finished shards from the plan alone. Within a split,
items are ordered by a hash of their key ('shuffled') or by key ('sorted') over the whole
collection, and cut into shards by count and by a byte bound computed from file sizes
(`pipeline.tar_writer.tar_member_bytes`). No step holds the collection in memory:

1. List (`list_task`, one per few parts of SRC, on any worker): items stream into a `SortedSpool`,
   which sorts RUN_LINES at a time in memory and merges the sorted runs on disk, FAN_IN files at a
   time, into one sorted run per task. A line is `ORDER KEY NAMEHASH<TAB>PAYLOAD`: its sort key
   first, so sorting lines sorts items, and items whose keys collide sit side by side.
2. Plan buckets (`plan_bucket`, on any worker): the runs are cut into contiguous ranges of that
   order (boundaries from every INDEX_EVERY-th line of each run); each range is merged (one open
   file per run), colliding keys get their suffix, each item its split and byte bound, and the
   items of each split go to a plan file with an (offset, bound) array beside it.
3. Cut (`cut_split`, here): per split, the plan files in range order are cut greedily into shards,
   from the arrays alone. The ranges only divide the work: the cut runs across them, so the shards
   are those of one sorted list of the whole split.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import math
import os
import re
import shutil
import socket
import sys
from array import array
from collections import Counter
from bisect import bisect_left, bisect_right
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from tqdm.auto import tqdm

from pipeline.interop import format_of_name, image_member_ext_of
from pipeline.sources import (ListingPart, SourceItem, SourceLayout, iter_part, name_digest, no_images_message, shown,
                              sort_labels)
from pipeline.tar_writer import TAR_END_BOUND, tar_member_bytes
from vitpipe.errors import UserError

if TYPE_CHECKING:
    from pipeline.run import Workers
    from pipeline.shard import ShardConfig

SPLITS_BY_HASH = ("train", "val")
TMP_MARK = ".tmp-"         # NAME.tmp-<host>-<pid>: never a final name
PLAN_FORMAT = 2            # bumped when the plan (and so the fingerprint) is computed differently

# What bounds memory (each a count of lines of ~250 bytes, see docs/formats.md):
RUN_LINES = 32_768         # items sorted in memory at a time while listing
FAN_IN = 64                # sorted files merged at once (open files per merge)
INDEX_EVERY = 1024         # one (key, offset) of a run kept per this many lines: the range boundaries
BUCKET_LINES = 262_144     # items per planning range: its (offset, bound) arrays, 16 bytes per item
TREE_PARTS_PER_TASK = 16   # class folders listed by one listing task


@dataclass(frozen=True)
class EncodeOptions:
    encode: str
    quality: int
    resize: str
    size: int
    decode_check: bool
    max_image_pixels: int
    image_ext: str = ""    # pass-through: every image member's extension (pipeline.interop.image_member_ext)


@dataclass(frozen=True)
class ShardTask:
    """Everything needed to write one shard, in any process: picklable, small (the items stay in
    the plan files on OUT's filesystem, read by `load_items`)."""

    name: str                                   # e.g. "train-000003.tar"
    split: str
    slices: tuple[tuple[str, int, int], ...]    # (plan file, byte offset, number of items), in order
    num_items: int
    bytes_bound: int                            # planned bytes (an upper bound without --encode)
    classes_file: str                           # JSON list of class names: ids are positions
    out_dir: str
    options: EncodeOptions

    def load_items(self) -> list[SourceItem]:
        items = []
        for path, offset, count in self.slices:
            with open(path, "rb") as f:
                f.seek(offset)
                for line in itertools.islice(f, count):
                    key, uri, size, label, _, extra, _ = json.loads(line)
                    items.append(SourceItem(key, uri, size, label, self.split, extra or {}))
        return items

    @property
    def class_ids(self) -> dict[str, int]:
        return class_ids(self.classes_file)


@lru_cache(maxsize=4)
def class_ids(classes_file: str) -> dict[str, int]:
    """Class name -> id from the plan's classes file, read once per process."""
    return {name: i for i, name in enumerate(json.loads(Path(classes_file).read_text()))}


@dataclass
class ShardResult:
    name: str
    split: str
    num_samples: int
    num_bytes: int
    sha256: str
    failures: list[dict] = field(default_factory=list)
    num_failures: int = 0
    conversions: dict[str, int] = field(default_factory=dict)  # images per pipeline.images.CONVERSIONS id


def _json_len_bound(text: str | None) -> int:
    """Bytes of `text` as a JSON string, or more; plain printable ASCII (the common case) skips json."""
    if text is None:
        return 4
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return len(text) + 2
    return len(json.dumps(text))  # \uXXXX escapes are never shorter than the UTF-8 bytes written


def _sample_bytes_bound(item: SourceItem) -> int:
    """Upper bound of one pass-through sample's tar bytes (image + cls + json members)."""
    extra = len(json.dumps(item.extra)) if item.extra else 2
    # + width, height, format, sha256 and the keys: well under 200 bytes
    json_bound = _json_len_bound(shown(item.uri)) + _json_len_bound(item.label) + extra + 200
    key_len = len(item.key) + 6  # ".tiff" is the longest extension
    return (tar_member_bytes(key_len, item.size) + tar_member_bytes(key_len, 20)
            + tar_member_bytes(key_len, json_bound))


def split_of(key: str, val_ratio: float) -> str:
    """'val' for a stable `val_ratio` fraction of keys (first 64 bits of sha256), else 'train'."""
    if val_ratio <= 0.0:  # no key hashes below 0 (saves a hash per image on the common no-val run)
        return "train"
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_ratio else "train"


def _order_key(key: str) -> bytes:
    # Salted so the order within 'val' is not correlated with the split hash above.
    return hashlib.sha256(b"order:" + key.encode()).digest()


# ---------------------------------------------------------------------------------------------
# Sorted runs on disk


@dataclass(frozen=True)
class Run:
    """A file of lines in sorted order, with every INDEX_EVERY-th line's sort key and byte offset."""

    path: str
    count: int
    num_bytes: int
    index: tuple[tuple[str, int], ...] = ()


_decode = json.JSONDecoder().decode  # json.loads less its per-call checks: run lines are ASCII text


def _sort_key(line: bytes) -> bytes:
    return line[:line.index(b"\t")]


@contextlib.contextmanager
def naming_errors(path):
    """OSErrors of writes (ENOSPC from write() names no file) re-raised naming `path`."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def write_run(lines: Iterable[bytes], path: str) -> Run:
    """Write lines (already in order) to `path`, indexing every INDEX_EVERY-th."""
    count = offset = 0
    index = []
    with naming_errors(path), open(path, "wb", buffering=1 << 20) as f:
        for line in lines:
            if count % INDEX_EVERY == 0:
                index.append((_sort_key(line).decode("ascii"), offset))
            f.write(line)
            offset += len(line)
            count += 1
    return Run(path, count, offset, tuple(index))


def merge_runs(runs: list[Run], path: str) -> Run:
    """One sorted run at `path` from sorted runs (which are deleted), FAN_IN files at a time."""
    runs = list(runs)
    level = 0
    while len(runs) > FAN_IN:
        runs = [merge_runs(runs[i:i + FAN_IN], f"{path}.m{level}-{i // FAN_IN}")
                for i in range(0, len(runs), FAN_IN)]
        level += 1
    if len(runs) == 1:
        os.replace(runs[0].path, path)
        return Run(path, runs[0].count, runs[0].num_bytes, runs[0].index)
    files = [open(r.path, "rb", buffering=1 << 16) for r in runs]
    try:
        merged = write_run(heapq.merge(*files), path)
    finally:
        for f in files:
            f.close()
    for r in runs:
        os.unlink(r.path)
    return merged


class SortedSpool:
    """Lines in (any order), one sorted run file out, holding at most RUN_LINES lines in memory:
    full chunks are sorted and written as runs, and every FAN_IN runs of a level are merged into
    one run of the next level (so each line is rewritten about log_FAN_IN(lines/RUN_LINES) times)."""

    def __init__(self, path: str):
        self.path = path
        self.count = 0
        self._lines: list[str] = []
        self._levels: list[list[Run]] = [[]]
        self._seq = 0

    def add(self, line: str) -> None:
        """`line`: ASCII, `SORTKEY<TAB>PAYLOAD\\n`, the sort key free of tabs and newlines."""
        self._lines.append(line)
        self.count += 1
        if len(self._lines) >= RUN_LINES:
            self._spill()

    def _next_path(self) -> str:
        self._seq += 1
        return f"{self.path}.r{self._seq}"

    def _spill(self) -> None:
        self._lines.sort()  # ASCII: the order of the bytes
        self._levels[0].append(write_run((s.encode("ascii") for s in self._lines), self._next_path()))
        self._lines = []
        level = 0
        while len(self._levels[level]) >= FAN_IN:
            merged = merge_runs(self._levels[level], self._next_path())
            self._levels[level] = []
            if level + 1 == len(self._levels):
                self._levels.append([])
            self._levels[level + 1].append(merged)
            level += 1

    def finish(self) -> Run:
        if not any(self._levels):  # all in memory: one sorted write, no merge
            self._lines.sort()
            run = write_run((s.encode("ascii") for s in self._lines), self.path)
            self._lines = []
            return run
        if self._lines:
            self._spill()
        return merge_runs([r for level in self._levels for r in level], self.path)


# ---------------------------------------------------------------------------------------------
# 1. Listing


@dataclass(frozen=True)
class ListTask:
    """Some parts of SRC, listed by one task into one sorted run of items and one of rejects."""

    id: str
    parts: tuple[ListingPart, ...]
    sample_order: str
    folder: str

    def identity(self) -> str:
        spec = json.dumps([PLAN_FORMAT, self.sample_order, [asdict(p) for p in self.parts]], sort_keys=True)
        return hashlib.sha256(spec.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class ListResult:
    id: str
    identity: str
    items: Run
    rejects: Run
    labels: list[str]
    splits: list[str]
    formats: dict[str, int] = field(default_factory=dict)  # items per format their names say (interop)

    @classmethod
    def from_json(cls, d: dict) -> "ListResult":
        runs = {k: Run(**{**d[k], "index": tuple(map(tuple, d[k]["index"]))}) for k in ("items", "rejects")}
        return cls(**{**d, **runs})


def item_line(name: str, item: SourceItem, sample_order: str) -> str:
    """A listed item as a run line: sort key (order, key, hash of its full name), then payload
    (with the sample's byte bound, worked out here, on the listing workers, for its key as listed)."""
    order = hashlib.sha256(b"order:" + item.key.encode()).hexdigest() if sample_order == "shuffled" else ""
    payload = json.dumps([item.uri, item.size, item.label, item.split, item.extra or None, _sample_bytes_bound(item)])
    return f"{order} {item.key} {name_digest(name)}\t{payload}\n"


def _receipt_path(task: ListTask) -> Path:
    return _receipt_path_of(Path(task.folder), task.id)


def reusable_listing(task: ListTask) -> ListResult | None:
    """A listing of this task finished by an earlier (interrupted) run of the same options."""
    try:
        r = ListResult.from_json(json.loads(_receipt_path(task).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if r.identity != task.identity():
        return None
    for run in (r.items, r.rejects):
        try:
            if os.path.getsize(run.path) != run.num_bytes:
                return None
        except OSError:
            return None
    return r


def list_task(task: ListTask, progress: Callable[[int], None] | None = None) -> ListResult:
    """List a task's parts into sorted runs; writes a receipt so an interrupted run's re-run keeps it."""
    if (done := reusable_listing(task)) is not None:
        if progress:
            progress(done.items.count + done.rejects.count)
        return done
    base = os.path.join(task.folder, task.id)
    items, rejects = SortedSpool(f"{base}.items"), SortedSpool(f"{base}.rejects")
    labels: set[str] = set()
    splits: set[str] = set()
    formats: Counter[str] = Counter()
    seen = 0

    def reject(sort_key: str, record: dict) -> None:
        nonlocal seen
        # the sort key as a JSON string body: no tab or newline, and all lines stay ASCII
        rejects.add(f"{json.dumps(sort_key)[1:-1]}\t{json.dumps(record)}\n")
        seen += 1

    reported = 0
    for part in task.parts:
        for name, item in iter_part(part, reject):
            items.add(item_line(name, item, task.sample_order))
            if fmt := format_of_name(item.uri):
                formats[fmt] += 1
            if item.label is not None:
                labels.add(item.label)
            if item.split is not None:
                splits.add(item.split)
            seen += 1
            if progress and seen - reported >= 4096:
                progress(seen - reported)
                reported = seen
    if progress and seen > reported:
        progress(seen - reported)
    result = ListResult(task.id, task.identity(), items.finish(), rejects.finish(), sorted(labels), sorted(splits),
                        dict(sorted(formats.items())))
    write_json_atomic(_receipt_path(task), asdict(result))
    return result


def listing_tasks(parts: list[ListingPart], sample_order: str, folder: str) -> list[ListTask]:
    """Parts grouped into listing tasks: up to TREE_PARTS_PER_TASK class folders each; loose
    files and manifest files (either may be huge) on their own."""
    groups: list[list[ListingPart]] = []
    for part in parts:
        if part.kind == "tree" and groups and groups[-1][0].kind == "tree" and len(groups[-1]) < TREE_PARTS_PER_TASK:
            groups[-1].append(part)
        else:
            groups.append([part])
    return [ListTask(f"list-{i:06d}", tuple(g), sample_order, folder) for i, g in enumerate(groups)]


# ---------------------------------------------------------------------------------------------
# 2. Planning ranges ("buckets") of the sort order


@dataclass(frozen=True)
class BucketTask:
    """Lines lo <= line < hi (None: open) of the sorted runs, planned into per-split plan files."""

    index: int
    lo: bytes | None
    hi: bytes | None
    runs: tuple[tuple[str, int], ...]   # (run file, byte offset to start reading at)
    split_by: str
    val_ratio: float
    max_shard_size: int
    folder: str


@dataclass(frozen=True)
class PlannedPart:
    """One split's items of one bucket, in order: plan lines, and their (offset, bound) pairs."""

    split: str
    path: str
    index_path: str
    count: int
    digest: int   # sum of the items' sha256 mod 2**256: identifies the items whatever the buckets


@dataclass
class BucketResult:
    index: int
    parts: dict[str, PlannedPart]
    rejects: str                # too_large records, one JSON per line
    num_rejected: int
    smallest: tuple[int, int, str] | None   # (bytes a shard needs, size, uri) of the smallest rejected
    rejected_formats: dict[str, int] = field(default_factory=dict)  # of those, per format_of_name


def _group(line: bytes) -> bytes:
    # "ORDER KEY NAMEHASH\t...": the lines of one key (before its collisions are resolved) share
    # everything up to the second space.
    return line[:line.index(b" ", line.index(b" ") + 1)]


def _in_range(path: str, offset: int, lo: bytes | None, hi: bytes | None) -> Iterator[bytes]:
    with open(path, "rb", buffering=1 << 16) as f:
        f.seek(offset)
        for line in f:
            if lo is not None and line < lo:
                continue
            if hi is not None and line >= hi:
                return
            yield line


class _SplitWriter:
    def __init__(self, split: str, path: str):
        self.split, self.path = split, path
        self.f = open(path, "wb", buffering=1 << 20)
        self.pairs = array("q")
        self.offset = 0
        self.digest = 0
        self._salt = split.encode() + b"\0"

    def add(self, line: bytes, bound: int) -> None:
        with naming_errors(self.path):
            self.f.write(line)
        self.pairs.extend((self.offset, bound))
        self.offset += len(line)
        self.digest += int.from_bytes(hashlib.sha256(self._salt + line).digest(), "big")

    def close(self) -> PlannedPart:
        index_path = self.path + ".idx"
        with naming_errors(self.path):
            self.f.close()
        with naming_errors(index_path), open(index_path, "wb") as f:
            self.pairs.tofile(f)
        return PlannedPart(self.split, self.path, index_path, len(self.pairs) // 2, self.digest % 2**256)


def plan_bucket(task: BucketTask, progress: Callable[[int], None] | None = None) -> BucketResult:
    """Merge one range of the runs; give colliding keys their suffix and every item its split and
    byte bound; reject what no shard of --max-shard-size can hold; write a plan file per split."""
    writers: dict[str, _SplitWriter] = {}
    rejects_path = os.path.join(task.folder, f"b{task.index:06d}.rejects")
    num_rejected, smallest, done = 0, None, 0
    rejected_formats: Counter[str] = Counter()
    merged = heapq.merge(*(_in_range(p, o, task.lo, task.hi) for p, o in task.runs))
    with open(rejects_path, "w", encoding="utf-8") as rejects:
        for _, group in itertools.groupby(merged, key=_group):
            lines = list(group)
            for line in lines:
                tab = line.index(b"\t")
                _, key, digest = line[:tab].decode("ascii").split(" ")
                payload = line[tab + 1:]
                uri, size, label, split, extra, bound = _decode(payload.decode("ascii"))
                if len(lines) > 1:  # keys that collide: each gets a hash of its full source name
                    key = f"{key}_{digest}"
                    bound = _sample_bytes_bound(SourceItem(key, uri, size, label, split, extra or {}))
                if task.split_by != "source":
                    split = split_of(key, task.val_ratio)
                if (need := bound + TAR_END_BOUND) > task.max_shard_size:
                    rejects.write("\t" + json.dumps({
                        "source": shown(uri), "reason": "too_large",
                        "detail": f"{size} bytes: a shard holding it needs --max-shard-size {need} or more "
                                  f"(tar headers, metadata, end record), not {task.max_shard_size}"}) + "\n")
                    num_rejected += 1
                    if fmt := format_of_name(uri):
                        rejected_formats[fmt] += 1
                    if smallest is None or need < smallest[0]:
                        smallest = (need, size, shown(uri))
                    continue
                if split not in writers:
                    writers[split] = _SplitWriter(split, os.path.join(task.folder, f"b{task.index:06d}-{split}.plan"))
                # [key, *payload]: keys are plain ASCII, so no JSON escaping is needed
                writers[split].add(b'["' + key.encode("ascii") + b'",' + payload[1:], bound)
            done += len(lines)
            if progress and done >= 16384:
                progress(done)
                done = 0
    if progress and done:
        progress(done)
    return BucketResult(task.index, {s: w.close() for s, w in writers.items()}, rejects_path, num_rejected, smallest,
                        dict(rejected_formats))


def bucket_tasks(runs: list[Run], num_items: int, cfg: ShardConfig, folder: str) -> list[BucketTask]:
    """Contiguous ranges of the sort order of about BUCKET_LINES items each, from the runs' indexes."""
    wanted = max(1, math.ceil(num_items / BUCKET_LINES))
    samples = sorted({_group(key.encode("ascii") + b"\t") for r in runs for key, _ in r.index})
    step = len(samples) / wanted
    cuts = sorted({samples[int(i * step)] for i in range(1, wanted)}) if samples else []
    bounds = [None, *cuts, None]
    keys = [[k.encode("ascii") for k, _ in r.index] for r in runs]
    tasks = []
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        starts = []
        for r, run_keys in zip(runs, keys, strict=True):
            # from the last indexed line below lo: every line before it is below lo too
            j = bisect_left(run_keys, lo) - 1 if lo is not None else -1
            starts.append((r.path, r.index[j][1] if j >= 0 else 0))
        tasks.append(BucketTask(i, lo, hi, tuple(starts), cfg.split_by, cfg.val_ratio, cfg.max_shard_size, folder))
    return tasks


# ---------------------------------------------------------------------------------------------
# 3. The cut and the identity of the plan


def cut_split(parts: list[PlannedPart], max_samples: int, max_bytes: int) -> list[tuple[list, int, int]]:
    """Shards of one split, from its planned parts in order: (slices, number of items, planned
    bytes) each. Greedy, like cutting one list: a shard takes items while it has fewer than
    `max_samples` and the next item's bound still fits in `max_bytes` with the tar end record."""
    shards: list[tuple[list, int, int]] = []
    slices: list[tuple[str, int, int]] = []
    count, size = 0, TAR_END_BOUND

    def close() -> None:
        nonlocal slices, count, size
        shards.append((slices, count, size))
        slices, count, size = [], 0, TAR_END_BOUND

    for part in parts:
        pairs = array("q")
        with open(part.index_path, "rb") as f:
            pairs.fromfile(f, 2 * part.count)
        offsets, bounds = pairs[0::2], pairs[1::2]
        total = array("q", itertools.accumulate(bounds, initial=0))
        i, n = 0, len(bounds)
        while i < n:
            # the largest j with total[j] - total[i] <= the bytes left, within the samples left
            j = min(n, i + max_samples - count, bisect_right(total, total[i] + (max_bytes - size)) - 1)
            if j <= i:
                if count == 0:  # cannot happen: items that fit in no shard were rejected
                    raise AssertionError(f"item {i} of {part.path} fits in no shard")
                close()
                continue
            slices.append((part.path, offsets[i], j - i))
            count, size = count + j - i, size + total[j] - total[i]
            i = j
            if i < n:
                close()
    if count:
        close()
    return shards


_NOT_PLANNED = {"workers", "overwrite", "out"}  # config fields that do not change the output


def plan_fingerprint(cfg: ShardConfig, classes: list[str], splits: dict[str, tuple[int, int]],
                     shards: list[ShardTask]) -> str:
    """Identity of the output: config fields that change bytes, the classes, every planned item
    (per split, an order-free sum of item hashes: the order follows from the items) and the cut.
    Workers and --overwrite are left out, so a resume may use a different worker count."""
    h = hashlib.sha256()
    h.update(json.dumps([PLAN_FORMAT, cfg.model_dump(mode="json", exclude=_NOT_PLANNED), classes],
                        sort_keys=True).encode())
    for split, (count, digest) in splits.items():
        h.update(f"{split}\0{count}\0{digest:064x}\n".encode())
    for t in shards:
        h.update(f"{t.name}\0{t.num_items}\n".encode())
    return h.hexdigest()


def check_split_names(splits: Iterable[str]) -> None:
    bad = sorted(s for s in splits if not re.fullmatch(r"[A-Za-z0-9_]+", s))
    if bad:
        raise UserError(f"split names {bad} from the source cannot name shard files; use letters, digits "
                        f"and '_' only (e.g. train, val, test)")


def split_order(splits: Iterable[str]) -> list[str]:
    """train, val, then the others by name: the order of shards and of the index."""
    splits = set(splits)
    return [s for s in SPLITS_BY_HASH if s in splits] + sorted(splits - set(SPLITS_BY_HASH))


# ---------------------------------------------------------------------------------------------
# The whole plan


class NoImages(UserError):
    """SRC lists no image at all (its other files, if any, are failures)."""


@dataclass
class Plan:
    """What the stage writes: every shard task, in order, and what planning found on the way."""

    tasks: list[ShardTask]
    fingerprint: str
    classes: list[str]
    num_listed: int                 # inputs listed, failures included
    num_rejected: int               # of those, failures found before any image was read
    reject_files: list[str]         # their records, in order: runs of listing tasks, then too_large files
    folder: str                     # where the plan lives (OUT/.vitpipe/plan)


@dataclass(frozen=True)
class MergeTask:
    runs: tuple[Run, ...]
    path: str


def merge_task(task: MergeTask, progress: Callable[[int], None] | None = None) -> Run:
    return merge_runs(list(task.runs), task.path)


def make_plan(layout: SourceLayout, cfg: ShardConfig, state: Path, workers: "Workers") -> Plan:
    """List SRC and plan its shards, on `workers` (this process, a pool, or Dask), in bounded memory.

    Finished listing tasks of an interrupted run of the same options are kept (state/listing);
    once the plan is made they are dropped, so the next run lists SRC afresh."""
    listing, planning = state / "listing", state / "plan"
    listing.mkdir(parents=True, exist_ok=True)
    tasks = listing_tasks(layout.parts, cfg.sample_order, str(listing))
    results: dict[str, ListResult] = {}
    parts_done = 0
    name = layout.uri.rstrip("/").rsplit("/", 1)[-1] or layout.uri
    with tqdm(unit="file", desc=f"list {name}", dynamic_ncols=True, file=sys.stderr) as bar:
        bar.set_postfix(parts=f"0/{len(layout.parts)}", refresh=False)
        for t, r in workers.map(list_task, tasks, progress=bar.update, done=_listed,
                                what=lambda t: f"the listing of {shown(t.parts[0].uri)}"):
            results[t.id] = r
            parts_done += len(t.parts)
            bar.set_postfix(parts=f"{parts_done}/{len(layout.parts)}", refresh=False)
            # no count of files before listing them: the ETA assumes the parts left hold as many as those done
            bar.total = bar.n if parts_done == len(layout.parts) else int(bar.n * len(layout.parts) / parts_done)
            bar.refresh()
    listed = [results[t.id] for t in tasks]
    num_items = sum(r.items.count for r in listed)
    num_rejected = sum(r.rejects.count for r in listed)
    if num_items == 0:
        raise NoImages(no_images_message(layout.uri, layout.kind, num_rejected))
    check_split_names({s for r in listed for s in r.splits})
    classes = sort_labels({label for r in listed for label in r.labels})

    shutil.rmtree(planning, ignore_errors=True)  # a plan an interrupted run left: made again below
    planning.mkdir(parents=True)
    text = json.dumps(classes)
    # named by its content: processes cache it by name (class_ids), and a later plan may differ
    classes_file = planning / f"classes-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    classes_file.write_text(text)
    runs = [r.items for r in listed if r.items.count]
    while len(runs) > FAN_IN:  # so that no planning range opens more than FAN_IN files
        merges = [MergeTask(tuple(runs[i:i + FAN_IN]), str(planning / f"runs-{len(runs)}-{i // FAN_IN}"))
                  for i in range(0, len(runs), FAN_IN)]
        merged = dict((t.path, r) for t, r in workers.map(merge_task, merges, what=lambda t: "merging listing runs"))
        runs = [merged[t.path] for t in merges]
    buckets = bucket_tasks(runs, num_items, cfg, str(planning))
    with tqdm(total=num_items, unit="img", desc="plan", dynamic_ncols=True, file=sys.stderr) as bar:
        planned = sorted((r for _, r in workers.map(plan_bucket, buckets, progress=bar.update, done=_planned,
                                                      what=lambda t: f"planning range {t.index}")),
                         key=lambda r: r.index)
    for r in listed:  # consumed; without its receipt a listing task runs again next time
        Path(_receipt_path_of(listing, r.id)).unlink(missing_ok=True)
        Path(r.items.path).unlink(missing_ok=True)
    for run in runs:
        Path(run.path).unlink(missing_ok=True)

    too_large = sum(b.num_rejected for b in planned)
    if too_large == num_items:
        # The images themselves may be far smaller than the cap: each sample also takes tar headers
        # and .cls/.json members, and every shard ends in a 10 KiB tar record.
        need, size, _ = min(b.smallest for b in planned if b.smallest is not None)
        raise UserError(f"no image in {layout.uri!r} fits in a shard of --max-shard-size {cfg.max_shard_size} "
                        f"bytes: one holding the smallest ({size} bytes) needs at least {need} bytes, "
                        f"for its tar headers, .cls/.json members and the 10 KiB tar end record; raise it, "
                        f"e.g. --max-shard-size 1GB")
    # pass-through: one image member extension for the set (pipeline.interop), from the names kept
    formats = sum((Counter(r.formats) for r in listed), Counter()) - sum((Counter(b.rejected_formats)
                                                                          for b in planned), Counter())
    options = EncodeOptions(cfg.encode, cfg.quality, cfg.resize, cfg.size, cfg.decode_check, cfg.max_image_pixels,
                            image_member_ext_of(formats) if cfg.encode == "none" else "")
    by_split: dict[str, list[PlannedPart]] = {}
    for b in planned:
        for split, part in b.parts.items():
            by_split.setdefault(split, []).append(part)
    shards, identity = [], {}
    for split in split_order(by_split):
        parts = by_split[split]
        identity[split] = (sum(p.count for p in parts), sum(p.digest for p in parts) % 2**256)
        for i, (slices, count, size) in enumerate(cut_split(parts, cfg.max_samples_per_shard, cfg.max_shard_size)):
            shards.append(ShardTask(f"{split}-{i:06d}.tar", split, tuple(slices), count, size, str(classes_file),
                                    cfg.out, options))
    return Plan(shards, plan_fingerprint(cfg, classes, identity, shards), classes, num_items + num_rejected,
                num_rejected + too_large, [r.rejects.path for r in listed] + [b.rejects for b in planned],
                str(planning))


def _listed(task: ListTask, r: ListResult) -> int:
    return r.items.count + r.rejects.count


def _planned(task: BucketTask, r: BucketResult) -> int:
    return sum(p.count for p in r.parts.values()) + r.num_rejected


def _receipt_path_of(folder: Path, task_id: str) -> Path:
    return Path(folder) / f"{task_id}.json"


def failure_records(plan: Plan) -> Iterator[dict]:
    """The failures planning found, in order: per listing task (sorted by path or row), then too_large."""
    for path in plan.reject_files:
        with open(path, "rb") as f:
            for line in f:
                yield json.loads(line[line.index(b"\t") + 1:])  # after the sort key (empty for too_large)


def tmp_name(name: str) -> str:
    """The temporary name `name` is written under: host and pid, so two writers of the same file
    (a task Dask re-ran while a worker it gave up on still runs) never write into one."""
    return f"{name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to `path` through a temporary file and a rename (the temporary removed on any failure)."""
    path = Path(path)
    tmp = path.with_name(tmp_name(path.name))
    try:
        with naming_errors(path):
            tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


