"""The shard stage: an image collection -> WebDataset tar shards per split + `index.json`.

    vitpipe shard SRC OUT [--max-samples-per-shard N] [--max-shard-size 512MB] [--workers N] ...

How it works, and why:
1. List SRC (folder tree or manifest, `pipeline.sources`) into items sorted by key.
2. Plan: assign each item a split (hash of its key, or the source's split) and cut each split into
   shards by count and by a byte bound computed from file sizes. The plan depends only on the
   source and the config, never on workers or timing, so the output is byte-identical whatever
   runs it; bad files found later only leave their shard smaller (the index records exact counts).
3. Write each shard with `write_shard(task)` (`pipeline.run`): a top-level function of a picklable
   `ShardTask`, so a process pool or a Dask executor can run it. It writes `NAME.tar.tmp-<pid>` and renames it to
   `NAME.tar` when complete, then drops a receipt in `OUT/.vitpipe/` (counts, sha256, failures).
4. Resume: a re-run with the same source and config skips shards with a receipt, so after a crash
   only missing shards are written. `--overwrite` starts over.
5. Write `failures.jsonl`, `stats.json` and, last and atomically, `index.json`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
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
from pipeline.plan import _NOT_PLANNED, ShardResult, ShardTask, plan_fingerprint, plan_shards
from pipeline.run import STATE_DIR, TMP_MARK, _receipt, _write_json_atomic, run_tasks
from pipeline.sources import Source, list_source, local_path
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
        written = run_tasks(todo, cfg.workers, executor, bar, known_failures, len(done))
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
        "conversions": dict(sorted(sum((Counter(r.conversions) for r in results), Counter()).items())),
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
    write_reader_files(out, index, tasks[0].options.image_ext if tasks else None)  # HF card, wids, DALI
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
    if stats["conversions"]:
        print(describe_conversions(stats["conversions"], encoded=cfg.encode != "none"))
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
    from flows.events import announce_sharded

    announce_sharded(cfg.out)  # with a Prefect API configured: vitpipe.dataset.ready, as shard_flow emits
    return 0
