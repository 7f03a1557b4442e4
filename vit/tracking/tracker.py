"""MLflow tracking of a training job: one run, written by rank 0 only, never blocking training.

`Tracker.open(...)` on rank 0 starts (or, on resume, reopens) the job's run; on other ranks it
returns a tracker that does nothing, so the training loop calls it without asking who it is. A
tracking server that does not answer within a few seconds is reported once and tracking is turned
off for the job (or, with `tracking.fail_fast`, the job stops before training starts).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from vit.train.config import TrackingSection
from vitpipe.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
# Model references MLflow resolves (runs:/ID/model, models:/NAME@ALIAS, ...), not local paths.
MLFLOW_MODEL_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_MODEL_SCHEMES)
# Seconds before an HTTP tracking server counts as unreachable; MLflow's own default retries for minutes.
CONNECT_TIMEOUT_S = 5


def resolve_uri(section: TrackingSection) -> str:
    """Tracking URI: the config, else $MLFLOW_TRACKING_URI, else a SQLite file in the working dir."""
    return section.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_reachable(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why `uri` cannot be used right now, or None; only HTTP servers are probed (stores are local)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status >= 500:
                return f"server answered HTTP {resp.status}"
    except OSError as e:  # URLError, timeouts, refused connections
        return str(getattr(e, "reason", e))
    return None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment in the store at `uri` keeps its artifacts: for a SQLite store, the
    folder `mlartifacts/` beside the database, so the store is one folder to copy, share or delete
    (MLflow's default is ./mlruns of whatever directory the first run started in). None: the
    store's default (a tracking server decides itself)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlartifacts").as_uri()


# The MLflow UI (3.x) opens an experiment in the view its `mlflow.experimentKind` tag names; without
# one it offers the GenAI view (traces, evaluation runs). vitpipe's experiments are model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment `name` in the store at `uri`, created on first use (see artifact_location)
    and tagged as model training for the MLflow UI (an existing experiment without a kind gets the tag)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:
        # Two processes racing to create it: the loser reads the winner's.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}: the resolved config as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def git_commit() -> str | None:
    """The commit of the vitpipe checkout that runs, for reproducing a run; None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Tracker:
    """The job's MLflow run (rank 0), or a silent stand-in (other ranks, tracking off or unreachable)."""

    def __init__(self, run_id: str | None = None, uri: str | None = None) -> None:
        self.run_id = run_id
        self.uri = uri
        self._client = None
        if run_id:
            from mlflow import MlflowClient

            self._client = MlflowClient(uri)

    @property
    def active(self) -> bool:
        return self._client is not None

    @classmethod
    def open(cls, section: TrackingSection, *, is_main: bool, params: Mapping[str, Any],
             tags: Mapping[str, str], resume_run_id: str | None = None, warn=print) -> Tracker:
        """Start the job's run (or reopen `resume_run_id` after a relaunch); a no-op off rank 0."""
        if not is_main or not section.enabled:
            return cls()
        uri = resolve_uri(section)
        problem = check_reachable(uri)
        if problem:
            msg = (f"MLflow tracking server {uri} is unreachable ({problem}); ")
            if section.fail_fast:
                raise UserError(msg + "start it or fix tracking.uri, or unset tracking.fail_fast to train "
                                      "without tracking")
            warn(msg + "training continues WITHOUT tracking (set tracking.fail_fast to stop instead)")
            return cls()
        # Short HTTP timeouts and no retry storms, so a server that dies mid-run costs seconds, not minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        import mlflow
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        run_id, fresh = None, True
        # The checkpoint's run (a relaunch of this job) wins; else a run an orchestrator created for us.
        reuse = resume_run_id or os.environ.get("MLFLOW_RUN_ID")
        if reuse:
            try:
                fresh = not client.get_run(reuse).data.params
                client.update_run(reuse, status="RUNNING")
                run_id = reuse
            except Exception as e:  # the run was deleted or the store changed: start a new one
                warn(f"MLflow run {reuse} is gone ({e}); starting a new run")
        if run_id is None:
            exp_id = experiment_id(uri, section.experiment)
            run_id = client.create_run(exp_id, run_name=section.run_name).info.run_id
        tracker = cls(run_id, uri)
        if fresh:  # params are write-once in MLflow: a reopened run keeps those of its first launch
            tracker.log_params(params)
            tracker.set_tags(tags)
        if section.system_metrics:
            tracker._start_system_metrics(mlflow)
        return tracker

    def _start_system_metrics(self, mlflow) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            mlflow.set_tracking_uri(self.uri)  # the monitor logs through the fluent API's URI
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, samples_before_logging=1)
            self._monitor.start()
        except Exception as e:  # psutil missing, or a platform without the counters
            print(f"MLflow system metrics not logged: {e}", file=sys.stderr)

    # -- logging (each a no-op when inactive; failures warn once and turn tracking off) --------

    def _guard(self, what: str, method: str, *args, **kw) -> None:
        if not self.active:
            return
        try:
            getattr(self._client, method)(self.run_id, *args, **kw)
        except Exception as e:
            print(f"MLflow {what} failed ({e}); tracking is off for the rest of this run", file=sys.stderr)
            self._client = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
            self._guard("log params", "log_batch", params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self._guard("log metrics", "log_batch", metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._guard("set tag", "set_tag", k, str(v))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log artifacts", "log_artifacts", str(local_dir), artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log artifact", "log_artifact", str(local_path), artifact_path)

    def end(self, status: str) -> None:
        """Close the run as FINISHED, FAILED or KILLED (idempotent)."""
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            try:
                monitor.finish()
            except Exception:
                pass
            self._monitor = None
        if self.active:
            self._guard("end run", "set_terminated", status)
        self._client = None


class _Signalled(SystemExit):
    """SIGTERM/SIGHUP turned into an exit so `finally` blocks run and the run ends FAILED."""


@contextmanager
def tracked(tracker: Tracker) -> Iterator[Tracker]:
    """Run a job's body; its MLflow run ends FINISHED on success, FAILED on an exception or a signal.

    SIGTERM (what Slurm, Kubernetes and torchrun send before killing) and SIGHUP are turned into an
    exception while the body runs, so the run is closed before the process goes; SIGKILL cannot be
    caught, and a relaunch reopens that run instead.
    """
    def _raise(signum, frame):
        what = "closing the MLflow run as FAILED" if tracker.active else "stopping"
        print(f"received {signal.Signals(signum).name}; {what}", file=sys.stderr)
        raise _Signalled(128 + signum)  # the shell's convention for "killed by signal N"

    previous = {}
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    else:
        tracker.end("FINISHED")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
