"""Copy a finished shard set to object storage (S3, GCS, any fsspec URL) so cluster nodes read it there.

Call it after `vitpipe shard` when training runs where the shards are not: the shard stage writes
to a local or shared directory, and every reader (`vitpipe pretrain` with `data.shards:
s3://...`, `vitpipe verify s3://...`) takes an fsspec URL.

    python -m cluster.object_store OUT s3://bucket/datasets/digits

Why not `aws s3 sync`: readers treat an `index.json` as the promise that the whole set is there,
so it must arrive last, and an old one must go first; this copies in that order and checks each
shard's size on arrival. Credentials and endpoints come from the usual places: AWS_* variables or
~/.aws for S3, and fsspec's `FSSPEC_S3_ENDPOINT_URL` (or `storage_options`) for S3-compatible
stores such as MinIO or Ceph.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fsspec
from tqdm.auto import tqdm

from pipeline.index import INDEX_NAME, load_index
from vitpipe.errors import UserError

# Written by the shard stage beside the shards; copied for the record, before index.json.
SIDE_FILES = ("config.yaml", "stats.json", "failures.jsonl")


def upload_shard_set(local_dir: str | Path, url: str, *, storage_options: dict | None = None) -> int:
    """Copy the complete shard set in `local_dir` to `url` (index.json last); returns bytes copied."""
    local_dir = Path(local_dir)
    index = load_index(str(local_dir))  # refuses an unfinished set: no index.json yet
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    shards = [s for split in index["splits"].values() for s in split["shards"]]
    missing = [s["name"] for s in shards if not (local_dir / s["name"]).is_file()]
    if missing:
        raise UserError(f"{local_dir}: index.json lists shards that are not there ({', '.join(missing[:3])}"
                        f"{'...' if len(missing) > 3 else ''}); run 'vitpipe verify {local_dir}' and re-shard")

    # A reader must never pair an old index with new shards.
    if fs.exists(f"{root}/{INDEX_NAME}"):
        fs.rm(f"{root}/{INDEX_NAME}")
    fs.makedirs(root, exist_ok=True)
    total = sum(s["num_bytes"] for s in shards)
    copied = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {url}", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for s in shards:
            remote = f"{root}/{s['name']}"
            fs.put_file(str(local_dir / s["name"]), remote)
            size = fs.info(remote)["size"]
            if size != s["num_bytes"]:
                raise RuntimeError(f"{url}/{s['name']}: {size} bytes arrived, the index says "
                                   f"{s['num_bytes']}; re-run the upload")
            copied += size
            bar.update(size)
    for name in SIDE_FILES:
        if (local_dir / name).is_file():
            fs.put_file(str(local_dir / name), f"{root}/{name}")
    fs.put_file(str(local_dir / INDEX_NAME), f"{root}/{INDEX_NAME}")
    print(f"uploaded {len(shards)} shards ({copied / 1e6:.1f} MB, "
          f"{index['totals']['num_samples']} samples) -> {url}")
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.object_store",
                                     description="copy a finished shard set to object storage, index.json last")
    parser.add_argument("src", help="local shard set directory (holding index.json)")
    parser.add_argument("url", help="destination fsspec URL, e.g. s3://bucket/datasets/digits")
    args = parser.parse_args(argv)
    try:
        upload_shard_set(args.src, args.url)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
