"""Planning a shard set: which item goes to which split and shard, decided before any byte is read.

The plan depends only on the listing and the options that change bytes (never on workers or
timing), so a shard set is a pure function of its input: byte-identical whatever runs it, and a
resumed run can tell finished shards from the plan alone. Items are ordered within a split by a
hash of their key ('shuffled') or by key ('sorted'), and cut into shards by count and by a byte
bound computed from file sizes (`pipeline.tar_writer.tar_member_bytes`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.interop import image_member_ext
from pipeline.sources import Source, SourceItem
from pipeline.tar_writer import TAR_END_BOUND, tar_member_bytes
from vitpipe.errors import UserError

if TYPE_CHECKING:
    from pipeline.shard import ShardConfig

SPLITS_BY_HASH = ("train", "val")


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
    json_bound = _json_len_bound(item.uri) + _json_len_bound(item.label) + extra + 200
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
        if (need := bound + TAR_END_BOUND) > cfg.max_shard_size:
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
                            cfg.max_image_pixels, image_member_ext(i.uri for i in keep) if cfg.encode == "none" else "")
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
    size = TAR_END_BOUND
    for item, b in items:
        if current and (len(current) >= max_samples or size + b > max_bytes):
            groups.append(current)
            current, size = [], TAR_END_BOUND
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


