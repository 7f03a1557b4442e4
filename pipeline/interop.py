"""What other readers need beside the shards: Hugging Face `datasets`, wids and DALI read a shard set as it is.

`vitpipe shard` writes, before index.json (so index.json stays the last file of a complete set):

- `README.md`: a dataset card whose YAML header lists each split's shards, so
  `datasets.load_dataset(OUT)` finds the splits under their own names (train, val, ...), regular or
  `streaming=True`; `load_dataset("webdataset", data_files=...)` reads the shards too.
- `SPLIT.wids.json`: a `wids-shard-index-v1` shard list per split (names relative to OUT, sample
  counts, sizes) for webdataset's random-access reader, `wids.ShardListDataset("OUT/train.wids.json")`.
- `SPLIT-NNNNNN.idx` beside each non-empty shard: DALI's index (`v1.2`, the format and file name its
  `wds2idx` tool writes) for `fn.readers.webdataset(paths=..., index_paths=..., ext=[...])`.

Hugging Face's webdataset builder needs every sample of a dataset to have the same member names
(it infers the columns from the first samples and drops members it did not see there). So a shard
set names every image member with one extension, `image_member_ext`, even when the collection
mixes formats; the bytes stay the source's, each sample's .json says the real format, and every
decoder these readers use (PIL, torchvision, nvImageCodec) reads the format from the bytes.

`check_reader_files` is what `vitpipe verify` runs on them; `python -m pipeline.interop OUT`
writes them for a shard set made before vitpipe wrote them.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable

from pipeline.index import INDEX_NAME, load_index
from pipeline.tar_reader import member_offsets, split_key

CARD_NAME = "README.md"
WIDS_SUFFIX = ".wids.json"
WIDS_KIND = "wids-shard-index-v1"
DALI_SUFFIX = ".idx"
DALI_VERSION = "v1.2"
DEFAULT_IMAGE_EXT = "jpg"  # when no input's name says its format (URLs without an extension)

# A listed file's extension -> the member extension of its format (pipeline.images.FORMAT_EXTENSIONS).
_FORMAT_OF_SUFFIX = {".jpg": "jpg", ".jpeg": "jpg", ".jpe": "jpg", ".jfif": "jpg", ".png": "png", ".webp": "webp",
                     ".bmp": "bmp", ".gif": "gif", ".tif": "tiff", ".tiff": "tiff", ".ppm": "ppm", ".pgm": "ppm",
                     ".pbm": "ppm", ".pnm": "ppm"}


def image_member_ext(uris: Iterable[str]) -> str:
    """The one extension the image members of a shard set get, from its inputs' names: the format
    of the most inputs (ties: alphabetical), jpg when no name says one. Decided from the listing,
    before any byte is read, so the shards stay a pure function of the source."""
    counts: Counter[str] = Counter()
    for uri in uris:
        name = uri.rsplit("/", 1)[-1].split("?", 1)[0]
        dot = name.rfind(".")
        fmt = _FORMAT_OF_SUFFIX.get(name[dot:].lower()) if dot > 0 else None
        if fmt:
            counts[fmt] += 1
    if not counts:
        return DEFAULT_IMAGE_EXT
    return min(counts, key=lambda fmt: (-counts[fmt], fmt))


def is_reader_file(name: str) -> bool:
    """Whether a file name in OUT is one of these (so --overwrite may delete it)."""
    return name == CARD_NAME or name.endswith((WIDS_SUFFIX, DALI_SUFFIX))


# ---------------------------------------------------------------------------------------------
# The files


def dali_index(tar_path: str | Path) -> str:
    """DALI's index of a shard: `v1.2 N`, then per sample `ext offset size name` per member (the
    member's data offset in bytes), as DALI's wds2idx writes it. Reads only the tar headers."""
    samples: list[list[str]] = []
    last = None
    for name, offset, size in member_offsets(tar_path):
        key, ext = split_key(name)
        if not key or key.endswith("/"):  # hidden files: DALI skips them too
            continue
        if key != last:
            samples.append([])
            last = key
        samples[-1].append(f"{ext} {offset} {size} {name}")
    return f"{DALI_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def dali_index_of_members(samples: Iterable[Iterable[tuple[str, int]]]) -> str:
    """`dali_index` computed from what was written, without reading: the (name, size) of each
    member of each sample, in order, as the shard's tar writer laid them out from byte 0."""
    from pipeline.tar_writer import tar_member_bytes

    lines, pos = [], 0
    for members in samples:
        parts = []
        for name, size in members:
            # pipeline.tar_writer's layout: a 512-byte header (plus GNU long-name blocks), then
            # the data padded to 512 bytes; inlined for the common short name (~3x faster)
            n = len(name) if name.isascii() else len(name.encode())
            data = pos + (512 if n <= 100 else tar_member_bytes(n, 0))
            parts.append(f"{name[name.find('.', name.rfind('/') + 1) + 1:]} {data} {size} {name}")
            pos = data + (size + 511) // 512 * 512
        lines.append(" ".join(parts))
    return f"{DALI_VERSION} {len(lines)}\n" + "\n".join(lines) + ("\n" if lines else "")


def write_dali_index(tar_path: str | Path, samples: list[list[tuple[str, int]]]) -> None:
    """Write DALI's index beside a shard just written (`pipeline.run.write_shard`), from its members'
    names and sizes; none for an empty shard (DALI refuses an index of an empty archive)."""
    path = Path(tar_path)
    idx = path.with_name(path.name.removesuffix(".tar") + DALI_SUFFIX)
    if samples:
        _write_text_atomic(idx, dali_index_of_members(samples))
    else:
        idx.unlink(missing_ok=True)


def wids_index(index: dict, split: str) -> dict:
    """The wids-shard-index-v1 description of a split (shard urls relative to the shard set)."""
    entry = index["splits"][split]
    return {
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "name": split,
        "shardlist": [{"url": s["name"], "nsamples": s["num_samples"], "filesize": s["num_bytes"],
                       "sha256": s["sha256"]} for s in entry["shards"]],
    }


def dataset_card(index: dict, image_ext: str | None) -> str:
    """README.md: the Hugging Face dataset card. Its `configs` list the non-empty shards of each
    split with samples (an empty tar would stop the builder's look at the first samples)."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, entry in index["splits"].items():
        names = [s["name"] for s in entry["shards"] if s["num_samples"] > 0]
        if not names:
            continue
        lines.append(f"  - split: {split}")
        if len(names) == len(entry["shards"]):
            lines.append(f'    path: "{split}-*.tar"')
        else:
            lines.append("    path:")
            lines += [f'    - "{n}"' for n in names]
    lines += ["tags: [webdataset, image-classification, vitpipe]", "---", ""]
    classes = index.get("classes") or []
    counts = ", ".join(f"{s} {v['num_samples']}" for s, v in index["splits"].items())
    ext = image_ext or "jpg"
    cols = f'"{ext}", "cls"' if classes else f'"{ext}"'
    lines += [
        "# Image shards written by vitpipe",
        "",
        f"WebDataset tar shards: {counts} samples; each sample is `KEY.{ext}` (the source image bytes; "
        f"the real format is in `KEY.json`'s `format`), " + ("`KEY.cls` (class id), " if classes else "")
        + "`KEY.json` (source, size, format, label). `index.json` has counts and checksums.",
        "",
        "```python",
        "from datasets import load_dataset",
        "ds = load_dataset(\"FOLDER\")                  # splits: " + ", ".join(
            s for s, v in index["splits"].items() if v["num_samples"]),
        *(["ds = ds.cast_column(\"cls\", ClassLabel(names=[...]))  # the classes below"] if classes else []),
        "import wids",
        "train = wids.ShardListDataset(\"FOLDER/train.wids.json\")",
        "from nvidia.dali import fn",
        f"images, labels = fn.readers.webdataset(paths=TARS, index_paths=IDX_FILES, ext=[{cols}])",
        "```",
        "",
    ]
    if classes:
        lines += ["Classes (`cls` is the position in this list): " + ", ".join(map(str, classes)), ""]
    return "\n".join(lines)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reader_files(out: str | Path, index: dict, image_ext: str | None = None, *,
                       rewrite: bool = False) -> list[str]:
    """Write the dataset card and the wids index of each split into the local shard set `out`,
    from its (about to be written) index, and the DALI index of each non-empty shard that has none
    (the shard writer writes them as it goes; `rewrite` makes them all again from the tars);
    returns their names. `image_ext`: the image members' extension (else read off the first shard)."""
    out = Path(out)
    written = []
    for split in index["splits"]:
        name = f"{split}{WIDS_SUFFIX}"
        _write_text_atomic(out / name, json.dumps(wids_index(index, split), indent=1) + "\n")
        written.append(name)
        for s in index["splits"][split]["shards"]:
            if s["num_samples"] > 0:  # DALI (and wds2idx) refuse an index of an empty archive
                idx = s["name"].removesuffix(".tar") + DALI_SUFFIX
                if rewrite or not (out / idx).is_file():  # the shard writer made it (write_dali_index)
                    _write_text_atomic(out / idx, dali_index(out / s["name"]))
                written.append(idx)
    _write_text_atomic(out / CARD_NAME, dataset_card(index, image_ext or _first_image_ext(out, index)))
    return [CARD_NAME, *written]


def _first_image_ext(out: Path, index: dict) -> str | None:
    for entry in index["splits"].values():
        for s in entry["shards"]:
            if s["num_samples"]:
                with tarfile.open(out / s["name"], "r:") as tar:
                    for m in tar:
                        ext = split_key(m.name)[1]
                        if ext not in ("cls", "json"):
                            return ext
    return None


def check_reader_files(root: str, index: dict) -> list[str]:
    """Problems of the reader files of the shard set in folder `root` (what `vitpipe verify` adds):
    each split's wids index must describe the shards index.json lists, and each DALI index must be
    the one the shard's headers give. A remote set (an fsspec URL) is not checked here."""
    if "://" in root and not root.startswith("file://"):
        return []
    root = Path(root.removeprefix("file://"))
    problems = []
    fix = f"re-write them with 'python -m pipeline.interop {root}'"
    for split in index["splits"]:
        path = root / f"{split}{WIDS_SUFFIX}"
        try:
            found = json.loads(path.read_text())
        except FileNotFoundError:
            problems.append(f"{path.name}: missing (the wids index of split {split!r}); {fix}")
            continue
        except ValueError as e:
            problems.append(f"{path.name}: not valid JSON ({e}); {fix}")
            continue
        if found != wids_index(index, split):
            problems.append(f"{path.name}: does not describe the shards index.json lists for {split!r}; {fix}")
        for s in index["splits"][split]["shards"]:
            if not s["num_samples"] or not (root / s["name"]).is_file():
                continue  # a missing shard is reported by the shard check
            idx = root / (s["name"].removesuffix(".tar") + DALI_SUFFIX)
            try:
                text = idx.read_text()
            except FileNotFoundError:
                problems.append(f"{idx.name}: missing (DALI's index of {s['name']}); {fix}")
                continue
            try:
                expected = dali_index(root / s["name"])
            except (tarfile.TarError, OSError):
                continue  # an unreadable shard is reported by the shard check
            if text != expected:
                problems.append(f"{idx.name}: does not match the members of {s['name']}; {fix}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipeline.interop OUT   (a local shard set written by 'vitpipe shard')",
              file=sys.stderr)
        return 2
    index = load_index(args[0])
    root = Path(index["_root"])
    names = write_reader_files(root, {k: v for k, v in index.items() if k != "_root"}, rewrite=True)
    print(f"wrote {len(names)} reader files ({CARD_NAME}, wids and DALI indexes) beside {root / INDEX_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
