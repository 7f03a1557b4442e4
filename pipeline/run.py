"""Running the shard stage's tasks: reading and checking each input, writing each shard, on one or many processes.

`write_shard(task)` is a top-level function of a picklable `ShardTask`, so a process pool or a Dask
executor can run it. It writes `NAME.tar.tmp-<host>-<pid>`, renames it to `NAME.tar` when complete,
then drops a receipt in `OUT/.vitpipe/` (counts, sha256, failures) that a resumed run trusts. Bad
inputs are skipped and reported in the receipt, never fatal. `Workers` is where the tasks of every
phase run (this process, a process pool, or a given executor such as Dask's), and `run_tasks`
writes the shards on it with a progress bar.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import multiprocessing
import os
import select
import threading
import time
from collections import Counter, deque
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import fsspec
from tqdm.auto import tqdm

from pipeline.images import FORMAT_EXTENSIONS, BadImage, check_image, open_image, reencode
from pipeline.interop import write_dali_index
from pipeline.plan import EncodeOptions, ShardResult, ShardTask, class_ids, naming_errors, tmp_name, write_json_atomic
from pipeline.sources import SourceItem, local_path, shown
from pipeline.tar_writer import ShardTarWriter
from vitpipe.errors import UserError

STATE_DIR = ".vitpipe"          # plan fingerprint and per-shard receipts, for resuming


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
        payload, ext = data, opt.image_ext or FORMAT_EXTENSIONS[info.format]  # one name per set: HF datasets
    meta = {"source": shown(item.uri), "width": info.width, "height": info.height, "format": info.format,
            "label": item.label, "sha256": digest, "extra": item.extra}
    if info.conversions:  # what turns its values into 8-bit L/RGB (docs/formats.md, "Image modes")
        meta["conversions"] = list(info.conversions)
    members = [(f"{item.key}.{ext}", payload)]
    if item.label is not None:
        members.append((f"{item.key}.cls", str(class_ids[item.label]).encode()))
    members.append((f"{item.key}.json", _JSON.encode(meta).encode()))
    return members


_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False) builds one per call


def _conversions(members: list[tuple[str, bytes]]) -> list[str]:
    """The `conversions` encode_sample recorded in a sample's .json (its last member); most have none."""
    meta = members[-1][1]
    return json.loads(meta).get("conversions", []) if b'"conversions"' in meta else []


# One sample, ready for the tar: its members, or the failure record of a skipped input.
Sample = list[tuple[str, bytes]] | dict


def _sample(item: SourceItem, fetched: tuple[bytes, str] | Exception, class_ids: dict[str, int],
            opt: EncodeOptions) -> Sample:
    try:
        if isinstance(fetched, Exception):
            raise BadImage("unreadable", shown(f"{type(fetched).__name__}: {fetched}"))
        data, digest = fetched
        try:
            return encode_sample(item, data, digest, class_ids, opt)
        except BadImage:
            raise
        except Exception as e:  # noqa: BLE001 - odd files trip decoders in odd ways
            raise BadImage("corrupt", f"{type(e).__name__}: {e}") from None
    except BadImage as e:
        return {"source": shown(item.uri), "reason": e.reason, "detail": shown(e.detail)}


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


def encode_chunk(items: list[SourceItem], classes_file: str, opt: EncodeOptions) -> list[Sample]:
    """Samples of a run of items, for a pool worker (re-encoding is CPU-bound, so a shard's
    items are spread over the pool and the parent writes the shard in order)."""
    return [s for _, s in iter_samples(items, class_ids(classes_file), opt)]


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
    tmp = out / tmp_name(task.name)
    failures: list[dict] = []
    conversions: Counter[str] = Counter()
    n = 0
    layout: list[list[tuple[str, int]]] = []  # (name, size) of each member: DALI's index, without a re-read
    if samples is None:
        samples = iter_samples(task.load_items(), task.class_ids, task.options)
    try:
        with naming_errors(final), open(tmp, "wb") as f, \
                ShardTarWriter(f, writeback_every=4 << 20, background=background) as writer:
            for _, sample in samples:
                if isinstance(sample, dict):
                    failures.append(sample)
                else:
                    writer.add(sample)
                    layout.append([(name, len(data)) for name, data in sample])
                    n += 1
                    conversions.update(_conversions(sample))
                if progress:
                    progress(1, len(failures))
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        write_dali_index(final, layout)  # before the receipt: a shard with a receipt has its index
    finally:
        if tmp.exists():
            tmp.unlink()
    result = ShardResult(task.name, task.split, n, writer.num_bytes, writer.sha256.hexdigest(), failures,
                         num_failures=len(failures), conversions=dict(sorted(conversions.items())))
    write_json_atomic(out / STATE_DIR / f"{task.name}.json", asdict(result))
    return result


def receipt(out: Path, task: ShardTask) -> ShardResult | None:
    """The result of a shard finished by an earlier run, if its file is there and intact in size;
    without its failure records (they stay in the receipt: see `receipt_failures`)."""
    path = out / STATE_DIR / f"{task.name}.json"
    try:
        r = ShardResult(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    tar = out / task.name
    if not tar.exists() or tar.stat().st_size != r.num_bytes or r.num_failures != len(r.failures):
        return None
    r.failures = []
    return r


def receipt_failures(out: Path, name: str) -> list[dict]:
    return json.loads((out / STATE_DIR / f"{name}.json").read_text())["failures"]


class Workers:
    """Where the stage's tasks run (listing, planning, writing): in this process (`n == 1`), on a
    process pool of `n` (started on first use, kept for every phase), or on an executor given by
    the caller (a Dask client's). `map` runs `fn(task, progress)` over tasks, results as they come."""

    def __init__(self, n: int, executor: cf.Executor | None = None):
        self.n, self.executor = n, executor
        self.reports = None
        self._pool: cf.ProcessPoolExecutor | None = None

    @property
    def in_process(self) -> bool:
        return self.executor is None and self.n == 1

    @property
    def own_pool(self) -> bool:
        return self.executor is None

    def pool(self) -> cf.Executor:
        if self.executor is not None:
            return self.executor
        if self._pool is None:
            self.reports = multiprocessing.get_context("forkserver").SimpleQueue()
            self._pool = _process_pool(self.n, initializer=_worker_init, initargs=(os.getpid(), self.reports))
        return self._pool

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable, tasks: list, *, progress: Callable[[int], None] | None = None,
            done: Callable[[object, object], int] | None = None, what: Callable[[object], str] = str
            ) -> Iterator[tuple[object, object]]:
        """(task, fn(task, progress)) per task as each finishes. `progress(k)`: k more units done,
        fed live in-process and from our pool (through a queue), else when each task ends, from
        `done(task, result)` (the task's units in all). `what(task)` names a task in errors."""
        if self.in_process:
            for t in tasks:
                yield t, fn(t, progress)
            return
        pool = self.pool()
        live = self.own_pool and progress is not None
        futures = {pool.submit(fn, t, _QueueProgress(i) if live else None): (i, t) for i, t in enumerate(tasks)}
        reported: dict[int, int] = {}
        pending = set(futures)
        try:
            while pending:
                finished, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                if live:
                    for key, count, _ in self.drain():
                        progress(count - reported.get(key, 0))
                        reported[key] = count
                for fut in finished:
                    i, t = futures[fut]
                    with explain_lost_workers(self.n, what(t)):
                        result = fut.result()
                    if progress is not None and done is not None:
                        progress(done(t, result) - reported.get(i, 0))
                        reported[i] = done(t, result)
                    yield t, result
        finally:
            for fut in pending:  # a failed task ends the phase: the others need not run on (Dask's would)
                fut.cancel()

    def drain(self) -> list[tuple]:
        """Progress messages our pool's workers sent since the last call."""
        out = []
        while self.reports is not None and not self.reports.empty():
            out.append(self.reports.get())
        return out


def run_tasks(tasks: list[ShardTask], workers: Workers, bar: tqdm, failures: int, shards: int
              ) -> dict[str, ShardResult]:
    """Write the shards of `tasks` on `workers`; returns their results (failure records left in the
    receipts). `failures` and `shards`: counts so far (listing, resumed shards), shown on the bar.

    With our own pool, pass-through writes whole shards in the workers (reading and hashing the
    bytes is the work; shipping them to the parent would double it), while re-encoding spreads
    each shard's samples over the workers in chunks and writes the shards here, in order: it is
    CPU-bound and shrinks the data, and every worker stays busy even when there are fewer shards
    than workers."""
    results: dict[str, ShardResult] = {}

    def shard_done(r: ShardResult) -> None:
        nonlocal failures
        failures += r.num_failures
        r.failures = []  # on record in the receipt; the run keeps only counts, whatever its size
        results[r.name] = r
        bar.set_postfix(failures=failures, shards=shards + len(results), refresh=False)

    def ticker() -> Callable[[int, int], None]:
        base, shown_now = failures, failures

        def tick(k: int, f: int) -> None:
            nonlocal shown_now
            bar.update(k)
            if base + f != shown_now:  # set_postfix per sample would cost more than tar's work
                shown_now = base + f
                bar.set_postfix(failures=shown_now, shards=shards + len(results), refresh=False)
        return tick

    if workers.in_process or (workers.own_pool and len(tasks) == 1 and tasks[0].options.encode == "none"):
        # one pass-through shard gains nothing from a pool: its own writer thread is the parallelism
        for t in tasks:
            shard_done(write_shard(t, ticker()))
        return results

    if workers.own_pool and tasks and tasks[0].options.encode != "none":
        pool = workers.pool()
        with explain_lost_workers(workers.n, "re-encoding"):
            for t, samples in _pooled_samples(pool, tasks, workers.n):
                shard_done(write_shard(t, ticker(), samples))
        return results

    # Our own pool reports per-sample progress through a queue (batched by time); a foreign
    # executor (Dask) may run on other hosts, so there the bar moves once per finished shard.
    for _, r in workers.map(write_shard_in_worker, tasks, progress=bar.update, done=lambda t, r: t.num_items,
                            what=lambda t: f"shard {t.name}"):
        shard_done(r)
    return results


def write_shard_in_worker(task: ShardTask, progress) -> ShardResult:
    """write_shard in a worker that shares the cores with others (no writer thread)."""
    return write_shard(task, progress, background=False)


@contextlib.contextmanager
def explain_lost_workers(workers: int, what: str):
    """A worker killed from outside (most often by the kernel for memory) breaks a process pool,
    and a Dask worker that dies too often makes Dask give up on its task: say what that means
    instead of a bare BrokenProcessPool or KilledWorker traceback."""
    try:
        yield
    except cf.process.BrokenProcessPool as e:
        raise UserError(f"a --workers process died before finishing its work ({e}); most often the system "
                        f"killed it for memory. Re-run the same command to resume from the finished shards, "
                        f"with fewer --workers than {workers} if memory is short") from e
    except Exception as e:
        if type(e).__name__ != "KilledWorker":  # dask.distributed's, not imported: Dask is optional
            raise
        raise UserError(f"Dask gave up on {what}: the workers running it died ({e}); check their logs (memory, "
                        f"preemption), then re-run the same command: finished shards are kept, and a shard a "
                        f"dead worker left half-written is never counted") from e


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
    def task_chunks():  # a task's items are read from its plan file when the first chunk is due
        for t in tasks:
            items = t.load_items()
            for i in range(0, len(items), ENCODE_CHUNK):
                yield t, items[i:i + ENCODE_CHUNK]

    chunks = task_chunks()
    inflight: deque[tuple[list[SourceItem], cf.Future]] = deque()

    def top_up() -> None:
        while len(inflight) < 4 * workers and (nxt := next(chunks, None)) is not None:
            t, items = nxt
            inflight.append((items, pool.submit(encode_chunk, items, t.classes_file, t.options)))

    def samples(t: ShardTask) -> Iterator[tuple[SourceItem, Sample]]:
        for _ in range(0, t.num_items, ENCODE_CHUNK):
            top_up()
            items, fut = inflight.popleft()
            yield from zip(items, fut.result())

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
    """Picklable progress callback for pool workers: sends (task key, units done, failures) to
    the parent at most every 0.5 s (a queue message per sample would cost more than the sample)."""

    def __init__(self, key):
        self.key = key
        self.done, self.last = 0, 0.0

    def __call__(self, k: int, failures: int = 0) -> None:
        self.done += k
        now = time.monotonic()
        if now - self.last >= 0.5 and _reports is not None:
            self.last = now
            _reports.put((self.key, self.done, failures))


