"""What an image collection holds: folder trees and manifests (CSV, JSONL, Parquet), listed by parts.

A collection is cut into *parts* that can each be listed on their own, in any process, in bounded
memory: `describe_source(...)` finds them (one look at the top of SRC, before any work) and
`iter_part(part, reject)` streams one part's images. A part is a class folder of a tree (any
depth below it), the loose files of a folder, or one file of a manifest (a manifest may be a
folder of many part files, as large collections ship). Listing reads names and sizes, never
image bytes. `list_source(...)` lists a whole (small) collection into memory, sorted by key,
to see what it holds.

- A folder tree: `SRC/<class>/**/<image>` (ImageNet style, any depth below the class folder), or
  images directly in `SRC` with no class folders (an unlabelled collection). With splits taken
  from the source: `SRC/<split>/<class>/**/<image>`.
- A manifest: one row per image, a path or URL column (relative paths are relative to the
  manifest file), an optional label column, an optional split column, any extra metadata
  columns. SRC is a manifest file, a folder (or fsspec URL) of manifest part files, or a glob of
  them (`s3://bucket/meta/part-*.parquet`). Paths may be any fsspec URL (file://, s3://, ...).
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
from typing import Any, Callable, Iterator

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
# Manifest rows read at a time: what bounds a manifest's listing memory, whatever its length.
MANIFEST_CHUNK_ROWS = 16_384

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceItem:
    """One input file: where to read it and what the shard stage records about it."""

    key: str                  # unique, no '.', safe as a tar member name (see docs/formats.md)
    uri: str                  # local path or fsspec URL (a local name may hold undecodable bytes)
    size: int                 # bytes at listing time (0 if unknown); used to plan shard sizes
    label: str | None = None  # class name; None for an unlabelled collection
    split: str | None = None  # split from the source (folder or manifest column), else None
    extra: dict[str, Any] = field(default_factory=dict)  # manifest metadata columns


@dataclass(frozen=True)
class ManifestColumns:
    """The manifest columns chosen from the first part; every part must have them."""

    path: str
    label: str | None
    split: str | None


@dataclass(frozen=True)
class ListingPart:
    """A piece of a collection listed on its own (picklable: a process pool or Dask lists it)."""

    kind: str                   # "tree": a class folder, any depth; "files": the files directly in a
                                # folder; "manifest": one manifest file
    uri: str                    # the folder or the manifest file
    prefix: str = ""            # tree/files: `uri` relative to SRC with a trailing '/' ('' for SRC)
    label: str | None = None    # tree: the class of every image below it
    split: str | None = None    # tree/files: from SRC/<split>/...
    in_class_tree: bool = False  # files: the folder has class folders, so loose images are rejected
    fmt: str = ""               # manifest: csv, tsv, jsonl or parquet
    name: str = ""              # manifest: the part's name within SRC ('' for a single manifest file)
    columns: ManifestColumns | None = None
    single: bool = False        # manifest: SRC is this one file (an empty one is an error)


@dataclass
class SourceLayout:
    """A collection's parts, found before any work."""

    kind: str                   # "folder" or "manifest"
    uri: str
    parts: list[ListingPart]

    def describe(self, num_files: int) -> dict:
        return {"kind": self.kind, "uri": self.uri, "num_files": num_files}


@dataclass
class Source:
    """A listed (small) collection: items sorted by key, class names, files that cannot be images."""

    kind: str                       # "folder" or "manifest"
    uri: str
    items: list[SourceItem]
    classes: list[str]              # class id -> name; [] when unlabelled
    rejected: list[dict]            # {"source", "reason", "detail"} found while listing

    def describe(self) -> dict:
        return {"kind": self.kind, "uri": self.uri, "num_files": len(self.items) + len(self.rejected)}


# reject(sort_key, record): called for a file listing turns away; records sort by their key
Reject = Callable[[str, dict], None]


def sort_labels(labels) -> list[str]:
    """Class names in id order: numerically when all look like integers ('2' < '10'), else by text."""
    names = sorted({str(x) for x in labels})
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return names


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")


def key_from(text: str) -> str:
    """The key of a relative name: '/' kept (webdataset splits the extension at the first '.' of
    the basename only), every other character outside A-Za-z0-9_- replaced, dots and bytes that
    are not UTF-8 included. Keys are plain ASCII, so tar member names always are."""
    if _PLAIN_KEY.fullmatch(text):  # the common case, already a key: one match instead of two subs
        return text
    text = text.strip("/")
    key = re.sub(r"[^A-Za-z0-9_/-]+", "_", text)
    key = re.sub(r"/+", "/", key).strip("/")
    return key or "_"


def name_digest(name: str) -> str:
    """The suffix that tells colliding keys apart: a hash of the full source name (a local
    name's undecodable bytes hashed as the bytes they are)."""
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:10]


def shown(path: str) -> str:
    """A path as text for JSON and messages: bytes that are not UTF-8 (a file name Python holds
    as surrogate escapes) written as \\xNN, so every record stays valid UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _dedupe_keys(keyed: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Make keys unique by suffixing colliding ones with a hash of their full source name."""
    counts: dict[str, int] = {}
    for key, _ in keyed:
        counts[key] = counts.get(key, 0) + 1
    return [(f"{key}_{name_digest(name)}" if counts[key] > 1 else key, (name, payload))
            for key, (name, payload) in keyed]


def _is_url(path: str) -> bool:
    return "://" in path


def local_path(path: str) -> str | None:
    """The local filesystem path of `path` if it is one (plain or file://), else None."""
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if _is_url(path) else path


def _suffix(uri: str) -> str:
    name = uri.split("?", 1)[0].rsplit("/", 1)[-1]
    return ("." + name.rsplit(".", 1)[1].lower()) if "." in name else ""


def is_manifest(src: str) -> bool:
    return _suffix(src) in MANIFEST_EXTENSIONS


def _image_ext(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""  # os.path.splitext, for names not starting with "."


# ---------------------------------------------------------------------------------------------
# The layout: parts, found with one look at the top of SRC


def describe_source(src: str, *, path_column: str | None = None, label_column: str | None = None,
                    split_from_source: bool = False) -> SourceLayout:
    """The parts of SRC (folder tree, manifest file, folder or glob of manifest parts); a missing
    SRC or one of the wrong kind is a UserError, before any work."""
    local = local_path(src)
    if is_manifest(src) and not _has_glob(src):
        if local is not None and not os.path.isfile(local):
            raise UserError(f"manifest {src!r} does not exist; pass an existing CSV/JSONL/Parquet file")
        return _manifest_layout(src, [src], path_column, label_column, split_from_source, single=True)
    if local is not None and os.path.isdir(local) and not _has_glob(src):
        parts = _manifest_files_in(local)
        if parts is None:
            if path_column or label_column:
                raise UserError("--path-column/--label-column apply to manifests; SRC is a folder tree")
            return SourceLayout("folder", local, _folder_parts(local, split_from_source))
        return _manifest_layout(src, parts, path_column, label_column, split_from_source)
    if local is not None and not _has_glob(src):
        what = "is a file but not a manifest (.csv, .tsv, .jsonl, .parquet)" if os.path.exists(local) \
            else "does not exist"
        raise UserError(f"SRC {src!r} {what}; pass an image folder tree, a manifest file or a folder of "
                        f"manifest parts")
    if not _has_glob(src):
        raise UserError(f"SRC {src!r}: a URL must point to a manifest (.csv, .jsonl, .parquet) or be a glob of "
                        f"manifest parts (e.g. s3://bucket/meta/*.parquet); folder trees must be local directories")
    return _manifest_layout(src, _glob_manifest_parts(src), path_column, label_column, split_from_source)


def _has_glob(src: str) -> bool:
    return any(c in src for c in "*?[")


def _manifest_files_in(folder: str) -> list[str] | None:
    """The manifest part files of a local folder that holds only those (and hidden or '_'-named
    files such as Spark's _SUCCESS), sorted; None when it is an image folder tree."""
    parts, other = [], False
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith((".", "_")):
                continue
            if e.is_dir() or not is_manifest(e.name):
                other = True
                break
            parts.append(e.path)
    return None if other or not parts else sorted(parts)


def _glob_manifest_parts(src: str) -> list[str]:
    """The manifest files a glob (local or URL) matches, sorted."""
    try:
        fs, path = fsspec.core.url_to_fs(src)
        found = fs.glob(path)
    except Exception as e:  # noqa: BLE001 - any fsspec backend error: say where
        raise UserError(f"SRC {src!r}: cannot list it ({type(e).__name__}: {e}); check the URL and "
                        f"credentials") from None
    names = sorted(p for p in found if is_manifest(p) and not p.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_")))
    if not names:
        raise UserError(f"SRC {src!r} matches no manifest files (.csv, .tsv, .jsonl, .parquet); check the pattern")
    if local_path(src) is not None:
        return names
    protocol = src.split("://", 1)[0]
    return [p if _is_url(p) else f"{protocol}://{p}" for p in names]


def _folder_parts(root: str, split_from_source: bool) -> list[ListingPart]:
    subdirs = _subfolders(root)
    if not split_from_source:
        if subdirs and all(d.lower() in SPLIT_LIKE_NAMES for d in subdirs):
            # Only a hint: a class may well be called "test".
            log.warning(f"{root!r}: class folders {subdirs} look like splits; if SRC is laid out as "
                        f"SRC/<split>/<class>/..., pass --split-by source (without it they are classes, and "
                        f"train/val is by a hash of each key)")
        return _class_parts(root, "", None, subdirs)
    if not subdirs:
        raise UserError(f"{root!r} has no split folders; with --split-by source the tree must be "
                        f"SRC/<split>/<class>/..., e.g. SRC/train/cat/1.jpg, or use --split-by hash")
    if not any(d.lower() in SPLIT_LIKE_NAMES for d in subdirs) and any(_holds_images(os.path.join(root, d))
                                                                       for d in subdirs):
        # A plain class tree: each class would become a split of unlabelled images.
        raise UserError(f"--split-by source expects SRC/<split>/<class>/..., but {root!r} holds images "
                        f"directly in its folders ({_names(subdirs)}), none named like a split "
                        f"({', '.join(SPLIT_LIKE_NAMES)}): they look like classes. Drop --split-by source "
                        f"(train/val by a hash of each key), or lay SRC out as SRC/train/<class>/..., "
                        f"SRC/val/<class>/...")
    parts = []
    for split in subdirs:
        folder = os.path.join(root, split)
        parts += _class_parts(folder, f"{split}/", split, _subfolders(folder))
    return parts


def _class_parts(folder: str, prefix: str, split: str | None, classes: list[str]) -> list[ListingPart]:
    """The loose files of `folder`, then one part per class folder in it."""
    parts = [ListingPart("files", folder, prefix, split=split, in_class_tree=bool(classes))]
    # A class is named by its folder, as text: bytes that are not UTF-8 shown as \xNN (see `shown`).
    return parts + [ListingPart("tree", os.path.join(folder, c), f"{prefix}{c}/", label=shown(c), split=split)
                    for c in classes]


def _subfolders(folder: str) -> list[str]:
    """Non-hidden sub-folder names, sorted; streamed, so a folder of millions of files costs no list."""
    names = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                try:
                    if not e.name.startswith(".") and e.is_dir():
                        names.append(e.name)
                except OSError:
                    pass  # a dangling link: its listing part reports it
    except OSError as e:
        raise UserError(f"cannot list SRC {folder!r} ({e.strerror or e}); check that it is a readable folder") from None
    return sorted(names)


def _holds_images(folder: str) -> bool:
    """Whether `folder` has an image file directly in it (stops at the first)."""
    try:
        with os.scandir(folder) as it:
            return any(not e.name.startswith(".") and _image_ext(e.name) in IMAGE_EXTENSIONS
                       and not e.is_dir() for e in it)
    except OSError:
        return False  # listing reports it


def _names(names: list[str], most: int = 10) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


# ---------------------------------------------------------------------------------------------
# Listing a folder part


def _walk(root: str, reject: Reject) -> Iterator[tuple[str, str, os.stat_result | None]]:
    """(path relative to root, full path, stat or None if it fails) of the non-hidden files below
    root, any depth, streamed folder by folder: a folder of millions of files is never held as a
    list. Symlinked folders are followed, except a link back to a folder it is inside of (a loop:
    those files are listed already, and it would never end). A folder that cannot be listed, or
    that goes away while it is read, is rejected, so no part of the tree disappears silently."""
    stack: list[tuple[str, str, frozenset]] = [(root, "", frozenset())]  # folder, its path, its ancestors
    while stack:
        folder, rel, ancestors = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in ancestors:
                continue
            ancestors = ancestors | {(st.st_dev, st.st_ino)}
            it = os.scandir(folder)
        except OSError as e:
            reject(folder, {"source": shown(folder), "reason": "unreadable",
                            "detail": f"cannot list this folder ({e.strerror or e}); its files are not sharded"})
            continue
        try:
            with it:
                for entry in it:
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
                    yield rel + name, entry.path, st
        except OSError as e:  # the folder was deleted or its storage went away mid-listing
            reject(folder, {"source": shown(folder), "reason": "unreadable",
                            "detail": f"listing this folder failed part-way ({e.strerror or e}); the files "
                                      f"not yet listed in it are not sharded"})


def _loose_files(folder: str, reject: Reject) -> Iterator[tuple[str, str, os.stat_result | None]]:
    """Like _walk, for the files directly in `folder` only (its sub-folders are parts of their own)."""
    try:
        it = os.scandir(folder)
    except OSError as e:
        reject(folder, {"source": shown(folder), "reason": "unreadable",
                        "detail": f"cannot list this folder ({e.strerror or e}); its files are not sharded"})
        return
    with it:
        for entry in it:
            try:
                if entry.name.startswith(".") or entry.is_dir():
                    continue
            except OSError:
                pass
            try:
                st = entry.stat()
            except OSError:
                st = None
            yield entry.name, entry.path, st


def _iter_folder(part: ListingPart, reject: Reject) -> Iterator[tuple[str, SourceItem]]:
    files = _walk(part.uri, reject) if part.kind == "tree" else _loose_files(part.uri, reject)
    for rel, path, st in files:
        rel = part.prefix + rel  # the name relative to SRC: what keys and collisions go by
        ext = _image_ext(rel[rel.rfind("/") + 1:])
        if ext not in IMAGE_EXTENSIONS:
            reject(path, {"source": shown(path), "reason": "unsupported_format",
                          "detail": f"extension {ext or '(none)'!r} is not an image format "
                                    f"({', '.join(sorted(IMAGE_EXTENSIONS))})"})
        elif part.in_class_tree:
            reject(path, {"source": shown(path), "reason": "no_class_folder",
                          "detail": "the tree has class folders but this image is outside them; "
                                    "move it into a class folder"})
        elif st is not None and not stat.S_ISREG(st.st_mode):
            # A FIFO would block the reader forever; sockets and devices are not images either.
            reject(path, {"source": shown(path), "reason": "unreadable", "detail": "not a regular file"})
        else:
            yield rel, SourceItem(key=key_from(rel.rsplit(".", 1)[0]), uri=path, size=st.st_size if st else 0,
                                  label=part.label, split=part.split)


# ---------------------------------------------------------------------------------------------
# Listing a manifest part


def _manifest_chunks(uri: str, fmt: str, rows: int = MANIFEST_CHUNK_ROWS):
    """The manifest's rows as DataFrames of at most `rows` rows, read as a stream."""
    import pandas as pd

    try:
        with fsspec.open(uri, "rb") as f:
            if fmt == "parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                # Parquet is decoded a row group at a time (the unit its writer chose). Arrow's
                # default allocator (mimalloc) keeps what one took; the system one gives it back.
                pool = pa.default_memory_pool()
                pa.set_memory_pool(pa.system_memory_pool())
                try:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=rows, use_threads=False):
                        yield batch.to_pandas()
                finally:
                    pa.set_memory_pool(pool)
            elif fmt == "jsonl":
                with pd.read_json(f, lines=True, dtype=False, chunksize=rows) as reader:
                    yield from reader
            else:
                # Every column as text: '007' stays '007' and labels are not turned into floats.
                with pd.read_csv(f, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False,
                                 chunksize=rows) as reader:
                    yield from reader
    except FileNotFoundError:
        raise UserError(f"manifest {uri!r} does not exist; pass an existing CSV/JSONL/Parquet file") from None
    except UserError:
        raise
    except Exception as e:  # a parser error names the line; keep it for the user
        raise UserError(f"manifest {uri!r} could not be read as {fmt}: {type(e).__name__}: {e}; fix or replace "
                        f"that file and re-run (the parts listed already are kept)") from e


def _manifest_columns(uri: str, fmt: str) -> list[str]:
    import pandas as pd

    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            with fsspec.open(uri, "rb") as f:
                return [str(c) for c in pq.ParquetFile(f).schema_arrow.names]
        except FileNotFoundError:
            raise UserError(f"manifest {uri!r} does not exist; pass an existing CSV/JSONL/Parquet file") from None
        except Exception as e:  # noqa: BLE001
            raise UserError(f"manifest {uri!r} could not be read as parquet: {type(e).__name__}: {e}") from e
    for chunk in _manifest_chunks(uri, fmt, rows=256):
        return [str(c) for c in chunk.columns]
    if fmt in ("csv", "tsv"):  # no rows, but maybe a header: its columns
        with fsspec.open(uri, "rb") as f:
            return [str(c) for c in pd.read_csv(f, sep="\t" if fmt == "tsv" else ",", nrows=0).columns]
    return []


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


def _manifest_layout(src: str, uris: list[str], path_column: str | None, label_column: str | None,
                     split_from_source: bool, *, single: bool = False) -> SourceLayout:
    """One part per manifest file; the columns are picked from the first, and each part is
    checked against them when it is listed."""
    first = uris[0]
    columns = _manifest_columns(first, MANIFEST_EXTENSIONS[_suffix(first)])
    if single and not columns:
        raise UserError(f"manifest {first!r} has no rows; it must list at least one image")
    chosen = ManifestColumns(
        path=_pick_column(columns, path_column, PATH_COLUMNS, "path", first, required=True),
        label=_pick_column(columns, label_column, LABEL_COLUMNS, "label", first, required=False),
        split=SPLIT_COLUMN if split_from_source and SPLIT_COLUMN in columns else None)
    if split_from_source and chosen.split is None:
        raise UserError(f"--split-by source needs a '{SPLIT_COLUMN}' column in manifest {first!r}; "
                        f"its columns are {columns}; or use --split-by hash")
    root = src.rstrip("/") if not _has_glob(src) else src.rsplit("/", 1)[0]
    parts = [ListingPart("manifest", uri, fmt=MANIFEST_EXTENSIONS[_suffix(uri)], columns=chosen, single=single,
                         name="" if single else uri[len(root):].lstrip("/") if uri.startswith(root) else uri)
             for uri in uris]
    return SourceLayout("manifest", src, parts)


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
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and value.strip() == "")


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


def _iter_manifest(part: ListingPart, reject: Reject) -> Iterator[tuple[str, SourceItem]]:
    """A manifest part's rows, chunk by chunk; the key is the `key` column if present, else the
    row's path relative to the manifest."""
    cols = part.columns
    base = part.uri.rsplit("/", 1)[0] if "/" in part.uri else "."
    wanted = [c for c in (cols.path, cols.label, cols.split) if c is not None]
    row = 0
    for df in _manifest_chunks(part.uri, part.fmt):
        columns = [str(c) for c in df.columns]
        if missing := [c for c in wanted if c not in columns]:
            raise UserError(f"manifest part {part.uri!r} has another schema than the first part: it lacks the "
                            f"column(s) {missing} (its columns are {columns}); give every part the same columns "
                            f"(or remove this part from SRC) and re-run (the parts listed already are kept)")
        extra_cols = [c for c in columns if c not in {cols.path, cols.label, cols.split, KEY_COLUMN}]
        kcol = KEY_COLUMN if KEY_COLUMN in columns else None
        entries = []
        for i, rec in enumerate(df.to_dict("records"), start=row):
            path = rec[cols.path]
            if _missing(path):
                reject(f"{i:012d}", {"source": f"{shown(part.uri)}#row{i}", "reason": "no_path",
                                     "detail": f"row {i} has an empty {cols.path!r} column"})
                continue
            path = _resolve(str(path), base)
            if cols.label is not None and _missing(rec[cols.label]):
                # A labelled collection with label-less rows: keep the contract (every sample has
                # `cls`) by reporting those rows instead of writing samples without a class.
                reject(f"{i:012d}", {"source": shown(path), "reason": "no_label",
                                     "detail": f"empty {cols.label!r} in a labelled manifest"})
                continue
            if kcol and not _missing(rec[kcol]):
                name = str(rec[kcol])
            else:
                name = os.path.splitext(path.split("://", 1)[1] if _is_url(path) else os.path.relpath(path, base))[0]
            label = None if cols.label is None else str(_json_value(rec[cols.label]))
            split = None if cols.split is None else str(rec[cols.split])
            extra = {c: _json_value(rec[c]) for c in extra_cols}
            who = f"{i}:{path}" if not part.name else f"{part.name}:{i}:{path}"
            entries.append((who, SourceItem(key=key_from(name), uri=path, size=0, label=label, split=split,
                                            extra=extra)))
        row += len(df)
        for (who, item), size in zip(entries, _sizes([it.uri for _, it in entries])):
            yield who, SourceItem(item.key, item.uri, size, item.label, item.split, item.extra)
    if part.single and row == 0:
        raise UserError(f"manifest {part.uri!r} has no rows; it must list at least one image")


def iter_part(part: ListingPart, reject: Reject) -> Iterator[tuple[str, SourceItem]]:
    """(source name, item) for each image of a part, in bounded memory; files that cannot be
    images go to `reject`. The item's key is not yet unique: a name that collides with another
    part's gets a suffix when the whole collection is known (pipeline.plan)."""
    if part.kind == "manifest":
        return _iter_manifest(part, reject)
    return _iter_folder(part, reject)


# ---------------------------------------------------------------------------------------------
# A whole (small) collection in memory


def list_source(src: str, *, path_column: str | None = None, label_column: str | None = None,
                split_from_source: bool = False) -> Source:
    """List SRC (folder tree or manifest) into memory, items sorted by unique key: to look at a
    collection. The shard stage lists part by part instead (`iter_part`), in bounded memory."""
    layout = describe_source(src, path_column=path_column, label_column=label_column,
                             split_from_source=split_from_source)
    found: list[tuple[str, dict]] = []
    keyed = []
    for part in layout.parts:
        keyed += [(item.key, (name, item)) for name, item in iter_part(part, lambda k, r: found.append((k, r)))]
    items = sorted((SourceItem(key, it.uri, it.size, it.label, it.split, it.extra)
                    for key, (_, it) in _dedupe_keys(keyed)), key=lambda it: it.key)
    if not items:
        raise UserError(no_images_message(src, layout.kind, len(found)))
    return Source(kind=layout.kind, uri=layout.uri, items=items,
                  classes=sort_labels(it.label for it in items if it.label is not None),
                  rejected=[r for _, r in found])


def no_images_message(src: str, kind: str, num_rejected: int) -> str:
    return (f"SRC {src!r} holds no images (found {num_rejected} other files); expected "
            f"{'rows with paths' if kind == 'manifest' else 'image files'} with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}")



def listing_digest(src: str) -> str:
    """sha256 identifying SRC's files (name, size, mtime): any added, removed or edited file changes
    it. Order-free (a sum of per-file hashes), so it streams: memory does not grow with SRC."""
    fs, root = fsspec.core.url_to_fs(src)
    local = local_path(src)
    total = 0

    def add(rel: str, size, mtime) -> None:
        nonlocal total
        entry = f"{rel}\0{size}\0{mtime}".encode("utf-8", "surrogateescape")
        total += int.from_bytes(hashlib.sha256(entry).digest(), "big")

    if local is not None and os.path.isdir(local):
        stack = [(local, "")]
        while stack:
            folder, rel = stack.pop()
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        try:
                            if e.is_dir():
                                stack.append((e.path, f"{rel}{e.name}/"))
                                continue
                            st = e.stat()
                            add(rel + e.name, st.st_size, st.st_mtime_ns)
                        except OSError:
                            add(rel + e.name, None, None)
            except OSError:
                add(rel, "unlistable", None)
    elif _has_glob(src) or (local is None and fs.isdir(root)):
        paths = fs.glob(root) if _has_glob(src) else (f"{d}/{n}" for d, _, names in fs.walk(root) for n in names)
        for path in paths:
            info = fs.info(path)
            add(path, info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("ETag"))
    elif fs.exists(root):
        info = fs.info(root)
        add(os.path.basename(root), info.get("size"), info.get("mtime") or info.get("LastModified")
            or info.get("ETag"))
    else:
        raise UserError(f"shard source {src!r} does not exist; pass a folder of images or a manifest file")
    return f"{total % 2**256:064x}"
