"""Dataset lineage: which shard set (by the digest of its index.json) a run read.

Every training run calls `log_training_inputs` on rank 0, however it was launched (the CLI,
`vitpipe launch`, Slurm, a flow), so the MLflow UI's "Datasets used" of each run names its shard
set, its digest and where it lives. `index.json` lists every shard's sha256, so its own digest
fingerprints the whole dataset: two runs with the same digest read the same bytes.

MLflow deduplicates an input logged twice with the same name and digest, so a resumed run (or a
flow that also logs the input) keeps one entry per dataset.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

MAX_DIGEST = 32  # MLflow's store caps a dataset digest at 36 characters; the full sha256 is in the profile


def _shards_root(shards: str) -> str:
    """A shard set's directory (or URL) from a `data.shards` value: the directory or its index.json."""
    text = str(shards).rstrip("/")
    return text[: -len("/index.json")] if text.endswith("/index.json") else text


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def read_index_bytes(shards: str) -> bytes:
    """The bytes of a shard set's index.json, local or at any fsspec URL."""
    root = _shards_root(shards)
    if _is_url(root):
        import fsspec

        with fsspec.open(f"{root}/index.json", "rb") as f:
            return f.read()
    from pathlib import Path

    return (Path(root.removeprefix("file://")) / "index.json").read_bytes()


def index_digest(shards: str) -> str:
    """sha256 of a shard set's index.json."""
    return hashlib.sha256(read_index_bytes(shards)).hexdigest()


def dataset_source(shards: str) -> tuple[str, str]:
    """(source type, location) of a shard set: ('local', absolute dir) or ('s3', 's3://...')."""
    root = _shards_root(shards)
    if _is_url(root):
        return root.split("://", 1)[0], root
    from pathlib import Path

    return "local", str(Path(root.removeprefix("file://")).resolve())


def dataset_name(shards: str) -> str:
    return _shards_root(shards).rstrip("/").rsplit("/", 1)[-1]


def dataset_entity(shards: str, *, name: str | None = None) -> tuple[Any, str]:
    """(mlflow Dataset, full sha256) of a shard set: name, digest, source, and a profile of its counts."""
    from mlflow.entities import Dataset

    raw = read_index_bytes(shards)
    digest = hashlib.sha256(raw).hexdigest()
    index = json.loads(raw)
    profile = {"num_classes": len(index.get("classes", [])), **index.get("totals", {}),
               "splits": {s: v.get("num_samples") for s, v in index.get("splits", {}).items()},
               "sha256": digest}
    source_type, location = dataset_source(shards)
    return Dataset(name=name or dataset_name(shards), digest=digest[:MAX_DIGEST], source_type=source_type,
                   source=json.dumps({"uri": location}), profile=json.dumps(profile)), digest


def dataset_input(shards: str, *, name: str | None = None, context: str = "training") -> tuple[Any, str]:
    """(mlflow DatasetInput, full sha256) for logging a shard set as an input of a run."""
    from mlflow.entities import DatasetInput, InputTag

    dataset, digest = dataset_entity(shards, name=name)
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context)]), digest


def log_training_inputs(tracker, cfg) -> None:
    """Log the training run's shard set as its input (rank 0's tracker; a no-op when tracking is off).

    A shard set that cannot be read here is not logged (with a warning); training goes on.
    """
    if not getattr(tracker, "active", False) or not tracker.run_id:
        return
    import sys

    from mlflow import MlflowClient

    try:
        item, _ = dataset_input(cfg.data.shards, context="training")
        # Once, at the start, right after the tracker found the server up; bounded by the HTTP
        # timeouts the tracker sets.
        MlflowClient(tracker.uri).log_inputs(tracker.run_id, [item])
    except Exception as e:  # unreadable index, store error: the run trains on, without this record
        print(f"dataset input of {cfg.data.shards!r} not logged to MLflow ({type(e).__name__}: {e})", file=sys.stderr)
