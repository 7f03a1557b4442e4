"""The shard stage: an image collection -> WebDataset tar shards per split + `index.json`.

    vitpipe shard SRC OUT [--max-samples-per-shard N] [--max-shard-size 512MB] [--workers N] ...

How it works, and why (memory stays bounded whatever the collection's size; docs/formats.md):
1. Look at the top of SRC (`pipeline.sources.describe_source`): its parts (class folders, loose
   files, manifest files), and whether it exists at all, before any work.
2. Plan (`pipeline.plan.make_plan`): list the parts into sorted runs on disk, then assign each
   item a split (hash of its key, or the source's split), order each split over the whole
   collection, and cut it into shards by count and by a byte bound computed from file sizes. The
   plan depends only on the source and the config, never on workers or timing, so the output is
   byte-identical whatever runs it; bad files found later only leave their shard smaller.
3. Write each shard with `write_shard(task)` (`pipeline.run`): a top-level function of a picklable
   `ShardTask`, so a process pool or a Dask executor can run it. It writes `NAME.tar.tmp-<host>-<pid>`
   and renames it to `NAME.tar` when complete, then drops a receipt in `OUT/.vitpipe/`.
4. Resume: a re-run with the same source and config skips shards with a receipt, so after a crash
   only missing shards are written (and a crash while listing keeps the parts listed). `--overwrite`
   starts over.
5. Write `failures.jsonl`, `stats.json` and, last and atomically, `index.json`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from tqdm.auto import tqdm

from pipeline.images import describe_conversions
from pipeline.index import FORMAT, INDEX_NAME, VERSION
from pipeline.interop import is_reader_file, write_reader_files
from pipeline.plan import (_NOT_PLANNED, PLAN_FORMAT, TMP_MARK, NoImages, Plan, ShardResult, ShardTask,
                           failure_records, make_plan, naming_errors, write_json_atomic)
from pipeline.run import STATE_DIR, Workers, receipt, receipt_failures, run_tasks
from pipeline.sources import SourceLayout, describe_source, local_path, shown
from vitpipe.config import ByteSize, StageConfig, add_config_arguments, config_from_args, save_config
from vitpipe.errors import UserError


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
        "none", description="'none' stores the source bytes untouched; else re-encode to this format, as 8-bit "
                            "L or RGB (16-bit, alpha, CMYK... converted as docs/formats.md 'Image modes' says)")
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
# The stage


_OWN_FILES = (INDEX_NAME, "stats.json", "failures.jsonl", "config.yaml", STATE_DIR)


def _is_own(name: str) -> bool:
    return name in _OWN_FILES or name.endswith(".tar") or TMP_MARK in name or is_reader_file(name)


def _check_out(out: Path, cfg: ShardConfig) -> None:
    """Check OUT before any work: empty, our own earlier run of the same options (resume), or
    refuse; --overwrite deletes our own earlier run."""
    entries = sorted(p.name for p in out.iterdir())
    ours = (out / STATE_DIR).is_dir() or (out / INDEX_NAME).exists()
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
    elif (out / STATE_DIR / "plan.json").exists() and (changed := _changed_options(out, cfg)):
        # Said before listing, which can take minutes; a change in SRC's files is found after it.
        # (Without a plan no shard was written: an earlier run stopped while listing or planning.)
        raise UserError(f"OUT {str(out)!r} holds another shard set: its {changed}; "
                        f"pass --overwrite to replace it, or choose another OUT")
    elif (fmt := _plan_format(out)) not in (None, PLAN_FORMAT):
        raise UserError(f"OUT {str(out)!r} holds a shard set an older vitpipe planned (plan format {fmt}, now "
                        f"{PLAN_FORMAT}); pass --overwrite to re-shard it")
    (out / STATE_DIR).mkdir(exist_ok=True)
    remove_leftovers(out)


def remove_leftovers(out: Path) -> None:
    """Delete temporary files of killed writers, in OUT and below OUT/.vitpipe: never final names,
    and no writer is running (the lock on OUT, or all tasks of this run are done)."""
    for folder in (out, *(p for p in (out / STATE_DIR).rglob("*") if p.is_dir()), out / STATE_DIR):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if TMP_MARK in e.name and not e.is_dir():
                Path(e.path).unlink(missing_ok=True)


def _changed_options(out: Path, cfg: ShardConfig) -> str:
    """How `cfg` differs from the config that wrote OUT (its config.yaml), '' if it does not."""
    try:
        before = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return ""
    if not isinstance(before, dict):
        return ""
    now = cfg.model_dump(mode="json", exclude=_NOT_PLANNED)
    return "; ".join(f"{'SRC' if k == 'src' else '--' + k.replace('_', '-')} was {before.get(k)!r}, now {v!r}"
                     for k, v in now.items() if before.get(k, v) != v)


def _plan_format(out: Path) -> int | None:
    """The plan format of the shard set in OUT (1: before plan.json said), None if none was planned."""
    try:
        return json.loads((out / STATE_DIR / "plan.json").read_text()).get("format", 1)
    except (OSError, ValueError, AttributeError):
        return None


def _adopt_plan(out: Path, plan: Plan) -> None:
    """Record the plan's fingerprint; refuse if OUT holds shards of another plan (same options,
    but SRC's files changed since)."""
    plan_file = out / STATE_DIR / "plan.json"
    try:
        previous = json.loads(plan_file.read_text())
    except (OSError, ValueError):
        previous = None
    if previous is not None and previous.get("fingerprint") != plan.fingerprint:
        shutil.rmtree(plan.folder, ignore_errors=True)
        raise UserError(f"OUT {str(out)!r} holds another shard set: same options, but the files in SRC changed "
                        f"since (added, removed or resized); pass --overwrite to replace it, or choose another OUT")
    write_json_atomic(plan_file, {"format": PLAN_FORMAT, "fingerprint": plan.fingerprint})


def shard(cfg: ShardConfig, *, executor: cf.Executor | None = None) -> dict:
    """Shard `cfg.src` into `cfg.out` (resuming an earlier run of the same config); returns stats.

    `executor` (e.g. `dask.distributed.Client.get_executor()`) runs the listing, planning and
    shard-writing tasks instead of this process or a local process pool; OUT must then be a
    filesystem the executor's workers share. With `workers > 1` the pool starts processes by
    forkserver, so a script calling this needs the usual `if __name__ == "__main__":` guard.
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
    layout = describe_source(cfg.src, path_column=cfg.path_column, label_column=cfg.label_column,
                             split_from_source=cfg.split_by == "source")
    created = not out.exists()
    with _exclusive(out):
        was_empty = not any(out.iterdir())
        _check_out(out, cfg)
        space = _Space(out)
        try:
            with space.explained(), Workers(cfg.workers, executor) as workers:
                save_config(cfg, out / "config.yaml")
                phases = {}
                plan = make_plan(layout, cfg, out / STATE_DIR, workers)
                phases["list_plan"] = time.perf_counter() - start
                _adopt_plan(out, plan)
                space.plan = plan
                return _write_all(cfg, out, layout, plan, workers, start, phases)
        except NoImages:
            if was_empty:  # leave OUT as it was: there is nothing to resume
                for p in out.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                if created:
                    out.rmdir()
            raise


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


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class _Space:
    """Turns a full disk (or quota, or file size limit) into one line: which file, how much the
    run still needs, how much is free; the shards written so far stay valid for the re-run."""

    # Listing and planning keep about this much per image under OUT/.vitpipe (run + plan lines).
    PLAN_BYTES_PER_IMAGE = 600

    def __init__(self, out: Path):
        self.out = out
        self.plan: Plan | None = None

    def need(self) -> str:
        if self.plan is None:
            return (f"listing and planning keep about {self.PLAN_BYTES_PER_IMAGE} bytes per image under "
                    f"{self.out / STATE_DIR} until the shards are written")
        todo = [t for t in self.plan.tasks if receipt(self.out, t) is None]
        bound = sum(t.bytes_bound for t in todo)
        how = "at most about" if self.plan.tasks and self.plan.tasks[0].options.encode != "none" else "about"
        return f"the {len(todo)} shards still to write need {how} {_size(bound)}"

    @contextlib.contextmanager
    def explained(self):
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                    errno.EFBIG: "the file size limit (ulimit -f) is reached"}[e.errno]
            try:
                free = f", {_size(shutil.disk_usage(self.out).free)} free there now"
            except OSError:
                free = ""
            raise UserError(f"{what} writing {shown(str(e.filename or self.out))}: {self.need()}{free}; free some "
                            f"space (or choose another OUT) and re-run the same command: the finished shards "
                            f"are kept and nothing half-written counts as done") from None


def _write_all(cfg: ShardConfig, out: Path, layout: SourceLayout, plan: Plan, workers: Workers, start: float,
               phases: dict) -> dict:
    """Write the shards not done yet, then failures.jsonl, stats.json and index.json (last)."""
    tasks = plan.tasks
    done = {t.name: r for t in tasks if (r := receipt(out, t)) is not None}
    todo = [t for t in tasks if t.name not in done]
    total = sum(t.num_items for t in tasks)
    resumed = sum(t.num_items for t in tasks if t.name in done)
    _warn_if_short_of_space(out, todo)
    write_start = time.perf_counter()
    with tqdm(total=total, initial=resumed, unit="img", desc=f"shard {Path(cfg.src).name or cfg.src}",
              dynamic_ncols=True, file=sys.stderr) as bar:
        known_failures = plan.num_rejected + sum(r.num_failures for r in done.values())
        bar.set_postfix(failures=known_failures, shards=len(done), refresh=False)
        written = run_tasks(todo, workers, bar, known_failures, len(done))
    phases["write"] = time.perf_counter() - write_start
    results = [done.get(t.name) or written[t.name] for t in tasks]

    reasons: Counter = Counter()
    example: dict[str, dict] = {}
    with naming_errors(out / "failures.jsonl"), \
            open(out / "failures.jsonl", "w", encoding="utf-8", errors="backslashreplace") as f:
        def record(rec: dict) -> None:
            reasons[rec["reason"]] += 1
            example.setdefault(rec["reason"], rec)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

        for rec in failure_records(plan):
            record(rec)
        for r in results:
            for rec in receipt_failures(out, r.name) if r.num_failures else ():
                record(rec)
    num_failures = sum(reasons.values())
    index = build_index(layout, plan, cfg, results, num_failures)
    n_written = sum(written[t.name].num_samples for t in todo)
    duration = time.perf_counter() - start
    stats = {
        "num_samples": index["totals"]["num_samples"],
        "num_failures": num_failures,
        "failures_by_reason": dict(sorted(reasons.items())),
        "conversions": dict(sorted(sum((Counter(r.conversions) for r in results), Counter()).items())),
        "num_shards": len(tasks),
        "num_shards_written": len(todo),
        "num_shards_resumed": len(done),
        "num_bytes": index["totals"]["num_bytes"],
        "splits": {s: v["num_samples"] for s, v in index["splits"].items()},
        "duration_s": round(duration, 3),
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "images_per_s": round(n_written / duration, 1) if duration > 0 else None,
        "workers": cfg.workers,
    }
    write_json_atomic(out / "stats.json", stats)
    with naming_errors(out):
        write_reader_files(out, index, tasks[0].options.image_ext if tasks else None)  # HF card, wids, DALI
    write_json_atomic(out / INDEX_NAME, index)  # last: its presence means the set is complete
    shutil.rmtree(out / STATE_DIR / "listing", ignore_errors=True)
    shutil.rmtree(plan.folder, ignore_errors=True)
    remove_leftovers(out)  # e.g. what a Dask worker that died mid-shard left
    if num_failures and not stats["num_samples"]:
        # Written anyway, so the reasons are on record, but an empty shard set is no success:
        # a script or flow must not go on to train on it.
        reason, n = reasons.most_common(1)[0]
        raise UserError(f"no image could be read: all {num_failures} inputs failed, most often {reason} "
                        f"({n} of {num_failures}, e.g. {example[reason]['source']}: {example[reason]['detail']}); "
                        f"see {out / 'failures.jsonl'} for each file and its reason")
    splits = " / ".join(f"{s} {n}" for s, n in stats["splits"].items())
    print(f"sharded {stats['num_samples']} images ({splits}) into {len(tasks)} shards "
          f"[{len(todo)} written, {len(done)} resumed], {num_failures} failures, "
          f"{stats['num_bytes'] / 1e6:.1f} MB in {duration:.1f}s (listing and planning "
          f"{phases['list_plan']:.1f}s) -> {out}")
    if stats["conversions"]:
        print(describe_conversions(stats["conversions"], encoded=cfg.encode != "none"))
    return stats


def _warn_if_short_of_space(out: Path, todo: list[ShardTask]) -> None:
    """Say up front when the shards to write cannot fit (pass-through only: re-encoded shards
    are usually far smaller than their sources, which is all the plan knows)."""
    if not todo or todo[0].options.encode != "none":
        return
    need = sum(t.bytes_bound for t in todo)
    free = shutil.disk_usage(out).free
    if need > free:
        print(f"vitpipe shard: warning: the {len(todo)} shards to write need up to {_size(need)}, but only "
              f"{_size(free)} is free in {out}; the run stops when the disk is full (re-run it after "
              f"freeing space: finished shards are kept)", file=sys.stderr, flush=True)


def build_index(layout: SourceLayout, plan: Plan, cfg: ShardConfig, results: list[ShardResult],
                num_failures: int) -> dict:
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
        "classes": plan.classes,
        "splits": splits,
        "totals": {"num_samples": sum(s["num_samples"] for s in splits.values()),
                   "num_bytes": sum(s["num_bytes"] for s in splits.values()),
                   "num_shards": len(results), "num_failures": num_failures},
        "source": {**layout.describe(plan.num_listed), "plan_sha256": plan.fingerprint},
        "config": cfg.model_dump(mode="json"),
    }


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ShardConfig, positional=("src", "out"))


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(ShardConfig, args)
    shard(cfg)
    from flows.events import announce_sharded

    announce_sharded(cfg.out)  # with a Prefect API configured: vitpipe.dataset.ready, as shard_flow emits
    return 0
