"""What determines a stage's result, and the output folder it gets: no silent reuse of old results.

A flow's training or evaluation run is keyed on its inputs: the digest of the shard set's
`index.json` (which lists every shard's sha256), the identity of the starting model (the sha256 of
an export's weights or a timm file; a registry alias resolved to its version), and the resolved
config minus what cannot change the result (output and checkpoint paths, tracking). The run
writes into `OUT/<first 12 hex digits of the key>/`:

- the same inputs again land in the same folder: a finished run is skipped (its recorded
  results and MLflow run are reused, nothing is registered twice), an interrupted one resumes
  from its checkpoint;
- changed inputs (a re-sharded dataset, a new champion, another learning rate) land in a new
  folder and train from the start: never 0 steps on top of an old model.

`KEY_FILE` in the folder records the key and what went into it, for a person asking "why did this
run again".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from vit.tracking import lineage
from vitpipe.errors import UserError

KEY_FILE = "flow-key.json"
KEY_DIGITS = 12
# Config sections that say where results go and how they are tracked, not what they are.
_NOT_RESULT = {"out", "tracking", "checkpoint"}
_MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_digest(path: str | Path) -> str:
    """sha256 of a model's weights: an export folder's model.safetensors, or a weights file."""
    p = Path(path)
    if p.is_dir():
        weights = p / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"{str(p)!r} is not a vitpipe export (no model.safetensors in it); pass an export "
                            f"folder, a weights file or a models:/ or runs:/ URI")
        return file_digest(weights)
    if p.is_file():
        return file_digest(p)
    raise UserError(f"model {str(p)!r} does not exist; pass an export folder, a weights file (.safetensors, "
                    f".pt, .pth) or a models:/NAME@ALIAS or runs:/RUN_ID/model URI")


def split_alias(uri: str) -> tuple[str, str] | None:
    """('NAME', 'ALIAS') of `models:/NAME@ALIAS`, else None."""
    if not uri.startswith("models:/") or "@" not in uri:
        return None
    name, alias = uri[len("models:/"):].split("@", 1)
    return name, alias


def alias_version(uri: str, tracking_uri: str) -> str | None:
    """The version `models:/NAME@ALIAS` points at in the registry of `tracking_uri`, None if it does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flows.storage import local_store_path

    name, alias = split_alias(uri)
    store = local_store_path(tracking_uri)
    if store is not None and not os.path.exists(store):
        return None  # an empty store: asking would create it
    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def resolve_model(model: str, tracking_uri: str) -> tuple[str, str]:
    """(what to load, identity for a run key) of a model reference.

    An alias is resolved to its version now (`models:/NAME/3`), so the run trains from exactly
    the version its key names even if the alias moves meanwhile. Local paths become absolute.
    Raises UserError for a path that does not exist or an alias that does not exist (yet).
    """
    model = model.strip()
    if split_alias(model):
        version = alias_version(model, tracking_uri)
        if version is None:
            raise UserError(f"{model}: no such registered model alias in the MLflow registry at {tracking_uri}")
        name = split_alias(model)[0]
        pinned = f"models:/{name}/{version}"
        return pinned, pinned
    if model.startswith(_MLFLOW_SCHEMES):
        return model, model
    path = Path(model).expanduser().absolute()
    return str(path), f"sha256:{model_digest(path)}"


def _key(kind: str, parts: dict[str, Any]) -> str:
    blob = json.dumps({"kind": kind, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def result_config(cfg) -> dict[str, Any]:
    """The resolved config as far as it decides the result: no output, checkpoint or tracking
    settings, and no input paths (data.shards, init: the key has their digests instead)."""
    options = cfg.model_dump(mode="json", exclude=_NOT_RESULT | {"init"})
    options.get("data", {}).pop("shards", None)
    return options


def training_key(stage: str, cfg, *, dataset_digest: str, init_identity: str | None = None) -> str:
    return _key(stage, {"dataset": dataset_digest, "init": init_identity, "config": result_config(cfg)})


def evaluation_key(cfg, *, dataset_digest: str, model_identity: str) -> str:
    options = cfg.model_dump(mode="json", exclude={"out", "tracking", "model"})
    options.get("data", {}).pop("shards", None)
    return _key("evaluate", {"dataset": dataset_digest, "model": model_identity, "config": options})


def dataset_digest(shards: str) -> str:
    """sha256 of the shard set's index.json (local directory, the file itself, or a URL)."""
    try:
        return lineage.index_digest(str(shards))
    except FileNotFoundError:
        raise UserError(f"dataset {str(shards)!r} has no index.json; pass a shard directory written by "
                        f"'vitpipe shard'") from None


def run_folder(base: str | Path, key: str) -> Path:
    return Path(base) / key[:KEY_DIGITS]


def write_key(folder: Path, key: str, inputs: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KEY_FILE).write_text(json.dumps({"key": key, "inputs": inputs}, indent=2, default=str) + "\n")


def recorded_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / KEY_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold the run folder: two flow runs with the same inputs must not train into one checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another flow run is running {what} with the same inputs into {folder}; it produces "
                            f"the same result: wait for it (its record is reused) instead of running it twice") from None
        yield
    finally:
        os.close(fd)
