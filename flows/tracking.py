"""MLflow bookkeeping of a pipeline run: one parent run, one nested child run per stage.

Call these from flows only. The flow creates each stage's run *before* the stage starts and hands
its id to the stage (in-process: `activate`; launcher subprocess: `MLFLOW_RUN_ID` in its
environment, which `mlflow.start_run()` on rank 0 resumes). That way the stage code keeps its own
"one run per job" contract and still lands nested under the pipeline's parent run, and a stage that
crashes before its first log call still leaves a FAILED run behind instead of nothing.

A tracking server that is down never holds a flow up for long: every call here has a bounded
HTTP timeout and one retry, a server that does not answer its health check within a few seconds
is reported once (a warning in the flow run's log) and the flow goes on without tracking. The
stages' own data stay where they always are (shards, checkpoints, exports and `results.json` in
their output folders); their MLflow records are not written then. Re-running the flow once the
server is back logs them: finished stages are skipped, and a skipped stage without an MLflow
record gets one (metrics, config and model from its output folder).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from flows.storage import default_tracking_uri as _default_tracking_uri
from vit.tracking import lineage

# MLflow's defaults (120 s timeout, 7 retries with backoff) hold a flow for minutes when the server
# is down; set before the first request (MLflow reads them per request), unless the user chose.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
HEALTH_TIMEOUT_S = 5
_RECHECK_S = 60.0

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs by
FLOW_RUN_TAG = "prefect.flow_run_id"
FLOW_RUN_NAME_TAG = "prefect.flow_run_name"
STAGE_TAG = "vitpipe.stage"
DEFAULT_EXPERIMENT = "vitpipe"


T = TypeVar("T")


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The flow's tracking URI: `explicit` (the deployment's), else $MLFLOW_TRACKING_URI, else the
    SQLite store in $VITPIPE_HOME (~/.vitpipe/mlflow.db); a local store path made absolute."""
    from flows.storage import absolute, local_store_path

    uri = explicit or _default_tracking_uri()
    path = local_store_path(uri)
    if path is not None and not os.path.isabs(path) and uri.startswith("sqlite:///"):
        return f"sqlite:///{absolute(path)}"
    return uri


default_tracking_uri = resolve_tracking_uri


def _log() -> logging.Logger | logging.LoggerAdapter:
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        from prefect import get_run_logger

        return get_run_logger()
    return logging.getLogger("vitpipe.flows")


_down: dict[str, tuple[float, str]] = {}  # uri -> (when found down, why)


def unavailable(uri: str) -> str | None:
    """Why the tracking server at `uri` cannot be used now, or None (re-probed after a minute)."""
    from vit.tracking.tracker import check_reachable

    seen = _down.get(uri)
    if seen and time.monotonic() - seen[0] < _RECHECK_S:
        return seen[1]
    why = check_reachable(uri, timeout_s=HEALTH_TIMEOUT_S)
    if why:
        if not seen:
            _log().warning(
                "MLflow tracking server %s is unreachable (%s): the flow goes on WITHOUT tracking. The stages' data "
                "are kept in their output folders; their MLflow records are not logged now. Re-run the flow when "
                "the server is back to log them (finished stages are skipped)", uri, why)
        _down[uri] = (time.monotonic(), why)
    else:
        _down.pop(uri, None)
    return why


def guarded(uri: str, what: str, call: Callable[[], T], default: T = None) -> T:
    """`call()`, or `default` with a warning when the tracking store fails (it never fails the flow)."""
    if uri in _down and unavailable(uri):
        return default
    try:
        return call()
    except Exception as e:  # MlflowException, requests' and sqlite's errors: all mean "not tracked"
        _log().warning("MLflow: %s failed (%s: %s); not logged, the flow goes on", what, type(e).__name__,
                       str(e).splitlines()[0][:300] if str(e) else "")
        _down.setdefault(uri, (time.monotonic(), str(e)[:200]))
        return default


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
              stage: str | None = None, tags: dict[str, str] | None = None) -> str | None:
    """Create a RUNNING run (nested under `parent_run_id` when given) and return its id; None when
    the tracking server is unreachable (warned once)."""
    if unavailable(uri):
        return None
    all_tags = {**prefect_tags(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    if stage:
        all_tags[STAGE_TAG] = stage

    def create() -> str:
        run = _client(uri).create_run(experiment_id(uri, experiment), run_name=run_name, tags=all_tags)
        return run.info.run_id

    return guarded(uri, f"creating the {stage or run_name} run", create)


def end_run(uri: str, run_id: str | None, status: str = "FINISHED") -> None:
    """Close a run unless its stage already did (a stage that ended FAILED stays FAILED)."""
    if run_id is None:
        return

    def end() -> None:
        client = _client(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)

    guarded(uri, f"closing run {run_id} as {status}", end)


@contextlib.contextmanager
def stage_run(uri: str, experiment: str, run_name: str, **kwargs: Any) -> Iterator[str | None]:
    """`with stage_run(...) as run_id:` a run that ends FINISHED, or FAILED if the body raises
    (KILLED if the flow run is stopped by a signal). `run_id` is None without tracking."""
    run_id = start_run(uri, experiment, run_name, **kwargs)
    try:
        yield run_id
    except BaseException as e:
        end_run(uri, run_id, "KILLED" if type(e).__name__ == "TerminationSignal" else "FAILED")
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


@contextlib.contextmanager
def using(uri: str) -> Iterator[None]:
    """Make `uri` the process-wide MLflow tracking (and registry) URI for a while, then restore it."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def index_digest(shards: str | Path) -> str:
    """sha256 of a shard set's `index.json` (the directory, the file, or an fsspec URL of either):
    it lists every shard's checksum, so it fingerprints the dataset."""
    return lineage.index_digest(str(shards))


def log_dataset_input(uri: str, run_id: str | None, shards_dir: str | Path, *, name: str,
                      context: str = "training") -> str:
    """Record a shard set as an input of a run (name, digest of index.json, source); returns the digest."""
    item, digest = lineage.dataset_input(str(shards_dir), name=name, context=context)
    if run_id is not None:
        guarded(uri, f"logging dataset {name!r} as an input", lambda: _client(uri).log_inputs(run_id, [item]))
    return digest


# MLflow 3's UI shows its GenAI navigation unless the address (or the person's last toggle) asks
# for model training; the experiments carry the kind too (vit.tracking.tracker.EXPERIMENT_KIND).
UI_TRAINING_VIEW = "workflowType=machine_learning"


def run_url(ui_url: str, uri: str, run_id: str | None) -> str:
    """Address of a run's page in the MLflow UI served at `ui_url`, in its model-training view ('' without a run)."""
    if run_id is None:
        return ""
    exp_id = guarded(uri, "reading the run's experiment", lambda: _client(uri).get_run(run_id).info.experiment_id)
    return f"{ui_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}?{UI_TRAINING_VIEW}" if exp_id else ""


def ui_command(uri: str, port: int = 5000) -> str:
    """The shell command that opens the MLflow UI on a tracking store."""
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}"


def run_metrics(uri: str, run_id: str | None) -> dict[str, float]:
    """The latest value of every metric of a run ({} without tracking)."""
    if run_id is None:
        return {}
    return guarded(uri, "reading the run's metrics", lambda: dict(_client(uri).get_run(run_id).data.metrics), {})


def adopt_run(uri: str, run_id: str, *, placeholder: str | None, parent_run_id: str | None, stage: str,
              tags: dict[str, str] | None = None) -> None:
    """Put a run that a stage opened itself where the flow's `placeholder` run was, and drop the placeholder."""
    def adopt() -> None:
        client = _client(uri)
        all_tags = {**prefect_tags(), STAGE_TAG: stage, **(tags or {})}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        for key, value in all_tags.items():
            client.set_tag(run_id, key, value)
        if placeholder:
            client.delete_run(placeholder)

    guarded(uri, f"moving run {run_id} into the flow's tree", adopt)


def same_experiment(uri: str, run_id: str | None, experiment: str) -> bool:
    """Whether `run_id` exists and is in `experiment` (MLflow nests runs within one experiment only)."""
    if not run_id:
        return False

    def check() -> bool:
        client = _client(uri)
        exp = client.get_experiment(client.get_run(run_id).info.experiment_id)
        return exp.name == experiment

    return bool(guarded(uri, f"reading run {run_id}", check, False))


def log_late_record(uri: str, experiment: str, run_name: str, *, stage: str, params: dict[str, Any],
                    metrics: dict[str, float], artifacts: dict[str, Path], parent_run_id: str | None,
                    tags: dict[str, str] | None = None, dataset: tuple[str, str, str] | None = None) -> str | None:
    """The MLflow record of a stage that ran while tracking was down, from what it left on disk.

    `artifacts`: {artifact path: local file or folder}; `dataset`: (shards, name, context).
    Returns the new run's id, or None if tracking is still unavailable.
    """
    run_id = start_run(uri, experiment, run_name, parent_run_id=parent_run_id, stage=stage,
                       tags={"vitpipe.logged_late": "true", **(tags or {})})
    if run_id is None:
        return None

    def log() -> None:
        from mlflow.entities import Metric, Param

        from vit.tracking.tracker import flatten

        client = _client(uri)
        now = int(time.time() * 1000)
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i:i + 100])
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for path, local in artifacts.items():
            if local.is_dir():
                client.log_artifacts(run_id, str(local), path)
            elif local.is_file():
                client.log_artifact(run_id, str(local), path or None)
        if dataset:
            log_dataset_input(uri, run_id, dataset[0], name=dataset[1], context=dataset[2])

    guarded(uri, f"logging the {stage} record late", log)
    end_run(uri, run_id, "FINISHED")
    return run_id
