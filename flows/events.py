"""New datasets announce themselves to Prefect, however they arrive: `vitpipe.dataset.ready`.

The fine-tune deployment (`finetune/on-new-dataset`) triggers on this event. It is emitted by

- `shard_flow`, when it wrote a shard set (a cached re-run does not re-announce);
- `vitpipe shard` from a shell, when a Prefect API is configured (`PREFECT_API_URL` or the active
  Prefect profile); it says so in one line, and does not announce the same shard set to the same
  server twice (a re-run of a finished shard command is quiet). `VITPIPE_ANNOUNCE_DATASETS=0`
  turns it off;
- `watch_flow`, a scheduled deployment that looks for `index.json` files under a folder or a
  bucket prefix (any fsspec URL: `s3://bucket/datasets`) and announces each new or changed one
  (shard sets copied there by `cluster.object_store` or any other tool; the index is uploaded last,
  so a set is complete when its index is there).

The event's resource names the dataset: id `vitpipe.dataset.<name>`, `prefect.resource.name`,
`vitpipe.dataset.path` (directory or URL), `vitpipe.dataset.digest` (sha256 of its index.json) and
`vitpipe.dataset.run_id` (the MLflow run that made it, '' if none), so a triggered fine-tune knows
what to train on and where to nest its runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

DATASET_READY = "vitpipe.dataset.ready"
DATASET_RESOURCE_PREFIX = "vitpipe.dataset."
PATH_LABEL = "vitpipe.dataset.path"
DIGEST_LABEL = "vitpipe.dataset.digest"
RUN_LABEL = "vitpipe.dataset.run_id"
ANNOUNCE_ENV = "VITPIPE_ANNOUNCE_DATASETS"
_ANNOUNCED = Path(".vitpipe") / "announced.json"  # in a shard set written by `vitpipe shard`


def dataset_resource(name: str, path: str | Path, digest: str, run_id: str | None = None) -> dict[str, str]:
    """The Prefect event resource that names a shard set."""
    return {"prefect.resource.id": f"{DATASET_RESOURCE_PREFIX}{name}", "prefect.resource.name": name,
            PATH_LABEL: str(path), DIGEST_LABEL: digest, RUN_LABEL: run_id or ""}


def emit_dataset_ready(name: str, path: str | Path, digest: str, *, run_id: str | None = None,
                       payload: dict[str, Any] | None = None, timeout: float = 15.0) -> bool:
    """Emit `vitpipe.dataset.ready` and wait (up to `timeout` s) until it is sent; True if it was."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    event = emit_event(DATASET_READY, resource=dataset_resource(name, path, digest, run_id), payload=payload or {})
    if event is None:
        return False
    # Outside a flow run nothing drains the events worker before the process exits.
    EventsWorker.drain_all(timeout=timeout)
    return True


def configured_api() -> str | None:
    """The Prefect API this process would talk to, when one is configured (env or profile)."""
    if os.environ.get(ANNOUNCE_ENV, "1").lower() in ("0", "false", "no", "off"):
        return None
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if not _may_configure_api():
        return None
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _may_configure_api() -> bool:
    """Whether a Prefect settings file could set the API URL (importing Prefect to ask costs a second
    or two on every `vitpipe shard`): the profiles file, or prefect.toml / pyproject.toml / .env here."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    files = [Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml"),
             Path("prefect.toml"), Path("pyproject.toml"), Path(".env")]
    for f in files:
        try:
            if "api" in f.read_text(errors="replace").lower():
                return True
        except OSError:
            continue
    return False


def _reachable(api: str, timeout: float = 5.0) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(api.rstrip("/") + "/health", timeout=timeout):
            return None
    except OSError as e:
        return str(getattr(e, "reason", e))


def _payload(index: dict) -> dict[str, Any]:
    return {"num_samples": index.get("totals", {}).get("num_samples"), "classes": index.get("classes", [])}


def announce_sharded(out: str | Path, *, say=print) -> bool:
    """After `vitpipe shard SRC OUT`: announce OUT to the configured Prefect API, once per digest and
    server. Never fails the shard command: a server that is down is said, with what to do."""
    try:
        return _announce_sharded(Path(out).absolute(), say)
    except Exception as e:  # the shards are written: a Prefect problem must not fail the command
        say(f"vitpipe shard: the shard set is complete, but announcing it to Prefect failed ({type(e).__name__}: "
            f"{e}); re-run this command to try again")
        return False


def _announce_sharded(out: Path, say) -> bool:
    api = configured_api()
    if api is None or not (out / "index.json").is_file():
        return False
    raw = (out / "index.json").read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    marker = out / _ANNOUNCED
    try:
        if json.loads(marker.read_text()) == {"digest": digest, "api": api}:
            return False
    except (OSError, ValueError):
        pass
    problem = _reachable(api)
    if problem:
        say(f"vitpipe shard: could not announce {out.name!r} to Prefect at {api} ({problem}); the shards are "
            f"complete; re-run this command when the server is up to announce them (it skips the finished shards)")
        return False
    if not emit_dataset_ready(out.name, out, digest, payload=_payload(json.loads(raw))):
        say(f"vitpipe shard: Prefect at {api} does not take events; {out.name!r} was not announced")
        return False
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(json.dumps({"digest": digest, "api": api}))
    say(f"vitpipe shard: announced dataset {out.name!r} ({DATASET_READY}, index sha256 {digest[:12]}) to "
        f"Prefect at {api}; deployments triggered by new datasets start now")
    return True


# ---------------------------------------------------------------------------------------------
# Watching a folder or a bucket prefix


def find_indexes(root: str, pattern: str = "*/index.json") -> dict[str, str]:
    """{shard set directory (or URL): sha256 of its index.json} for every `pattern` match under `root`."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found = {}
    for path in sorted(fs.glob(f"{base.rstrip('/')}/{pattern}")):
        with fs.open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        folder = path.rsplit("/", 1)[0]
        found[folder if protocol in ("file", "local") else f"{protocol}://{folder}"] = digest
    return found


def _variable(root: str, folder: str | None = None) -> str:
    """Prefect Variable names of a watcher of `root`: one marks its first look, one per shard set
    holds the digest last announced (a Variable holds at most 5000 characters, so not one map)."""
    name = "vitpipe-watch-" + hashlib.sha256(root.encode()).hexdigest()[:16]
    return name if folder is None else f"{name}-{hashlib.sha256(folder.encode()).hexdigest()[:16]}"


def watch_once(root: str, pattern: str = "*/index.json", *, announce_existing: bool = True) -> list[dict]:
    """Announce the shard sets under `root` that are new or changed since the last call; returns them.

    What was announced is kept in Prefect Variables (on the server, so any worker continues where
    another left off). On the very first look, `announce_existing=False` only records what is
    there (a watcher added to a bucket full of old datasets does not fine-tune all of them).
    """
    from prefect.variables import Variable

    first = Variable.get(_variable(root), default=None) is None
    announced = []
    for folder, digest in find_indexes(root, pattern).items():
        key = _variable(root, folder)
        if Variable.get(key, default=None) == digest:
            continue
        if not first or announce_existing:
            dataset = folder.rstrip("/").rsplit("/", 1)[-1]
            emit_dataset_ready(dataset, folder, digest)
            announced.append({"name": dataset, "path": folder, "digest": digest})
        Variable.set(key, digest, overwrite=True)  # after each: a stopped watcher does not repeat these
    if first:
        Variable.set(_variable(root), "watching", overwrite=True)
    return announced


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.events announce OUT`: announce a shard set by hand."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.events")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("announce", help="announce a shard set to the configured Prefect API").add_argument("out")
    args = parser.parse_args(argv)
    (Path(args.out) / _ANNOUNCED).unlink(missing_ok=True)
    return 0 if announce_sharded(args.out) else 1


if __name__ == "__main__":
    sys.exit(main())
