"""`watch_flow`: announce new shard sets that appear under a folder or a bucket prefix.

    vitpipe deploy ... --watch s3://my-bucket/datasets --watch-every 300

deploys it on an interval schedule: each run lists `ROOT/*/index.json` (any fsspec URL; S3
credentials and `FSSPEC_S3_ENDPOINT_URL` from the worker's environment) and emits
`vitpipe.dataset.ready` for every shard set that is new or whose index changed since the last
look, so the fine-tune deployment trains on it as on a set sharded by `shard_flow`. See
`flows.events.watch_once` for how it remembers what it announced.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.events import watch_once


@flow(name="watch", log_prints=True)
def watch_flow(root: str, pattern: str = "*/index.json", announce_existing: bool = True) -> list[dict]:
    """Announce the shard sets under `root` that are new or changed since the last run; returns them."""
    announced = watch_once(root, pattern, announce_existing=announce_existing)
    logger = get_run_logger()
    for item in announced:
        logger.info("announced dataset %r at %s (index sha256 %s)", item["name"], item["path"], item["digest"][:12])
    print(f"watch: {len(announced)} new or changed shard set(s) under {root}")
    return announced
