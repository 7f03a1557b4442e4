"""List an image collection into sorted, keyed items: folder trees and manifests (CSV, JSONL, Parquet).

Call `list_source(...)` once, before any work, to learn what a collection holds. Listing is cheap
(names and sizes, no image bytes) and deterministic: the same collection always gives the same
items in the same order, which is what lets the shard stage plan its output up front.

- A folder tree: `SRC/<class>/**/<image>` (ImageNet style, any depth below the class folder), or
  images directly in `SRC/**` with no class folders (an unlabelled collection). With splits taken
  from the source: `SRC/<split>/<class>/**/<image>`.
- A manifest file: one row per image, a path or URL column (relative paths are relative to the
  manifest), an optional label column, an optional split column, any extra metadata columns.
  Paths may be any fsspec URL (file://, s3://, http(s)://, ...).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any

import fsspec

from vitpipe.errors import UserError

# Extensions listed as images in a folder tree. Any other file is reported as a failure
# (unsupported_format) rather than silently ignored, so nothing in SRC goes unaccounted for.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm",
})
MANIFEST_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                       ".parquet": "parquet", ".pq": "parquet"}
PATH_COLUMNS = ("path", "url", "file", "filename", "image", "image_path", "image_url")
LABEL_COLUMNS = ("label", "class", "cls", "category")
SPLIT_COLUMN = "split"
KEY_COLUMN = "key"
# Folder names taken as a sign of SRC/<split>/<class>/... (only to warn or refuse, never to decide).
SPLIT_LIKE_NAMES = ("train", "val", "valid", "validation", "test")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceItem:
    """One input file: where to read it and what the shard stage records about it."""

    key: str                  # unique, no '.', safe as a tar member name; output order is sorted by it
    uri: str                  # local path or fsspec URL
    size: int                 # bytes at listing time (0 if unknown); used to plan shard sizes
    label: str | None = None  # class name; None for an unlabelled collection
    split: str | None = None  # split from the source (folder or manifest column), else None
    extra: dict[str, Any] = field(default_factory=dict)  # manifest metadata columns


@dataclass
class Source:
    """A listed collection: items sorted by key, class names, and files that cannot be images."""

    kind: str                       # "folder" or "manifest"
    uri: str
    items: list[SourceItem]
    classes: list[str]              # class id -> name; [] when unlabelled
    rejected: list[dict]            # {"source", "reason", "detail"} found while listing

    def describe(self) -> dict:
        return {"kind": self.kind, "uri": self.uri, "num_files": len(self.items) + len(self.rejected)}


def sort_labels(labels) -> list[str]:
    """Class names in id order: numerically when all look like integers ('2' < '10'), else by text."""
    names = sorted({str(x) for x in labels})
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return names


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")


def _key_from(text: str) -> str:
    # Keys keep '/' (webdataset splits the extension at the first '.' of the basename only) and
    # replace everything else that is not a plain name character, dots included.
    if _PLAIN_KEY.fullmatch(text):  # the common case, already a key: one match instead of two subs
        return text
    text = text.strip("/")
    key = re.sub(r"[^A-Za-z0-9_/-]+", "_", text)
    key = re.sub(r"/+", "/", key).strip("/")
    return key or "_"


def _dedupe_keys(keyed: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Make keys unique by suffixing colliding ones with a hash of their full source name."""
    counts: dict[str, int] = {}
    for key, _ in keyed:
        counts[key] = counts.get(key, 0) + 1
    out = []
    for key, (name, payload) in keyed:
        if counts[key] > 1:
            key = f"{key}_{hashlib.sha256(name.encode()).hexdigest()[:10]}"
        out.append((key, (name, payload)))
    return out


def _is_url(path: str) -> bool:
    return "://" in path


def local_path(path: str) -> str | None:
    """The local filesystem path of `path` if it is one (plain or file://), else None."""
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if _is_url(path) else path


# ---------------------------------------------------------------------------------------------
# Folder trees


def _walk_files(root: str, rejected: list[dict]) -> list[tuple[str, str, os.stat_result | None]]:
    """(relative posix path, full path, stat or None if it fails) of all non-hidden files below
    root, any depth, sorted by relative path. One scandir per folder and one stat per file (the
    DirEntry keeps it); plain strings, as a million Path objects cost seconds. Symlinked folders
    are followed, except a link back to a folder it is inside of (a loop: those files are listed
    already, and it would never end); a folder that cannot be listed goes to `rejected`, so no
    part of the tree disappears silently."""
    files = []
    stack: list[tuple[str, str, frozenset]] = [(root, "", frozenset())]  # folder, its path, its ancestors
    while stack:
        folder, rel, ancestors = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in ancestors:
                continue
            ancestors = ancestors | {(st.st_dev, st.st_ino)}
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            rejected.append({"source": folder, "reason": "unreadable",
                             "detail": f"cannot list this folder ({e.strerror or e}); its files are not sharded"})
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                stack.append((entry.path, f"{rel}{name}/", ancestors))
                continue
            try:
                st = entry.stat()
            except OSError:
                st = None  # e.g. a dangling link: the shard writer reports it with the reason
            files.append((rel + name, entry.path, st))
    files.sort(key=itemgetter(0))
    return files


def list_folder(root: str | Path, *, split_from_source: bool = False) -> Source:
    """List a folder tree: class sub-folders (labelled) or loose images (unlabelled)."""
    root = Path(root)
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    rejected: list[dict] = []
    # (relative path for the key, split, label, file, stat)
    entries: list[tuple[str, str | None, str | None, str, os.stat_result | None]] = []
    if split_from_source:
        if not subdirs:
            raise UserError(f"{str(root)!r} has no split folders; with --split-by source the tree must be "
                            f"SRC/<split>/<class>/..., e.g. SRC/train/cat/1.jpg, or use --split-by hash")
        if not any(d.lower() in SPLIT_LIKE_NAMES for d in subdirs) and any(_holds_images(root / d) for d in subdirs):
            # A plain class tree: each class would become a split of unlabelled images.
            raise UserError(f"--split-by source expects SRC/<split>/<class>/..., but {str(root)!r} holds images "
                            f"directly in its folders ({_names(subdirs)}), none named like a split "
                            f"({', '.join(SPLIT_LIKE_NAMES)}): they look like classes. Drop --split-by source "
                            f"(train/val by a hash of each key), or lay SRC out as SRC/train/<class>/..., "
                            f"SRC/val/<class>/...")
        for split in subdirs:
            for rel, label, path, st in _list_classes(root / split, rejected):
                entries.append((f"{split}/{rel}", split, label, path, st))
    else:
        if subdirs and all(d.lower() in SPLIT_LIKE_NAMES for d in subdirs):
            # Only a hint: a class may well be called "test".
            log.warning(f"{str(root)!r}: class folders {subdirs} look like splits; if SRC is laid out as "
                        f"SRC/<split>/<class>/..., pass --split-by source (without it they are classes, and "
                        f"train/val is by a hash of each key)")
        for rel, label, path, st in _list_classes(root, rejected):
            entries.append((rel, None, label, path, st))

    keyed = _dedupe_keys([(_key_from(rel.rsplit(".", 1)[0]), (rel, entry)) for rel, *entry in entries])
    items = []
    for key, (_, (split, label, path, st)) in keyed:
        if st is not None and not stat.S_ISREG(st.st_mode):
            # A FIFO would block the reader forever; sockets and devices are not images either.
            rejected.append({"source": path, "reason": "unreadable", "detail": "not a regular file"})
            continue
        items.append(SourceItem(key=key, uri=path, size=st.st_size if st else 0, label=label, split=split))
    items.sort(key=attrgetter("key"))
    labels = [it.label for it in items if it.label is not None]
    return Source(kind="folder", uri=str(root), items=items, classes=sort_labels(labels), rejected=rejected)


def _holds_images(folder: Path) -> bool:
    """Whether `folder` has an image file directly in it (stops at the first)."""
    try:
        with os.scandir(folder) as it:
            return any(not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                       and not e.is_dir() for e in it)
    except OSError:
        return False  # listing reports it


def _names(names: list[str], most: int = 10) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _list_classes(root: Path, rejected: list[dict]):
    """Yield (relative path, label, file, stat) for images below root; class = first folder level if any."""
    has_class_dirs = any(d.is_dir() and not d.name.startswith(".") for d in root.iterdir())
    for rel, path, st in _walk_files(str(root), rejected):
        dot = rel.rfind(".")
        ext = rel[dot:].lower() if dot > rel.rfind("/") + 1 else ""  # os.path.splitext, for names not starting with "."
        if ext not in IMAGE_EXTENSIONS:
            rejected.append({"source": path, "reason": "unsupported_format",
                             "detail": f"extension {ext or '(none)'!r} is not an image format "
                                       f"({', '.join(sorted(IMAGE_EXTENSIONS))})"})
            continue
        if has_class_dirs and "/" not in rel:
            rejected.append({"source": path, "reason": "no_class_folder",
                             "detail": "the tree has class folders but this image is outside them; "
                                       "move it into a class folder"})
            continue
        label = rel.split("/", 1)[0] if has_class_dirs else None
        yield rel, label, path, st


# ---------------------------------------------------------------------------------------------
# Manifests


def _read_manifest(uri: str, fmt: str):
    import pandas as pd

    try:
        with fsspec.open(uri, "rb") as f:
            if fmt == "parquet":
                return pd.read_parquet(f)
            if fmt == "jsonl":
                return pd.read_json(f, lines=True, dtype=False)
            # Read every column as text: '007' stays '007' and labels are not turned into floats.
            return pd.read_csv(f, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"manifest {uri!r} does not exist; pass an existing CSV/JSONL/Parquet file") from None
    except Exception as e:  # a parser error names the line; keep it for the user
        raise UserError(f"manifest {uri!r} could not be read as {fmt}: {e}") from e


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
                 uri: str, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"manifest {uri!r} has no {what} column {wanted!r}; its columns are {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    if required:
        raise UserError(f"manifest {uri!r} has no {what} column (looked for {list(candidates)}); "
                        f"its columns are {columns}; name it with --{what}-column")
    return None


def _json_value(value: Any) -> Any:
    """Manifest cells as JSON-safe Python values (numpy scalars -> Python, NaN -> None)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            value = value.tolist() if hasattr(value, "tolist") else str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _resolve(path: str, base: str) -> str:
    """A manifest path made absolute: URLs and absolute paths as they are, others below `base`."""
    if _is_url(path) or os.path.isabs(path):
        return path
    return base.rstrip("/") + "/" + path


def _sizes(uris: list[str]) -> list[int]:
    """Byte sizes (0 when unknown or unreadable); remote ones looked up concurrently."""
    def size_of(uri: str) -> int:
        local = local_path(uri)
        try:
            if local is not None:
                return os.stat(local).st_size
            fs, p = fsspec.core.url_to_fs(uri)
            return int(fs.info(p).get("size") or 0)
        except Exception:  # noqa: BLE001 - missing/unreachable: the shard writer reports why
            return 0

    if all(local_path(u) is not None for u in uris):
        return [size_of(u) for u in uris]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(size_of, uris))


def list_manifest(uri: str, *, path_column: str | None = None, label_column: str | None = None,
                  split_from_source: bool = False) -> Source:
    """List a manifest's rows; the key is the `key` column if present, else the row's path."""
    fmt = MANIFEST_EXTENSIONS[_manifest_suffix(uri)]
    df = _read_manifest(uri, fmt)
    if len(df) == 0:
        raise UserError(f"manifest {uri!r} has no rows; it must list at least one image")
    columns = [str(c) for c in df.columns]
    pcol = _pick_column(columns, path_column, PATH_COLUMNS, "path", uri, required=True)
    lcol = _pick_column(columns, label_column, LABEL_COLUMNS, "label", uri, required=False)
    scol = SPLIT_COLUMN if split_from_source and SPLIT_COLUMN in columns else None
    if split_from_source and scol is None:
        raise UserError(f"--split-by source needs a '{SPLIT_COLUMN}' column in manifest {uri!r}; "
                        f"its columns are {columns}; or use --split-by hash")
    kcol = KEY_COLUMN if KEY_COLUMN in columns else None
    extra_cols = [c for c in columns if c not in {pcol, lcol, scol, kcol}]
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."

    rows = df.to_dict("records")
    entries, rejected = [], []
    for i, row in enumerate(rows):
        path = row[pcol]
        if _missing(path):
            rejected.append({"source": f"{uri}#row{i}", "reason": "no_path",
                             "detail": f"row {i} has an empty {pcol!r} column"})
            continue
        path = _resolve(str(path), base)
        if kcol and not _missing(row[kcol]):
            name = str(row[kcol])
        else:
            name = os.path.splitext(path.split("://", 1)[1] if _is_url(path) else os.path.relpath(path, base))[0]
        label = None if lcol is None or _missing(row[lcol]) else str(_json_value(row[lcol]))
        split = None if scol is None else str(row[scol])
        extra = {c: _json_value(row[c]) for c in extra_cols}
        entries.append((_key_from(name), (f"{i}:{path}", (path, label, split, extra))))

    keyed = _dedupe_keys(entries)
    sizes = _sizes([payload[0] for _, (_, payload) in keyed])
    items = [SourceItem(key=key, uri=path, size=size, label=label, split=split, extra=extra)
             for (key, (_, (path, label, split, extra))), size in zip(keyed, sizes)]
    items.sort(key=lambda it: it.key)
    if lcol is not None:
        unlabelled = [it for it in items if it.label is None]
        if unlabelled:
            # A labelled collection with label-less rows: keep the contract (every sample has `cls`)
            # by reporting those rows instead of writing samples without a class.
            for it in unlabelled:
                rejected.append({"source": it.uri, "reason": "no_label",
                                 "detail": f"empty {lcol!r} in a labelled manifest"})
            items = [it for it in items if it.label is not None]
    return Source(kind="manifest", uri=uri, items=items,
                  classes=sort_labels(it.label for it in items if it.label is not None), rejected=rejected)


def _manifest_suffix(uri: str) -> str:
    name = uri.split("?", 1)[0].rsplit("/", 1)[-1]
    return ("." + name.rsplit(".", 1)[1].lower()) if "." in name else ""


def is_manifest(src: str) -> bool:
    return _manifest_suffix(src) in MANIFEST_EXTENSIONS


def list_source(src: str, *, path_column: str | None = None, label_column: str | None = None,
                split_from_source: bool = False) -> Source:
    """List SRC (folder tree or manifest); a missing or empty SRC is a UserError, before any work."""
    if is_manifest(src):
        local = local_path(src)
        if local is not None and not os.path.isfile(local):
            raise UserError(f"manifest {src!r} does not exist; pass an existing CSV/JSONL/Parquet file")
        source = list_manifest(src, path_column=path_column, label_column=label_column,
                               split_from_source=split_from_source)
    else:
        local = local_path(src)
        if local is None:
            raise UserError(f"SRC {src!r}: a URL must point to a manifest (.csv, .jsonl, .parquet); "
                            f"folder trees must be local directories")
        if not os.path.isdir(local):
            what = "is a file but not a manifest (.csv, .tsv, .jsonl, .parquet)" if os.path.exists(local) \
                else "does not exist"
            raise UserError(f"SRC {src!r} {what}; pass an image folder tree or a manifest file")
        if path_column or label_column:
            raise UserError("--path-column/--label-column apply to manifests; SRC is a folder tree")
        source = list_folder(local, split_from_source=split_from_source)
    if not source.items:
        raise UserError(f"SRC {src!r} holds no images (found {len(source.rejected)} other files); "
                        f"expected {'rows with paths' if source.kind == 'manifest' else 'image files'} "
                        f"with extensions {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return source
