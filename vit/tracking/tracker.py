"""MLflow tracking of a training job: one run, written by rank 0 only, never blocking training.

`Tracker.open(...)` on rank 0 starts (or, on resume, reopens) the job's run; on other ranks it
returns a tracker that does nothing, so the training loop calls it without asking who it is.

Every record goes through one background thread, in order, so training never waits on the
server. When the server stops answering mid-run (restarted, a network blip) the records are held
and sent once it answers again; at the end the run waits up to `tracking.flush_timeout_s` for
it, then says exactly what was not logged (`Tracker.unlogged`) instead of pretending. A server
that does not answer when the job starts is reported once and tracking is off for the job (or,
with `tracking.fail_fast`, the job stops before training starts, before any rank is launched).

A reopened run (a relaunch resuming from a checkpoint) logs no step twice: steps a resume replays
were logged by the launch that first ran them, so points at or below a metric's last logged step
are skipped. The job's run id is kept in `RunRecord` beside its checkpoints, so a launch killed
before its first checkpoint is continued by the next one, and the launcher closes a run whose
rank 0 was killed without a chance to (`close_abandoned_run`).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
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
# Records held while the server is down, at most (then the oldest metric points are dropped, and counted).
MAX_HELD = 200_000
# MLflow's limit of metrics per log_batch call.
_BATCH = 1000
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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


def check_tracking(section: TrackingSection) -> str | None:
    """Why the job's tracking server cannot be used now (None: it can, or tracking is off); with
    `tracking.fail_fast` that is an error (called by the launching process too, before any rank starts)."""
    if not section.enabled:
        return None
    uri = resolve_uri(section)
    problem = check_reachable(uri)
    if problem and section.fail_fast:
        raise UserError(f"MLflow tracking server {uri} is unreachable ({problem}); start it or fix tracking.uri, "
                        f"or unset tracking.fail_fast to train without tracking")
    return problem


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


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Stopped(SystemExit):
    """The job was asked to stop (SIGTERM, SIGINT, SIGHUP): its run ends KILLED; exit status 128 + signal."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message


class Tracker:
    """The job's MLflow run (rank 0), or a silent stand-in (other ranks, tracking off or unreachable)."""

    def __init__(self, run_id: str | None = None, uri: str | None = None, *, floors: Mapping[str, int] | None = None,
                 flush_timeout_s: float = 60.0, warn=None) -> None:
        self.run_id = run_id
        self.uri = uri
        self.flush_timeout_s = flush_timeout_s
        self._floors = dict(floors or {})  # metric -> last step already in the run (a reopened run)
        self._warn = warn or _say
        self._writer = None
        self._ended = False
        self._lock = threading.Lock()
        self.unlogged: dict[str, Any] | None = None  # what the server never got, after flush()/end()
        if run_id:
            from mlflow import MlflowClient

            self._writer = _Writer(MlflowClient(uri), run_id, uri, self._warn)

    @property
    def active(self) -> bool:
        return self._writer is not None and not self._ended

    @classmethod
    def open(cls, section: TrackingSection, *, is_main: bool, params: Mapping[str, Any],
             tags: Mapping[str, str], resume_run_id: str | None = None, record: Path | None = None,
             warn=None) -> Tracker:
        """Start the job's run (or reopen `resume_run_id` after a relaunch); a no-op off rank 0.
        `record`: where the job keeps its run id (RunRecord), written here."""
        if not is_main or not section.enabled:
            return cls()
        warn = warn or _say
        uri = resolve_uri(section)
        problem = check_tracking(section)
        if problem:
            warn(f"MLflow tracking server {uri} is unreachable ({problem}); training continues WITHOUT tracking "
                 f"(set tracking.fail_fast to stop instead)")
            return cls()
        # Short HTTP timeouts and few retries: the writer thread retries itself, without blocking anyone.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        import mlflow
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        run_id, fresh, floors = None, True, {}
        # The checkpoint's run (a relaunch of this job) wins; else a run an orchestrator created for us.
        reuse = resume_run_id or os.environ.get("MLFLOW_RUN_ID")
        if reuse:
            try:
                run = client.get_run(reuse)
                fresh = not run.data.params
                floors = {key: max((m.step for m in client.get_metric_history(reuse, key)), default=-1)
                          for key in run.data.metrics}
                client.update_run(reuse, status="RUNNING")
                run_id = reuse
            except Exception as e:  # the run was deleted or the store changed: start a new one
                warn(f"MLflow run {reuse} is gone ({e}); starting a new run")
        if run_id is None:
            exp_id = experiment_id(uri, section.experiment)
            run_id = client.create_run(exp_id, run_name=section.run_name).info.run_id
        if record is not None:
            RunRecord(record).write(run_id, uri)
        tracker = cls(run_id, uri, floors=floors, flush_timeout_s=section.flush_timeout_s, warn=warn)
        if fresh:  # params are write-once in MLflow: a reopened run keeps those of its first launch
            tracker.log_params(params)
            tracker.set_tags(tags)
        if section.system_metrics:
            tracker._start_system_metrics(mlflow, resume=not fresh)
        return tracker

    def _start_system_metrics(self, mlflow, *, resume: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a reopened run's system metrics continue its steps instead of repeating them
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, samples_before_logging=1,
                                                 resume_logging=resume, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:  # psutil missing, or a platform without the counters
            print(f"MLflow system metrics not logged: {e}", file=sys.stderr)

    # -- logging (each a no-op when inactive; queued, never waits for the server) -------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
            self._writer.put("params", items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and step > self._floors.get(k, -1)]  # replayed after a resume: already there
        if items:
            self._writer.put("metrics", items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        self._writer.put("tags", [RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._writer.put("artifacts", (str(local_dir), artifact_path))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._writer.put("artifact", (str(local_path), artifact_path))

    def flush(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """Wait (up to `timeout_s`, default tracking.flush_timeout_s) until the server has every record
        logged so far; returns what it still lacks (also in `unlogged`), None when it has everything."""
        if self._writer is None:
            return self.unlogged
        timeout = self.flush_timeout_s if timeout_s is None else timeout_s
        self.unlogged = self._writer.wait_empty(timeout)
        return self.unlogged

    def end(self, status: str, *, timeout_s: float | None = None) -> None:
        """Close the run as FINISHED, FAILED or KILLED (idempotent, thread-safe). Waits for the
        server up to `timeout_s` (default tracking.flush_timeout_s; less when a flush already gave up),
        then says what it never got."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            try:
                monitor.finish()
            except Exception:
                pass
            self._monitor = None
        if self._writer is None:
            return
        if timeout_s is None:  # a flush that gave up already waited: do not wait that long twice
            timeout_s = min(self.flush_timeout_s, 5.0) if self.unlogged else self.flush_timeout_s
        self._writer.put("end", status)
        self.unlogged = self._writer.close(timeout_s)
        if self.unlogged:
            self._warn(f"MLflow: {describe_unlogged(self.unlogged, self.uri)}")


class _Writer:
    """Sends a run's records to MLflow in order from one thread; holds them while the server is down."""

    def __init__(self, client, run_id: str, uri: str, warn):
        self.client, self.run_id, self.uri, self.warn = client, run_id, uri, warn
        self.ops: collections.deque = collections.deque()
        self.cv = threading.Condition()
        self.closing = False
        self.busy = False
        self.down_since: float | None = None
        self.down_reason = ""
        self.dropped: list[tuple[str, Any]] = []  # refused by the store, or beyond MAX_HELD
        self.thread = threading.Thread(target=self._run, name="vitpipe-mlflow", daemon=True)
        self.thread.start()

    def put(self, kind: str, payload) -> None:
        with self.cv:
            self.ops.append((kind, payload))
            if len(self.ops) > MAX_HELD:  # the server has been down for very long: keep the newest
                for i, (k, _) in enumerate(self.ops):
                    if k == "metrics":
                        self.dropped.append(self.ops[i])
                        del self.ops[i]
                        break
            self.cv.notify_all()

    def _take(self) -> tuple[int, str, Any]:
        """The next request: (ops it covers, kind, payload); consecutive metric ops in one batch."""
        kind, payload = self.ops[0]
        if kind != "metrics":
            return 1, kind, payload
        items, n = [], 0
        for k, p in self.ops:
            if k != "metrics" or len(items) + len(p) > _BATCH:
                break
            items += p
            n += 1
        return max(n, 1), kind, items or payload

    def _send(self, kind: str, payload) -> None:
        c, run = self.client, self.run_id
        if kind == "metrics":
            c.log_batch(run, metrics=payload)
        elif kind == "params":
            c.log_batch(run, params=payload)
        elif kind == "tags":
            c.log_batch(run, tags=payload)
        elif kind == "artifacts":
            c.log_artifacts(run, *payload)
        elif kind == "artifact":
            c.log_artifact(run, *payload)
        elif kind == "end":
            c.set_terminated(run, payload)

    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self.cv:
                while not self.ops and not self.closing:
                    self.cv.wait()
                if not self.ops:
                    return
                n, kind, payload = self._take()
                self.busy = True
            try:
                self._send(kind, payload)
            except Exception as e:
                problem = check_reachable(self.uri, timeout_s=3)
                if problem:  # the server is down: keep the records, try again later
                    if self.down_since is None:
                        self.down_since, self.down_reason = time.time(), problem
                        self.warn(f"MLflow tracking server {self.uri} stopped answering ({problem}); holding the "
                                  f"run's records and retrying (training goes on)")
                    with self.cv:
                        self.busy = False
                        self.cv.notify_all()
                        self.cv.wait(timeout=backoff)
                    backoff = min(backoff * 2, 15.0)
                    continue
                self.warn(f"MLflow refused to log {_what(kind, payload)} ({str(e).strip()[:300]}); skipped")
                with self.cv:
                    self.dropped.append((kind, payload))
            else:
                if self.down_since is not None:
                    self.warn(f"MLflow tracking server {self.uri} answers again; sending the records it missed")
                    self.down_since = None
                backoff = 1.0
            with self.cv:
                for _ in range(n):
                    self.ops.popleft()
                self.busy = False
                self.cv.notify_all()

    def wait_empty(self, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self.cv:
            while (self.ops or self.busy) and time.monotonic() < deadline:
                self.cv.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return self._report()

    def close(self, timeout_s: float) -> dict[str, Any] | None:
        report = self.wait_empty(timeout_s)
        with self.cv:
            self.closing = True
            if report:  # give up: the thread must not go on sending after we said what is missing
                self.ops.clear()
            self.cv.notify_all()
        return report

    def _report(self) -> dict[str, Any] | None:
        """What the server does not have: metric points per key (count, first and last step), artifacts,
        params, tags, and whether the run's final status is among them."""
        pending = list(self.ops) + self.dropped
        if not pending:
            return None
        metrics: dict[str, list[int]] = {}
        out: dict[str, Any] = {"metric_points": 0, "metrics": {}, "artifacts": [], "params": 0, "tags": 0,
                               "status": None}
        for kind, payload in pending:
            if kind == "metrics":
                for m in payload:
                    metrics.setdefault(m.key, []).append(m.step)
                    out["metric_points"] += 1
            elif kind in ("artifacts", "artifact"):
                out["artifacts"].append(payload[1] + "/" + Path(payload[0]).name if payload[1] else
                                        Path(payload[0]).name)
            elif kind in ("params", "tags"):
                out[kind] += len(payload)
            elif kind == "end":
                out["status"] = payload
        out["metrics"] = {k: {"points": len(v), "first_step": min(v), "last_step": max(v)}
                          for k, v in sorted(metrics.items())}
        if self.down_since is not None:
            out["server_down_since"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.down_since))
            out["reason"] = self.down_reason
        return out


def _what(kind: str, payload) -> str:
    if kind in ("metrics", "params", "tags"):
        return f"{len(payload)} {kind}"
    if kind in ("artifacts", "artifact"):
        return f"artifact {payload[0]}"
    return f"the run's status {payload}"


def describe_unlogged(u: Mapping[str, Any], uri: str | None) -> str:
    """One line on what a run's server never got (from Tracker.unlogged)."""
    parts = []
    if u.get("metric_points"):
        keys = ", ".join(f"{k} steps {v['first_step']}-{v['last_step']}" for k, v in list(u["metrics"].items())[:4])
        parts.append(f"{u['metric_points']} metric points ({keys}{', ...' if len(u['metrics']) > 4 else ''})")
    if u.get("artifacts"):
        parts.append(f"artifacts {', '.join(u['artifacts'][:5])}{', ...' if len(u['artifacts']) > 5 else ''}")
    for kind in ("params", "tags"):
        if u.get(kind):
            parts.append(f"{u[kind]} {kind}")
    if u.get("status"):
        parts.append(f"the final status {u['status']} (the run shows RUNNING there)")
    since = f" (unreachable since {u['server_down_since']}: {u.get('reason')})" if u.get("server_down_since") else ""
    return f"NOT logged to {uri}{since}: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# The job's run id on disk, for relaunches and for the launcher


class RunRecord:
    """`mlflow_run.json` beside a job's checkpoints: which MLflow run the job logs to."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, run_id: str, uri: str) -> None:
        from vit.train.checkpoint import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"run_id": run_id, "tracking_uri": uri}) + "\n")

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("run_id") else None


def close_abandoned_run(record: str | Path, status: str) -> str | None:
    """Close the job's run as `status` if it is still RUNNING (its rank 0 was killed before it could);
    for the process that launched the ranks, once they are gone. Returns the run id it closed."""
    rec = RunRecord(record).read()
    if rec is None:
        return None
    uri = rec.get("tracking_uri") or DEFAULT_URI
    if check_reachable(uri):
        return None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        if client.get_run(rec["run_id"]).info.status != "RUNNING":
            return None
        client.set_terminated(rec["run_id"], status)
    except Exception:
        return None
    return rec["run_id"]


# ---------------------------------------------------------------------------------------------
# The job's body


def status_for(error: BaseException | None) -> str:
    """The MLflow status a job's end means: FINISHED, KILLED (asked to stop) or FAILED."""
    if error is None:
        return "FINISHED"
    if isinstance(error, (Stopped, KeyboardInterrupt)):
        return "KILLED"
    return "FAILED"


@contextmanager
def tracked(tracker: Tracker) -> Iterator[Tracker]:
    """Run a job's body; its MLflow run ends FINISHED on success, KILLED when the job was stopped
    (`Stopped`: a signal; Ctrl-C), FAILED on an error.

    The close itself cannot be interrupted: a signal that arrives during it is held and delivered
    after it (torchrun SIGTERMs the ranks that survive a failed one, often while they close the run).
    SIGKILL cannot be caught: the launcher, or the next relaunch, closes that run.
    """
    try:
        yield tracker
    except BaseException as e:
        _close_uninterrupted(tracker, status_for(e))
        raise
    else:
        _close_uninterrupted(tracker, "FINISHED")


def _close_uninterrupted(tracker: Tracker, status: str) -> None:
    held: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        tracker.end(status)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in held[:1]:  # now it may act
            signal.raise_signal(signum)
