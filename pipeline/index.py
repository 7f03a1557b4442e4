"""Read and validate a shard set's `index.json` (the contract in docs/formats.md).

Call `load_index(path_or_dir)` wherever shards are consumed (loader, evaluation, verify) and
`shard_urls(index, split)` to get the shard files of a split; both fail with a `UserError` that
says what is wrong and how to fix it. `index.json` may live on any fsspec filesystem.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

from vitpipe.errors import UserError

INDEX_NAME = "index.json"
FORMAT = "vitpipe-shards"
VERSION = 1


def index_location(path_or_dir: str) -> tuple[str, str]:
    """(URL of index.json, URL of its directory) for a shard-set directory or an index file."""
    path = str(path_or_dir).rstrip("/")
    if path.endswith(".json"):
        return path, path.rsplit("/", 1)[0] if "/" in path else "."
    return f"{path}/{INDEX_NAME}", path


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise UserError(f"{where} is not a valid vitpipe shard index: {what}; "
                        f"re-create it with 'vitpipe shard SRC OUT --overwrite'")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_index(index: Any, where: str = INDEX_NAME) -> dict:
    """Check the structure and that the totals add up; returns the index unchanged."""
    _check(isinstance(index, dict), where, "top level must be an object")
    _check(index.get("format") == FORMAT, where, f"'format' is {index.get('format')!r}, expected {FORMAT!r}")
    _check(index.get("version") == VERSION, where,
           f"'version' is {index.get('version')!r}; this vitpipe reads version {VERSION}")
    _check(isinstance(index.get("classes"), list), where, "'classes' must be a list of class names")
    splits = index.get("splits")
    _check(isinstance(splits, dict) and bool(splits), where, "'splits' must map split names to shard lists")
    total_samples = total_bytes = total_shards = 0
    for name, split in splits.items():
        _check(isinstance(split, dict) and isinstance(split.get("shards"), list), where,
               f"split {name!r} must have a 'shards' list")
        n = b = 0
        for shard in split["shards"]:
            _check(isinstance(shard, dict) and isinstance(shard.get("name"), str)
                   and isinstance(shard.get("num_samples"), int) and isinstance(shard.get("num_bytes"), int)
                   and isinstance(shard.get("sha256"), str), where,
                   f"each shard of split {name!r} needs name, num_samples, num_bytes, sha256")
            n += shard["num_samples"]
            b += shard["num_bytes"]
        for field in ("num_samples", "num_bytes"):  # else "277" != 277 reads as a mismatch of equal numbers
            _check(_is_int(split.get(field)), where, f"split {name!r}: {field} must be an integer, "
                                                      f"got {split.get(field)!r}")
        _check(split.get("num_samples") == n, where,
               f"split {name!r} says num_samples={split.get('num_samples')} but its shards add up to {n}")
        _check(split.get("num_bytes") == b, where,
               f"split {name!r} says num_bytes={split.get('num_bytes')} but its shards add up to {b}")
        total_samples += n
        total_bytes += b
        total_shards += len(split["shards"])
    totals = index.get("totals") or {}
    for field in ("num_samples", "num_bytes", "num_shards"):
        _check(_is_int(totals.get(field)), where, f"'totals' {field} must be an integer, got {totals.get(field)!r}")
    _check(totals.get("num_samples") == total_samples and totals.get("num_shards") == total_shards
           and totals.get("num_bytes") == total_bytes, where,
           f"'totals' {totals} do not match the splits ({total_samples} samples, {total_shards} shards)")
    return index


def load_index(path_or_dir: str) -> dict:
    """Load `DIR/index.json` (or the given .json file), validated; adds `_root` (the directory URL)."""
    url, root = index_location(path_or_dir)
    try:
        with fsspec.open(url, "rt") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no shard index at {url!r}; run 'vitpipe shard SRC {root}' first "
                        f"(or point to the folder that holds {INDEX_NAME})") from None
    except NotADirectoryError:  # DIR/index.json below a regular file
        raise UserError(f"{root!r} is a file, not a shard set folder; pass the folder that holds "
                        f"{INDEX_NAME} (written by 'vitpipe shard SRC OUT'), or that {INDEX_NAME} itself") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{url!r} is not valid JSON ({e}); the shard run may have been interrupted: "
                        f"re-run 'vitpipe shard' to finish it") from None
    validate_index(index, url)
    index["_root"] = root
    return index


def shard_urls(index: dict, split: str) -> list[str]:
    """Full paths/URLs of the shards of `split`, in order; an unknown split names the available ones."""
    splits = index.get("splits", {})
    if split not in splits:
        raise UserError(f"split {split!r} is not in the shard set; available splits: {sorted(splits)}")
    root = index.get("_root", ".")
    return [f"{root}/{s['name']}" for s in splits[split]["shards"]]
