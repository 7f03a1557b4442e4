"""MLflow tracking: one run per job, FINISHED/FAILED/KILLED (signals), reopen on resume without duplicate
points, unreachable servers, a server that dies mid-run and comes back."""

from __future__ import annotations

import os
import signal
import time

import pytest
from mlflow import MlflowClient

from vit.train.config import TrackingSection
from vit.tracking.tracker import Stopped, Tracker, check_reachable, flatten, resolve_uri, tracked
from vit.train.stopping import StopOnSignal
from vitpipe.errors import UserError


def _open(uri, **kw) -> Tracker:
    section = TrackingSection(uri=uri, experiment="t", system_metrics=False, **kw)
    return Tracker.open(section, is_main=True, params={"optim.lr": 0.001, "model.preset": "micro/4"},
                        tags={"vitpipe.world_size": "2"})


def test_flatten_and_uri_precedence(monkeypatch):
    assert flatten({"optim": {"lr": 1, "betas": {}}, "out": "x"}) == {"optim.lr": 1, "optim.betas": {}, "out": "x"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(TrackingSection()) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_uri(TrackingSection()) == "http://mlflow:5000"
    assert resolve_uri(TrackingSection(uri="sqlite:///x.db")) == "sqlite:///x.db"


def test_run_finished_with_params_metrics_tags(mlflow_uri):
    with tracked(_open(mlflow_uri)) as t:
        t.log_metrics({"train/loss": 2.0}, step=1)
        t.log_metrics({"train/loss": 1.5, "val/top1": None}, step=2)
    run = MlflowClient(mlflow_uri).get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.001", "model.preset": "micro/4"}
    assert run.data.tags["vitpipe.world_size"] == "2"
    history = MlflowClient(mlflow_uri).get_metric_history(t.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5)]


def test_experiments_are_tagged_as_model_training_for_the_mlflow_ui(mlflow_uri):
    """MLflow 3's UI opens an experiment in the view its mlflow.experimentKind tag names; vitpipe's
    are model training. One made elsewhere without a kind gets the tag; a chosen kind is kept."""
    from vit.tracking.tracker import experiment_id

    client = MlflowClient(mlflow_uri)
    with tracked(_open(mlflow_uri)):
        pass
    assert client.get_experiment_by_name("t").tags["mlflow.experimentKind"] == "custom_model_development"
    bare = client.create_experiment("made-by-hand")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert experiment_id(mlflow_uri, "made-by-hand") == bare and experiment_id(mlflow_uri, "chosen") == chosen
    assert client.get_experiment(bare).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    """An experiment a stage creates in a SQLite store puts its artifacts in mlartifacts/ next to
    the .db (a relative database path counts from the working directory), not in ./mlruns."""
    from vit.tracking.tracker import artifact_location

    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.chdir(store)
    (tmp_path / "report.txt").write_text("hello")
    with tracked(_open("sqlite:///mlflow.db")) as t:
        t.log_artifact(tmp_path / "report.txt", "reports")
    assert MlflowClient("sqlite:///mlflow.db").get_experiment_by_name("t").artifact_location == \
        (store / "mlartifacts").as_uri()
    assert [p.name for p in (store / "mlartifacts").rglob("report.txt")] == ["report.txt"]
    assert not (store / "mlruns").exists()
    assert artifact_location("http://127.0.0.1:5000") is None
    assert artifact_location(f"sqlite:///{tmp_path / 'a' / 'x.db'}") == (tmp_path / "a" / "mlartifacts").as_uri()


def test_run_failed_on_exception_killed_on_signal(mlflow_uri):
    with pytest.raises(RuntimeError):
        with tracked(_open(mlflow_uri)) as t1:
            raise RuntimeError("boom")
    with pytest.raises(Stopped) as exc:
        with StopOnSignal(timeout_s=25), tracked(_open(mlflow_uri)) as t2:
            os.kill(os.getpid(), signal.SIGTERM)  # outside the training steps: stops at once
            time.sleep(5)  # the handler raises before this ends
    assert exc.value.code == 128 + signal.SIGTERM
    client = MlflowClient(mlflow_uri)
    assert client.get_run(t1.run_id).info.status == "FAILED"
    assert client.get_run(t2.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored after the job


def test_a_signal_during_the_close_does_not_interrupt_it(mlflow_uri):
    """torchrun SIGTERMs the ranks that survive a dead one, often while they are closing the run:
    the close finishes, and the signal acts after it."""
    t = _open(mlflow_uri)
    end = t.end

    def slow_end(status, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the close
        time.sleep(0.5)
        end(status, **kw)

    t.end = slow_end
    with pytest.raises(Stopped):
        with StopOnSignal(timeout_s=25):
            with pytest.raises(RuntimeError):
                with tracked(t):
                    raise RuntimeError("rank 1 died")
    assert MlflowClient(mlflow_uri).get_run(t.run_id).info.status == "FAILED"


def test_resume_reopens_the_same_run(mlflow_uri):
    t = _open(mlflow_uri)
    run_id = t.run_id  # the job is SIGKILLed here: the run stays RUNNING
    section = TrackingSection(uri=mlflow_uri, experiment="t", system_metrics=False)
    again = Tracker.open(section, is_main=True, params={}, tags={}, resume_run_id=run_id)
    with tracked(again):
        again.log_metrics({"train/loss": 1.0}, step=10)
    client = MlflowClient(mlflow_uri)
    assert again.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("t").experiment_id])) == 1


def test_run_offered_by_an_orchestrator_is_used(mlflow_uri, monkeypatch):
    client = MlflowClient(mlflow_uri)
    offered = client.create_run(client.create_experiment("flow")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", offered)
    with tracked(_open(mlflow_uri)) as t:
        pass
    run = client.get_run(offered)
    assert t.run_id == offered and run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.001"


def test_other_ranks_and_disabled_tracking_do_nothing(mlflow_uri):
    for t in (Tracker.open(TrackingSection(uri=mlflow_uri), is_main=False, params={}, tags={}),
              Tracker.open(TrackingSection(uri=mlflow_uri, enabled=False), is_main=True, params={}, tags={})):
        assert not t.active and t.run_id is None
        with tracked(t):
            t.log_metrics({"x": 1.0}, step=1)
            t.log_artifact(__file__)


def test_unreachable_server_warns_fast_or_fails_fast():
    from vit.train.distributed import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert check_reachable(uri) is not None and check_reachable("sqlite:///x.db") is None
    warnings = []
    start = time.monotonic()
    t = Tracker.open(TrackingSection(uri=uri), is_main=True, params={}, tags={}, warn=warnings.append)
    assert time.monotonic() - start < 10
    assert not t.active and "unreachable" in warnings[0] and "continues WITHOUT tracking" in warnings[0]
    with pytest.raises(UserError, match="unreachable"):
        Tracker.open(TrackingSection(uri=uri, fail_fast=True), is_main=True, params={}, tags={})


def test_a_record_the_store_refuses_is_said_and_skipped(mlflow_uri, capsys):
    t = _open(mlflow_uri)
    t.log_artifact("/no/such/file")  # fails inside MLflow: said, skipped, tracking goes on
    t.log_metrics({"x": 1.0}, step=1)
    t.end("FINISHED")
    assert "MLflow refused to log artifact /no/such/file" in capsys.readouterr().err
    client = MlflowClient(mlflow_uri)
    assert [m.value for m in client.get_metric_history(t.run_id, "x")] == [1.0]
    assert client.get_run(t.run_id).info.status == "FINISHED"
    assert t.unlogged["artifacts"] == ["file"]  # and counted among what was not logged


def test_a_relaunch_logs_no_step_twice(mlflow_uri):
    """Killed after logging step 15 while the checkpoint it resumes from is at step 10: the
    replayed steps 11-15 are not logged again."""
    first = _open(mlflow_uri)
    for step in (5, 10, 15):
        first.log_metrics({"train/loss": 1.0 / step, "val/top1": 0.1}, step)
    first.flush()  # then SIGKILL: the run is never closed
    section = TrackingSection(uri=mlflow_uri, experiment="t", system_metrics=False)
    again = Tracker.open(section, is_main=True, params={}, tags={}, resume_run_id=first.run_id)
    with tracked(again):
        for step in (15, 20):  # the replay from step 10 reaches 15 again
            again.log_metrics({"train/loss": 1.0 / step, "val/top1": 0.2}, step)
    client = MlflowClient(mlflow_uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [5, 10, 15, 20]
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "val/top1")] == [
        (5, 0.1), (10, 0.1), (15, 0.1), (20, 0.2)]


class _Server:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store, stopped and started again at will
    (same port, same store), as a tracking server that is restarted mid-run."""

    def __init__(self, root):
        from vit.train.distributed import free_port

        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ctx = None

    def start(self):
        from local_server import local_server, venv_command

        self._ctx = local_server([venv_command("mlflow"), "server", "--backend-store-uri",
                                  f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
                                  str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                                  "--workers", "1"], f"{self.url}/health", self.root / "server.log")
        self._ctx.__enter__()

    def stop(self):
        self._ctx.__exit__(None, None, None)
        self._ctx = None


@pytest.fixture(scope="module")
def _one_server(tmp_path_factory):
    server = _Server(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    if server._ctx is not None:
        server.stop()


@pytest.fixture
def mlflow_server(_one_server):
    """The module's server, running (a test before may have left it stopped); started once per module."""
    if _one_server._ctx is None:
        _one_server.start()
    return _one_server


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_server_that_dies_mid_run_gets_every_record_once_back_or_says_what_it_lacks(mlflow_server, tmp_path,
                                                                                     capsys):
    """Two runs on a real `mlflow server` that is stopped mid-run: logging never waits; once the
    server is back the first run gets everything; the server goes away for good before the second
    closes, which then says exactly what it did not get, within tracking.flush_timeout_s."""
    t = _open(mlflow_server.url)
    section = TrackingSection(uri=mlflow_server.url, experiment="t", system_metrics=False, flush_timeout_s=3)
    t2 = Tracker.open(section, is_main=True, params={"a": 1}, tags={})
    for tracker in (t, t2):
        tracker.log_metrics({"train/loss": 2.0}, 1)
        assert tracker.flush(10) is None
    mlflow_server.stop()
    started = time.monotonic()
    for step in range(2, 52):  # while the server is down: queued, training never waits
        t.log_metrics({"train/loss": 2.0 / step}, step)
    (tmp_path / "report.txt").write_text("hello")
    t.log_artifact(tmp_path / "report.txt")
    assert time.monotonic() - started < 1.0
    time.sleep(3)  # the writers notice and hold the records
    assert "stopped answering" in capsys.readouterr().err

    mlflow_server.start()
    with tracked(t):
        pass
    assert t.unlogged is None
    client = MlflowClient(mlflow_server.url)
    assert [m.step for m in client.get_metric_history(t.run_id, "train/loss")] == list(range(1, 52))
    assert [a.path for a in client.list_artifacts(t.run_id)] == ["report.txt"]
    assert client.get_run(t.run_id).info.status == "FINISHED"

    mlflow_server.stop()  # for good
    for step in range(2, 12):
        t2.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step)
    t2.log_artifacts(tmp_path, "model")
    started = time.monotonic()
    with tracked(t2):
        pass
    assert time.monotonic() - started < 20  # bounded by tracking.flush_timeout_s (and one attempt's timeout)
    u = t2.unlogged
    assert u["metric_points"] == 20 and u["metrics"]["train/loss"] == {"points": 10, "first_step": 2, "last_step": 11}
    assert u["artifacts"] == [f"model/{tmp_path.name}"] and u["status"] == "FINISHED"
    err = capsys.readouterr().err
    assert f"NOT logged to {mlflow_server.url} (unreachable since" in err
    assert "20 metric points (train/loss steps 2-11, train/lr steps 2-11)" in err and "final status FINISHED" in err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_training_goes_on_while_its_server_is_restarted_and_the_run_is_whole(mlflow_server, digits_shards,
                                                                             tmp_path):
    """`vitpipe pretrain` logging to a real server that is stopped after step 10 and started again:
    the steps trained meanwhile are logged (with the time they were trained), nothing twice, the
    run FINISHED with its model, and the summary names it as whole."""
    import json
    import subprocess
    import sys

    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vitpipe.cli", "pretrain", "--data.shards", str(digits_shards),
                             "--data.image-size", "16", "--data.batch-size", "32", "--data.num-workers", "0",
                             "--model.preset", "micro/4", "--train.steps", "150", "--train.eval-every", "0",
                             "--train.log-every", "5", "--checkpoint.every-steps", "0", "--tracking.uri",
                             mlflow_server.url, "--no-tracking.system-metrics", "--tracking.flush-timeout-s", "180",
                             "--out", str(tmp_path / "run")], env=env, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(mlflow_server.url)

    def logged() -> int:
        try:
            runs = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])
            return max(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
        except Exception:
            return 0

    deadline = time.monotonic() + 300
    while logged() < 10:
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before step 10 was logged"
        time.sleep(0.2)
    mlflow_server.stop()
    down = time.time() * 1000
    assert proc.poll() is None, "training ended while the server was stopping: raise --train.steps"
    # Keep the server down while training goes on: 5 s and 3 s of the job's CPU time (about a dozen
    # steps, however loaded the machine is), so some steps are trained and held while it is down.
    job = psutil.Process(proc.pid)
    cpu0, t0 = sum(job.cpu_times()[:2]), time.monotonic()
    while time.monotonic() - t0 < 5 or (sum(job.cpu_times()[:2]) - cpu0 < 3 and time.monotonic() - t0 < 120):
        time.sleep(0.2)
    mlflow_server.start()
    up = time.time() * 1000
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "tracking_unlogged" not in results
    summary = err.strip().splitlines()[-1]
    assert f"MLflow run {results['run_id']}" in summary and "INCOMPLETE" not in summary, summary
    history = client.get_metric_history(results["run_id"], "train/loss")
    assert [m.step for m in history] == list(range(5, 151, 5))
    assert any(down < m.timestamp < up for m in history)  # trained (and held) while the server was down
    run = client.get_run(results["run_id"])
    assert run.info.status == "FINISHED" and "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
