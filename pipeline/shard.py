"""The shard stage: an image collection -> WebDataset tar shards per split + `index.json`.

    vitpipe shard SRC OUT [--max-samples-per-shard N] [--max-shard-size 512MB] [--workers N] ...

How it works, and why:
1. List SRC (folder tree or manifest, `pipeline.sources`) into items sorted by key.
2. Plan: assign each item a split (hash of its key, or the source's split) and cut each split into
   shards by count and by a byte bound computed from file sizes. The plan depends only on the
   source and the config, never on workers or timing, so the output is byte-identical whatever
   runs it; bad files found later only leave their shard smaller (the index records exact counts).
3. Write each shard with `write_shard(task)`: a top-level function of a picklable `ShardTask`, so
   a process pool or a Dask executor can run it. It writes `NAME.tar.tmp-<pid>` and renames it to
   `NAME.tar` when complete, then drops a receipt in `OUT/.vitpipe/` (counts, sha256, failures).
4. Resume: a re-run with the same source and config skips shards with a receipt, so after a crash
   only missing shards are written. `--overwrite` starts over.
5. Write `failures.jsonl`, `stats.json` and, last and atomically, `index.json`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import ctypes
import fcntl
import hashlib
import json
import multiprocessing
import os
import queue
import re
import select
import shutil
import sys
import tarfile
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import fsspec
import yaml
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from tqdm.auto import tqdm

from pipeline.images import FORMAT_EXTENSIONS, BadImage, check_image, open_image, reencode
from pipeline.index import FORMAT, INDEX_NAME, VERSION
from pipeline.sources import Source, SourceItem, list_source, local_path
from vitpipe.config import ByteSize, StageConfig, add_config_arguments, config_from_args, save_config
from vitpipe.errors import UserError

STATE_DIR = ".vitpipe"          # plan fingerprint and per-shard receipts, for resuming
TMP_MARK = ".tmp-"              # NAME.tar.tmp-<pid>: never a final name
SPLITS_BY_HASH = ("train", "val")


class ShardConfig(StageConfig):
    """Options of `vitpipe shard SRC OUT`."""

    src: str = Field(description="image folder tree (SRC/<class>/...) or manifest (.csv/.jsonl/.parquet; "
                                 "local path or fsspec URL)")
    out: str = Field(description="output directory (local) for the shards, index.json, stats and failures")
    val_ratio: float = Field(0.1, ge=0.0, lt=1.0,
                             description="fraction of samples put in 'val' by a hash of their key "
                                         "(with --split-by hash)")
    split_by: Literal["hash", "source"] = Field(
        "hash", description="'hash': train/val by a hash of each key; 'source': splits from SRC/<split>/ "
                            "folders or the manifest's 'split' column")
    max_samples_per_shard: int = Field(10_000, gt=0, description="most samples in one shard")
    sample_order: Literal["shuffled", "sorted"] = Field(
        "shuffled", description="order of samples within a split: 'shuffled' by a hash of the key, so "
                                "every shard mixes classes (a training stream's shuffle buffer is finite); "
                                "'sorted' by key. Both are deterministic")
    max_shard_size: ByteSize = Field("1GB", validate_default=True,
                                     description="most bytes in one shard, with a unit (512MB, 1GiB); "
                                                 "with --encode it bounds the source bytes planned per shard")
    workers: int = Field(1, ge=1, description="processes writing shards in parallel (output is identical)")
    overwrite: bool = Field(False, description="delete a previous shard set in OUT and start over; "
                                               "without it, a re-run resumes an interrupted one")
    encode: Literal["none", "jpg", "webp", "png"] = Field(
        "none", description="'none' stores the source bytes untouched; else re-encode to this format")
    quality: int = Field(90, ge=1, le=100, description="jpg/webp quality when re-encoding")
    resize: Literal["none", "shorter", "longer", "center_crop"] = Field(
        "none", description="scale the shorter or longer side down to --size, or scale the shorter side "
                            "and crop the centre --size square (needs --encode); never upscales")
    size: int = Field(256, gt=0, description="target side length in pixels for --resize")
    decode_check: bool = Field(False, description="decode every pixel to catch corrupt data inside a "
                                                  "file (slower); always on when re-encoding")
    max_image_pixels: int = Field(89_478_485, gt=0,
                                  description="images with more pixels are skipped as decompression bombs")
    path_column: str | None = Field(None, description="manifest column with the path/URL "
                                                      "(default: the first of path, url, file, image...)")
    label_column: str | None = Field(None, description="manifest column with the class name "
                                                       "(default: label/class if present, else unlabelled)")

    @field_validator("resize")
    @classmethod
    def _resize_needs_encode(cls, resize: str, info: ValidationInfo) -> str:
        # A check on the field (encode is validated before it), not on the model: its error then
        # names 'resize' instead of an empty key; a custom error type drops pydantic's "Value error, ".
        if resize != "none" and info.data.get("encode") == "none":
            raise PydanticCustomError("resize_needs_encode", "needs re-encoding, which --encode none does not do: "
                                                             "add --encode jpg (or webp, png), or drop --resize")
        return resize


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class EncodeOptions:
    encode: str
    quality: int
    resize: str
    size: int
    decode_check: bool
    max_image_pixels: int


@dataclass(frozen=True)
class ShardTask:
    """Everything needed to write one shard, in any process: picklable, no open handles."""

    name: str                          # e.g. "train-000003.tar"
    split: str
    items: tuple[SourceItem, ...]
    class_ids: dict[str, int]
    out_dir: str
    options: EncodeOptions


@dataclass
class ShardResult:
    name: str
    split: str
    num_samples: int
    num_bytes: int
    sha256: str
    failures: list[dict] = field(default_factory=list)


def _tar_member_bytes(name_len: int, size: int) -> int:
    """Bytes a GNU tar member takes: header, long-name blocks if the name is > 100 chars, data."""
    blocks = 512 + -(-size // 512) * 512
    if name_len > 100:
        blocks += 512 + -(-(name_len + 1) // 512) * 512
    return blocks


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
    json_bound = _json_len_bound(item.uri) + _json_len_bound(item.label) + extra + 200
    key_len = len(item.key) + 6  # ".tiff" is the longest extension
    return (_tar_member_bytes(key_len, item.size) + _tar_member_bytes(key_len, 20)
            + _tar_member_bytes(key_len, json_bound))


# tarfile ends an archive with two zero blocks and pads it to a 20-block record.
_TAR_END_BOUND = 1024 + tarfile.RECORDSIZE


def split_of(key: str, val_ratio: float) -> str:
    """'val' for a stable `val_ratio` fraction of keys (first 64 bits of sha256), else 'train'."""
    if val_ratio <= 0.0:  # no key hashes below 0 (saves a hash per image on the common no-val run)
        return "train"
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_ratio else "train"


def _order_key(key: str) -> bytes:
    # Salted so the order within 'val' is not correlated with the split hash above.
    return hashlib.sha256(b"order:" + key.encode()).digest()


def plan_shards(source: Source, cfg: ShardConfig) -> list[ShardTask]:
    """Cut the sorted items into shards per split; depends only on the source and config.

    Files that cannot fit in a shard of --max-shard-size (with their tar headers and metadata)
    move from `source.items` to `source.rejected` as `too_large`: no shard could hold them within
    the cap, and a multi-GB '.jpg' is not an image a training set wants read into memory.
    """
    by_split: dict[str, list[tuple[SourceItem, int]]] = {}
    keep = []
    smallest = None  # (bytes of a shard holding only it, item): what the error below names
    for item in source.items:
        bound = _sample_bytes_bound(item)
        if (need := bound + _TAR_END_BOUND) > cfg.max_shard_size:
            source.rejected.append({"source": item.uri, "reason": "too_large",
                                    "detail": f"{item.size} bytes: a shard holding it needs --max-shard-size "
                                              f"{need} or more (tar headers, metadata, end record), "
                                              f"not {cfg.max_shard_size}"})
            if smallest is None or need < smallest[0]:
                smallest = (need, item)
            continue
        keep.append(item)
        split = item.split if cfg.split_by == "source" else split_of(item.key, cfg.val_ratio)
        by_split.setdefault(split, []).append((item, bound))
    if not keep:
        # The images themselves may be far smaller than the cap: each sample also takes tar headers
        # and .cls/.json members, and every shard ends in a 10 KiB tar record.
        need, item = smallest
        raise UserError(f"no image in {source.uri!r} fits in a shard of --max-shard-size {cfg.max_shard_size} "
                        f"bytes: one holding the smallest ({item.size} bytes) needs at least {need} bytes, "
                        f"for its tar headers, .cls/.json members and the 10 KiB tar end record; raise it, "
                        f"e.g. --max-shard-size 1GB")
    source.items = keep
    bad = sorted(s for s in by_split if not re.fullmatch(r"[A-Za-z0-9_]+", s))
    if bad:
        raise UserError(f"split names {bad} from the source cannot name shard files; use letters, digits "
                        f"and '_' only (e.g. train, val, test)")
    class_ids = {name: i for i, name in enumerate(source.classes)}
    options = EncodeOptions(cfg.encode, cfg.quality, cfg.resize, cfg.size, cfg.decode_check,
                            cfg.max_image_pixels)
    if cfg.sample_order == "shuffled":
        for group in by_split.values():
            group.sort(key=lambda pair: _order_key(pair[0].key))
    order = [s for s in SPLITS_BY_HASH if s in by_split] + sorted(s for s in by_split if s not in SPLITS_BY_HASH)
    return [ShardTask(f"{split}-{i:06d}.tar", split, tuple(group), class_ids, cfg.out, options)
            for split in order
            for i, group in enumerate(_cut(by_split[split], cfg.max_samples_per_shard, cfg.max_shard_size))]


def _cut(items: list[tuple[SourceItem, int]], max_samples: int, max_bytes: int) -> list[list[SourceItem]]:
    """Consecutive groups of at most `max_samples` items and `max_bytes` (by their byte bounds)."""
    groups: list[list[SourceItem]] = []
    current: list[SourceItem] = []
    size = _TAR_END_BOUND
    for item, b in items:
        if current and (len(current) >= max_samples or size + b > max_bytes):
            groups.append(current)
            current, size = [], _TAR_END_BOUND
        current.append(item)
        size += b
    if current:
        groups.append(current)
    return groups


_NOT_PLANNED = {"workers", "overwrite", "out"}  # config fields that do not change the output


def plan_fingerprint(cfg: ShardConfig, tasks: list[ShardTask]) -> str:
    """Identity of the output: config fields that change bytes + every planned item. Workers and
    --overwrite are left out, so a resume may use a different worker count."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model_dump(mode="json", exclude=_NOT_PLANNED), sort_keys=True).encode())
    for t in tasks:
        h.update(json.dumps([t.name, t.class_ids]).encode())
        # One line per item, fields NUL-separated (no field holds a NUL): cheap for millions of items.
        h.update("".join(f"{i.key}\0{i.uri}\0{i.size}\0{i.label}\0"
                         f"{json.dumps(i.extra, sort_keys=True) if i.extra else ''}\n" for i in t.items).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing one shard (runs in worker processes)


def _header_template() -> bytes:
    info = tarfile.TarInfo("x")
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.GNU_FORMAT)


_HEADER = _header_template()  # the fixed fields: mode 644, uid/gid 0, mtime 0, no user names
_MODE_UID_GID, _MTIME_FIELD, _HEADER_TAIL = _HEADER[100:124], _HEADER[136:148], _HEADER[156:]
# Checksum of the template with an empty name, size field zeros and the checksum field as spaces:
# a header's checksum is this plus the byte sums of its name and size fields.
_HEADER_SUM = sum(_MODE_UID_GID) + sum(_MTIME_FIELD) + 8 * 32 + sum(_HEADER_TAIL)
_PADDING = [bytes(n) for n in range(512)]  # zeros that round a member up to 512-byte blocks


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte GNU tar header of a regular file with the fixed fields; same bytes as
    `tarfile` writes, built without its general machinery (which dominates pass-through time)."""
    raw = name.encode()
    if len(raw) > 100 or size >= 8**11:  # long names, members > 8 GB: tarfile's GNU extensions
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.GNU_FORMAT)
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_HEADER_SUM + sum(raw) + sum(size_field))
    return b"".join((raw.ljust(100, b"\0"), _MODE_UID_GID, size_field, _MTIME_FIELD, checksum, _HEADER_TAIL))


class ShardTarWriter:
    """Writes samples as a tar with fixed header fields to an open file, hashing as it goes.

    Use as a context manager; `add([(name, data), ...])` per sample, then `close()` (end blocks,
    padding to a 10 KiB record, as tarfile and GNU tar do); `sha256` and `num_bytes` then describe
    the whole file. Samples are gathered into chunks of about `chunk_bytes`; with `background`
    a thread joins, writes and hashes each chunk (all three release the GIL) while the caller
    reads the next samples: one process then keeps about 1.5 cores busy. One hand-over per sample
    would cost more than the copy. Without `background` the caller does it: where several writer
    processes already share the cores (--workers N), a second thread per process only adds
    switching. With `writeback_every` (bytes), the kernel is asked to start writing the file to
    disk every so often (without waiting, as RocksDB's bytes_per_sync does), so the caller's
    final fsync has little left to wait for.
    """

    def __init__(self, f, *, chunk_bytes: int = 1 << 20, writeback_every: int | None = None,
                 background: bool = True, depth: int = 8):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0
        self._chunk: list[bytes] = []
        self._chunk_size = 0
        self._chunk_bytes = chunk_bytes
        self._writeback_every = writeback_every
        self._unsynced = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._drain, name="shard-sink", daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    def _write(self, pieces: list[bytes]) -> None:
        chunk = b"".join(pieces)
        self._f.write(chunk)
        self.sha256.update(chunk)
        self._unsynced += len(chunk)
        if self._writeback_every and self._unsynced >= self._writeback_every:
            self._f.flush()
            start_writeback(self._f.fileno())
            self._unsynced = 0

    def _drain(self) -> None:
        while (pieces := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(pieces)
                except BaseException as e:  # noqa: BLE001 - re-raised in the writing thread
                    self._error = e

    def _flush_chunk(self) -> None:
        if self._error is not None:
            raise self._error
        if self._chunk:
            if self._thread is None:
                self._write(self._chunk)
            else:
                self._queue.put(self._chunk)
            self._chunk, self._chunk_size = [], 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """Append one sample's members (name, bytes), in order."""
        for name, data in members:
            size = len(data)
            header, pad = tar_header(name, size), _PADDING[-size % 512]
            self._chunk += (header, data, pad)
            n = len(header) + size + len(pad)
            self._chunk_size += n
            self.num_bytes += n
        if self._chunk_size >= self._chunk_bytes:
            self._flush_chunk()

    def close(self) -> None:
        end = 1024 + -(self.num_bytes + 1024) % tarfile.RECORDSIZE
        self._chunk.append(bytes(end))
        self.num_bytes += end
        self._flush_chunk()
        self._stop()
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> "ShardTarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._stop()


def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk without waiting (Linux `sync_file_range`); a
    no-op elsewhere. Durability still comes from the fsync at the end; this only spreads the
    disk writes over the run, so that fsync does not stall it."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # an error only means no head start


def read_bytes(uri: str, *, size: int = 0, attempts: int = 3) -> bytes:
    """Read a local path or fsspec URL; remote reads are retried (transient network errors).
    `size`: the expected size of a local file, read with one system call when it is right."""
    if (path := local_path(uri)) is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.read(fd, size + 1) if size else b""
            if not size or len(data) != size:  # unknown size, a short read, or a file changed since listed
                data += b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            return data
        finally:
            os.close(fd)
    for attempt in range(attempts):
        try:
            with fsspec.open(uri, "rb") as f:
                return f.read()
        except (FileNotFoundError, PermissionError):
            raise
        except Exception:  # noqa: BLE001 - any network error may be transient
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _fetch(item: SourceItem) -> tuple[bytes, str] | Exception:
    """(bytes, sha256) of an item, or the exception reading it raised (reported by _sample)."""
    try:
        data = read_bytes(item.uri, size=item.size)
    except Exception as e:  # noqa: BLE001 - any read error means "skip and report"
        return e
    return data, hashlib.sha256(data).hexdigest()


def encode_sample(item: SourceItem, data: bytes, digest: str, class_ids: dict[str, int],
                  opt: EncodeOptions) -> list[tuple[str, bytes]]:
    """The tar members of one sample (image, cls, json), or BadImage if the input is unusable."""
    if opt.encode != "none":
        img, info = open_image(data, max_pixels=opt.max_image_pixels)
        payload, _, _ = reencode(img, fmt=opt.encode, quality=opt.quality, resize=opt.resize, size=opt.size)
        ext = opt.encode
    else:
        info = check_image(data, max_pixels=opt.max_image_pixels, decode=opt.decode_check)
        payload, ext = data, FORMAT_EXTENSIONS[info.format]
    meta = {"source": item.uri, "width": info.width, "height": info.height, "format": info.format,
            "label": item.label, "sha256": digest, "extra": item.extra}
    members = [(f"{item.key}.{ext}", payload)]
    if item.label is not None:
        members.append((f"{item.key}.cls", str(class_ids[item.label]).encode()))
    members.append((f"{item.key}.json", _JSON.encode(meta).encode()))
    return members


_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False) builds one per call


# One sample, ready for the tar: its members, or the failure record of a skipped input.
Sample = list[tuple[str, bytes]] | dict


def _sample(item: SourceItem, fetched: tuple[bytes, str] | Exception, class_ids: dict[str, int],
            opt: EncodeOptions) -> Sample:
    try:
        if isinstance(fetched, Exception):
            raise BadImage("unreadable", f"{type(fetched).__name__}: {fetched}")
        data, digest = fetched
        try:
            return encode_sample(item, data, digest, class_ids, opt)
        except BadImage:
            raise
        except Exception as e:  # noqa: BLE001 - odd files trip decoders in odd ways
            raise BadImage("corrupt", f"{type(e).__name__}: {e}") from None
    except BadImage as e:
        return {"source": item.uri, "reason": e.reason, "detail": e.detail}


# Local files are read in the calling thread while reads are fast (page cache, local SSD): reader
# threads would only fight over the GIL. When the first PROBE_FILES reads of a shard average at least
# than SLOW_READ_S each (a network filesystem, a disk seeking), reads move to threads that keep
# READ_THREADS files in flight; remote URLs always use them.
PROBE_FILES = 32
SLOW_READ_S = 0.0005
READ_THREADS = {"local": 8, "remote": 16}


def iter_samples(items: Iterable[SourceItem], class_ids: dict[str, int], opt: EncodeOptions,
                 *, threads: bool | None = None) -> Iterator[tuple[SourceItem, Sample]]:
    """(item, sample) for each item, in order. `threads`: force (True) or forbid (False) reading
    on threads; None decides as described above."""
    items = list(items)
    remote = any(local_path(it.uri) is None for it in items)
    done, waited = 0, 0.0
    if not (remote or threads):
        for item in items:
            if threads is None and done == PROBE_FILES:
                if waited >= SLOW_READ_S * done:
                    break  # slow storage: the rest on reader threads
                threads = False
            start = time.perf_counter()
            fetched = _fetch(item)
            waited += time.perf_counter() - start
            yield item, _sample(item, fetched, class_ids, opt)
            done += 1
        if done == len(items):
            return
    n = READ_THREADS["remote" if remote else "local"]
    with cf.ThreadPoolExecutor(n, thread_name_prefix="shard-read") as pool:
        window: deque = deque()
        for item in items[done:]:
            window.append((item, pool.submit(_fetch, item)))
            if len(window) >= 2 * n:
                item, fut = window.popleft()
                yield item, _sample(item, fut.result(), class_ids, opt)
        while window:
            item, fut = window.popleft()
            yield item, _sample(item, fut.result(), class_ids, opt)


def encode_chunk(items: tuple[SourceItem, ...], class_ids: dict[str, int], opt: EncodeOptions) -> list[Sample]:
    """Samples of a run of items, for a pool worker (re-encoding is CPU-bound, so a shard's
    items are spread over the pool and the parent writes the shard in order)."""
    return [s for _, s in iter_samples(items, class_ids, opt)]


def write_shard(task: ShardTask, progress: Callable[[int, int], None] | None = None,
                samples: Iterable[tuple[SourceItem, Sample]] | None = None, *,
                background: bool = True) -> ShardResult:
    """Write one shard atomically (tmp + fsync + rename) and its receipt; skip bad inputs.

    `progress(samples_done, failures)` is called per input when running in-process. `samples`:
    the task's samples made elsewhere (a pool encoding them), in order; by default made here.
    `background`: write and hash on a second thread (see ShardTarWriter); pool workers, which
    share the cores with each other, pass False.
    """
    out = Path(task.out_dir)
    final = out / task.name
    tmp = out / f"{task.name}{TMP_MARK}{os.getpid()}"
    failures: list[dict] = []
    n = 0
    if samples is None:
        samples = iter_samples(task.items, task.class_ids, task.options)
    try:
        with open(tmp, "wb") as f, ShardTarWriter(f, writeback_every=4 << 20, background=background) as writer:
            for _, sample in samples:
                if isinstance(sample, dict):
                    failures.append(sample)
                else:
                    writer.add(sample)
                    n += 1
                if progress:
                    progress(1, len(failures))
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    result = ShardResult(task.name, task.split, n, writer.num_bytes, writer.sha256.hexdigest(), failures)
    _write_json_atomic(out / STATE_DIR / f"{task.name}.json", asdict(result))
    return result


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The stage


_OWN_FILES = (INDEX_NAME, "stats.json", "failures.jsonl", "config.yaml", STATE_DIR)


def _is_own(name: str) -> bool:
    return name in _OWN_FILES or name.endswith(".tar") or TMP_MARK in name


def _prepare_out(out: Path, fingerprint: str, cfg: ShardConfig) -> None:
    """Check OUT before any work: empty, our own earlier run (resume), or refuse."""
    entries = sorted(p.name for p in out.iterdir())
    plan_file = out / STATE_DIR / "plan.json"
    ours = plan_file.exists() or (out / INDEX_NAME).exists()
    if entries and not ours:
        raise UserError(f"OUT {str(out)!r} is not empty and holds no vitpipe shard set "
                        f"({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); "
                        f"choose an empty or new directory")
    if entries and cfg.overwrite:
        foreign = [e for e in entries if not _is_own(e)]
        if foreign:
            raise UserError(f"--overwrite would delete a shard set in {str(out)!r}, but it also holds "
                            f"other files ({', '.join(foreign[:5])}); move them away or choose another OUT")
        for e in entries:
            p = out / e
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif entries:
        previous = json.loads(plan_file.read_text()).get("fingerprint") if plan_file.exists() else None
        if previous != fingerprint:
            raise UserError(f"OUT {str(out)!r} holds another shard set: {_what_differs(out, cfg)}; "
                            f"pass --overwrite to replace it, or choose another OUT")
    (out / STATE_DIR).mkdir(exist_ok=True)
    for p in out.iterdir():  # leftovers of a killed run: never final names, safe to drop
        if TMP_MARK in p.name:
            p.unlink()
    _write_json_atomic(plan_file, {"fingerprint": fingerprint})


def _what_differs(out: Path, cfg: ShardConfig) -> str:
    """How `cfg` differs from the config that wrote OUT (its config.yaml, saved with the plan)."""
    try:
        before = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        before = None
    if not isinstance(before, dict):
        return "different source or options"
    now = cfg.model_dump(mode="json", exclude=_NOT_PLANNED)
    changed = [f"{'SRC' if k == 'src' else '--' + k.replace('_', '-')} was {before.get(k)!r}, now {v!r}"
               for k, v in now.items() if before.get(k, v) != v]
    if changed:
        return "its " + "; ".join(changed)
    return "same options, but the files in SRC changed since (added, removed or resized)"


def _receipt(out: Path, task: ShardTask) -> ShardResult | None:
    """The result of a shard finished by an earlier run, if its file is there and intact in size."""
    path = out / STATE_DIR / f"{task.name}.json"
    try:
        r = ShardResult(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    tar = out / task.name
    if not tar.exists() or tar.stat().st_size != r.num_bytes:
        return None
    return r


def _run_tasks(tasks: list[ShardTask], workers: int, executor: cf.Executor | None,
               bar: tqdm, failures: int, shards: int) -> dict[str, ShardResult]:
    """Run write_shard over tasks: in-process, on a process pool, or on a given executor.
    `failures` and `shards`: counts so far (listing, resumed shards), shown on the progress bar.

    With our own pool, pass-through writes whole shards in the workers (reading and hashing the
    bytes is the work; shipping them to the parent would double it), while re-encoding spreads
    each shard's samples over the workers in chunks and writes the shards here, in order: it is
    CPU-bound and shrinks the data, and every worker stays busy even when there are fewer shards
    than workers."""
    results: dict[str, ShardResult] = {}

    def shard_done(r: ShardResult) -> None:
        nonlocal failures
        failures += len(r.failures)
        results[r.name] = r
        bar.set_postfix(failures=failures, shards=shards + len(results), refresh=False)

    def ticker() -> Callable[[int, int], None]:
        base, shown = failures, failures

        def tick(k: int, f: int) -> None:
            nonlocal shown
            bar.update(k)
            if base + f != shown:  # set_postfix per sample would cost more than tar's work
                shown = base + f
                bar.set_postfix(failures=shown, shards=shards + len(results), refresh=False)
        return tick

    if executor is None and (workers == 1 or (len(tasks) == 1 and tasks[0].options.encode == "none")):
        # one pass-through shard gains nothing from a pool: its own writer thread is the parallelism
        for t in tasks:
            shard_done(write_shard(t, ticker()))
        return results

    if executor is None and tasks and tasks[0].options.encode != "none":
        pool = _process_pool(workers, initializer=_worker_init, initargs=(os.getpid(), None))
        try:
            with _explain_dead_workers(workers):
                for t, samples in _pooled_samples(pool, tasks, workers):
                    shard_done(write_shard(t, ticker(), samples))
        finally:
            pool.shutdown(cancel_futures=True)
        return results

    # Our own pool reports per-sample progress through a queue (batched by time); a foreign
    # executor (Dask) may run on other hosts, so there the bar moves once per finished shard.
    own_pool = executor is None
    reports = multiprocessing.get_context("forkserver").SimpleQueue() if own_pool else None
    pool = executor or _process_pool(workers, initializer=_worker_init, initargs=(os.getpid(), reports))
    reported: dict[str, int] = {}
    try:
        futures = {pool.submit(write_shard, t, _QueueProgress(t.name) if own_pool else None, background=False): t
                   for t in tasks}
        pending = set(futures)
        while pending:
            finished, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            while reports is not None and not reports.empty():
                name, done, _ = reports.get()
                bar.update(done - reported.get(name, 0))
                reported[name] = done
            for fut in finished:
                t = futures[fut]
                with _explain_dead_workers(workers):
                    r = fut.result()
                bar.update(len(t.items) - reported.get(t.name, 0))
                reported[t.name] = len(t.items)
                shard_done(r)
    finally:
        if own_pool:
            pool.shutdown(cancel_futures=True)
    return results


@contextlib.contextmanager
def _explain_dead_workers(workers: int):
    """A pool process killed from outside (most often by the kernel for memory) breaks the pool;
    say what that means instead of a bare BrokenProcessPool traceback."""
    try:
        yield
    except cf.process.BrokenProcessPool as e:
        raise UserError(f"a --workers process died before finishing its work ({e}); most often the system "
                        f"killed it for memory. Re-run the same command to resume from the finished shards, "
                        f"with fewer --workers than {workers} if memory is short") from e


def _process_pool(workers: int, **kwargs) -> cf.ProcessPoolExecutor:
    # forkserver, not fork: the parent has threads (tqdm's monitor, fsspec's event loop), and a
    # fork taken while one of them holds a lock can hang the child. The server imports this module
    # once, so each worker starts without paying for the imports (unless a forkserver was already
    # running in this process, e.g. started by a DataLoader: then they import it themselves).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return cf.ProcessPoolExecutor(workers, mp_context=ctx, **kwargs)


ENCODE_CHUNK = 16  # samples per pool task when re-encoding: enough to hide the hand-over


def _pooled_samples(pool: cf.Executor, tasks: list[ShardTask], workers: int
                    ) -> Iterator[tuple[ShardTask, Iterator[tuple[SourceItem, Sample]]]]:
    """(task, its samples in order) per task, encoded on the pool in chunks of ENCODE_CHUNK items.
    Chunks are submitted across shard boundaries, 4 per worker ahead of the writer, so the pool
    does not idle while a shard is closed. Each task's samples must be consumed before the next."""
    chunks = ((t, t.items[i:i + ENCODE_CHUNK]) for t in tasks for i in range(0, len(t.items), ENCODE_CHUNK))
    inflight: deque[cf.Future] = deque()

    def top_up() -> None:
        while len(inflight) < 4 * workers and (nxt := next(chunks, None)) is not None:
            t, items = nxt
            inflight.append(pool.submit(encode_chunk, items, t.class_ids, t.options))

    def samples(t: ShardTask) -> Iterator[tuple[SourceItem, Sample]]:
        for i in range(0, len(t.items), ENCODE_CHUNK):
            top_up()
            yield from zip(t.items[i:i + ENCODE_CHUNK], inflight.popleft().result())

    for t in tasks:
        yield t, samples(t)


_reports = None  # in pool workers: the parent's progress queue


def _worker_init(parent: int, reports) -> None:
    global _reports
    _reports = reports
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(pid: int) -> None:
    """End this pool worker when process `pid` ends. Workers are children of the forkserver, not
    of the stage's process, so when that is killed (SIGKILL, OOM) nothing else would stop them:
    they would wait for work forever. A half-written shard stays under its temporary name."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: poll instead
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
    select.select([fd], [], [])  # readable once the process has exited
    os._exit(1)


class _QueueProgress:
    """Picklable progress callback for pool workers: sends (shard, samples done, failures) to the
    parent at most every 0.5 s (a queue message per sample would cost more than the sample)."""

    def __init__(self, name: str):
        self.name = name
        self.done, self.last = 0, 0.0

    def __call__(self, k: int, failures: int) -> None:
        self.done += k
        now = time.monotonic()
        if now - self.last >= 0.5 and _reports is not None:
            self.last = now
            _reports.put((self.name, self.done, failures))


def shard(cfg: ShardConfig, *, executor: cf.Executor | None = None) -> dict:
    """Shard `cfg.src` into `cfg.out` (resuming an earlier run of the same config); returns stats.

    `executor` (e.g. `dask.distributed.Client.get_executor()`) runs the shard writers instead of a
    local process pool; OUT must then be a filesystem the executor's workers share. With
    `workers > 1` the pool starts processes by forkserver, so a script calling this needs the
    usual `if __name__ == "__main__":` guard.
    """
    start = time.perf_counter()
    if "://" in cfg.out and not cfg.out.startswith("file://"):
        raise UserError(f"OUT {cfg.out!r}: shards are written to a local (or mounted shared) directory; "
                        f"copy them to object storage afterwards")
    out = Path(cfg.out.removeprefix("file://")).absolute()
    # A local SRC counts by its real absolute path (URLs as written): the plan, and so resuming,
    # then holds however it is spelled (./src/, src, /abs/src) and from whatever directory.
    src = os.path.realpath(cfg.src) if local_path(cfg.src) == cfg.src else cfg.src
    cfg = cfg.model_copy(update={"out": str(out), "src": src})
    source = list_source(cfg.src, path_column=cfg.path_column, label_column=cfg.label_column,
                         split_from_source=cfg.split_by == "source")
    tasks = plan_shards(source, cfg)
    fingerprint = plan_fingerprint(cfg, tasks)
    with _exclusive(out):
        _prepare_out(out, fingerprint, cfg)
        save_config(cfg, out / "config.yaml")
        return _write_all(cfg, out, source, tasks, fingerprint, executor, start)


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold an exclusive lock on OUT: a second run on the same OUT would delete this one's
    temporary shards and race on the receipts, so it is refused up front instead."""
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {str(out)!r} is a file; pass a directory (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another 'vitpipe shard' is writing to {str(out)!r}; wait for it to finish "
                            f"or choose another OUT") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_all(cfg: ShardConfig, out: Path, source: Source, tasks: list[ShardTask], fingerprint: str,
               executor: cf.Executor | None, start: float) -> dict:
    """Write the shards not done yet, then failures.jsonl, stats.json and index.json (last)."""
    done = {t.name: r for t in tasks if (r := _receipt(out, t)) is not None}
    todo = [t for t in tasks if t.name not in done]
    total = sum(len(t.items) for t in tasks)
    resumed = sum(len(t.items) for t in tasks if t.name in done)
    with tqdm(total=total, initial=resumed, unit="img", desc=f"shard {Path(cfg.src).name or cfg.src}",
              dynamic_ncols=True, file=sys.stderr) as bar:
        known_failures = len(source.rejected) + sum(len(r.failures) for r in done.values())
        bar.set_postfix(failures=known_failures, shards=len(done), refresh=False)
        written = _run_tasks(todo, cfg.workers, executor, bar, known_failures, len(done))
    results = [done.get(t.name) or written[t.name] for t in tasks]
    duration = time.perf_counter() - start

    failures = source.rejected + [f for r in results for f in r.failures]
    with open(out / "failures.jsonl", "w") as f:
        for rec in failures:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    index = build_index(source, cfg, results, len(failures), fingerprint)
    n_written = sum(written[t.name].num_samples for t in todo)
    stats = {
        "num_samples": index["totals"]["num_samples"],
        "num_failures": len(failures),
        "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "num_shards": len(tasks),
        "num_shards_written": len(todo),
        "num_shards_resumed": len(done),
        "num_bytes": index["totals"]["num_bytes"],
        "splits": {s: v["num_samples"] for s, v in index["splits"].items()},
        "duration_s": round(duration, 3),
        "images_per_s": round(n_written / duration, 1) if duration > 0 else None,
        "workers": cfg.workers,
    }
    _write_json_atomic(out / "stats.json", stats)
    _write_json_atomic(out / INDEX_NAME, index)  # last: its presence means the set is complete
    if failures and not stats["num_samples"]:
        # Written anyway, so the reasons are on record, but an empty shard set is no success:
        # a script or flow must not go on to train on it.
        reason, n = Counter(f["reason"] for f in failures).most_common(1)[0]
        example = next(f for f in failures if f["reason"] == reason)
        raise UserError(f"no image could be read: all {len(failures)} inputs failed, most often {reason} "
                        f"({n} of {len(failures)}, e.g. {example['source']}: {example['detail']}); "
                        f"see {out / 'failures.jsonl'} for each file and its reason")
    splits = " / ".join(f"{s} {n}" for s, n in stats["splits"].items())
    print(f"sharded {stats['num_samples']} images ({splits}) into {len(tasks)} shards "
          f"[{len(todo)} written, {len(done)} resumed], {len(failures)} failures, "
          f"{stats['num_bytes'] / 1e6:.1f} MB in {duration:.1f}s -> {out}")
    return stats


def build_index(source: Source, cfg: ShardConfig, results: list[ShardResult], num_failures: int,
                fingerprint: str) -> dict:
    """The index.json contract (docs/formats.md) from the shard results, in plan order."""
    splits: dict[str, dict] = {}
    for r in results:
        s = splits.setdefault(r.split, {"num_samples": 0, "num_bytes": 0, "shards": []})
        s["shards"].append({"name": r.name, "num_samples": r.num_samples, "num_bytes": r.num_bytes,
                            "sha256": r.sha256})
        s["num_samples"] += r.num_samples
        s["num_bytes"] += r.num_bytes
    return {
        "format": FORMAT,
        "version": VERSION,
        "classes": source.classes,
        "splits": splits,
        "totals": {"num_samples": sum(s["num_samples"] for s in splits.values()),
                   "num_bytes": sum(s["num_bytes"] for s in splits.values()),
                   "num_shards": len(results), "num_failures": num_failures},
        "source": {**source.describe(), "plan_sha256": fingerprint},
        "config": cfg.model_dump(mode="json"),
    }


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ShardConfig, positional=("src", "out"))


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(ShardConfig, args)
    shard(cfg)
    return 0
