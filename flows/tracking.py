"""MLflow bookkeeping of a pipeline run: one parent run, one nested child run per stage.

Call these from flows only. The flow creates each stage's run *before* the stage starts and hands
its id to the stage (in-process: `activate`; launcher subprocess: `MLFLOW_RUN_ID` in its
environment, which `mlflow.start_run()` on rank 0 resumes). That way the stage code keeps its own
"one run per job" contract and still lands nested under the pipeline's parent run, and a stage that
crashes before its first log call still leaves a FAILED run behind instead of nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs by
FLOW_RUN_TAG = "prefect.flow_run_id"
FLOW_RUN_NAME_TAG = "prefect.flow_run_name"
STAGE_TAG = "vitpipe.stage"
DEFAULT_EXPERIMENT = "vitpipe"


def default_tracking_uri() -> str:
    """The tracking store when none is configured: MLflow's env var, else ./mlflow.db (SQLite)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Id of experiment `name`, created on first use (the training stages' own helper)."""
    from vit.tracking.tracker import experiment_id as _experiment_id

    return _experiment_id(uri, name)


def prefect_tags() -> dict[str, str]:
    """Tags that link an MLflow run back to the Prefect flow run that made it (empty outside a flow)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return {}
    return {FLOW_RUN_TAG: str(ctx.flow_run.id), FLOW_RUN_NAME_TAG: ctx.flow_run.name}


def start_run(uri: str, experiment: str, run_name: str, *, parent_run_id: str | None = None,
              stage: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Create a RUNNING run (nested under `parent_run_id` when given) and return its id."""
    all_tags = {**prefect_tags(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    if stage:
        all_tags[STAGE_TAG] = stage
    run = _client(uri).create_run(experiment_id(uri, experiment), run_name=run_name, tags=all_tags)
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Close a run unless its stage already did (a stage that ended FAILED stays FAILED)."""
    client = _client(uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def stage_run(uri: str, experiment: str, run_name: str, **kwargs: Any) -> Iterator[str]:
    """`with stage_run(...) as run_id:` a run that ends FINISHED, or FAILED if the body raises."""
    run_id = start_run(uri, experiment, run_name, **kwargs)
    try:
        yield run_id
    except BaseException:
        end_run(uri, run_id, "FAILED")
        raise
    end_run(uri, run_id, "FINISHED")


@contextlib.contextmanager
def activate(uri: str, run_id: str) -> Iterator[None]:
    """Make `run_id` the active fluent run, so stage code calling `mlflow.log_*` logs into it."""
    import mlflow

    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            yield
    finally:
        mlflow.set_tracking_uri(previous_uri)


def index_digest(index_path: str | Path) -> str:
    """sha256 of an `index.json`: it lists every shard's checksum, so it fingerprints the dataset."""
    return hashlib.sha256(Path(index_path).read_bytes()).hexdigest()


def log_dataset_input(uri: str, run_id: str, shards_dir: str | Path, *, name: str,
                      context: str = "training") -> str:
    """Record a shard set as an input of a run (name, digest of index.json, source); returns the digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    index_path = Path(shards_dir) / "index.json"
    digest = index_digest(index_path)
    index = json.loads(index_path.read_text())
    profile = {"num_classes": len(index.get("classes", [])), **index.get("totals", {}),
               "splits": {s: v.get("num_samples") for s, v in index.get("splits", {}).items()},
               "sha256": digest}
    dataset = Dataset(
        name=name,
        digest=digest[:32],  # the store caps digests at 36 characters; the full sha256 is in the profile
        source_type="local",
        source=json.dumps({"uri": str(Path(shards_dir).resolve())}),
        profile=json.dumps(profile),
    )
    _client(uri).log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])
    return digest


# MLflow 3's UI shows its GenAI navigation unless the address (or the person's last toggle) asks
# for model training; the experiments carry the kind too (vit.tracking.tracker.EXPERIMENT_KIND).
UI_TRAINING_VIEW = "workflowType=machine_learning"


def run_url(ui_url: str, uri: str, run_id: str) -> str:
    """Address of a run's page in the MLflow UI served at `ui_url`, in its model-training view."""
    exp_id = _client(uri).get_run(run_id).info.experiment_id
    return f"{ui_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}?{UI_TRAINING_VIEW}"


def ui_command(uri: str, port: int = 5000) -> str:
    """The shell command that opens the MLflow UI on a tracking store."""
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}"


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run."""
    return dict(_client(uri).get_run(run_id).data.metrics)


def adopt_run(uri: str, run_id: str, *, placeholder: str, parent_run_id: str | None, stage: str) -> None:
    """Put a run that a stage opened itself where the flow's `placeholder` run was, and drop the placeholder."""
    client = _client(uri)
    tags = {**prefect_tags(), STAGE_TAG: stage}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.delete_run(placeholder)
