"""Flows against Prefect's test harness (a temporary local server) and a real SQLite MLflow store.

Real parts throughout: the shard stage writes real tars, MLflow runs are read back through
`MlflowClient`, Prefect artifacts and task runs through the Prefect client, and the launcher is a
real subprocess. The training flows end to end are covered by tests/test_demo.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from prefect import flow, task
from prefect.testing.utilities import prefect_test_harness

from flows import tracking
from flows.stages import (CACHE_KEY_FILE, RETRIES, LauncherError, is_transient, launch_task, launcher_argv,
                          shard_cache_key, shard_flow, source_listing_digest, stream_process)
from vitpipe.errors import UserError


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def small_digits(tmp_path) -> Path:
    from pipeline.packaged_data import write_digits

    return write_digits(tmp_path / "digits", size=16, limit=120)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


# ---------------------------------------------------------------------------------------------
# Which failures are retried


@pytest.mark.parametrize("exc, expected", [
    (UserError("bad --optim.lr"), False),
    (FileNotFoundError(2, "no such file"), False),
    (PermissionError(13, "denied"), False),
    (ValueError("a bug"), False),
    (ConnectionRefusedError(111, "refused"), True),
    (TimeoutError("read timed out"), True),
    (OSError(5, "Input/output error"), True),
    (LauncherError("pretrain", 2, ["vitpipe pretrain: error: --optim.lr -1: must be > 0"]), False),
    (LauncherError("pretrain", 137, ["step 10"]), True),
    (LauncherError("pretrain", -9, ["step 10"]), True),
    (LauncherError("pretrain", 1, ["requests.exceptions.ConnectionError: Connection refused"]), True),
    (LauncherError("pretrain", 1, ["RuntimeError: shape mismatch"]), False),
])
def test_is_transient(exc, expected):
    assert is_transient(exc) is expected


def test_launcher_error_names_the_failing_line():
    err = LauncherError("finetune", 1, ["step 1", "Traceback (most recent call last):",
                                        "ValueError: init 'x' is not a ViT", "done"])
    assert "status 1" in str(err) and "ValueError: init 'x' is not a ViT" in str(err).splitlines()[0]


def test_retries_only_transient_failures():
    calls = {"flaky": 0, "bad": 0}

    @task(**{**RETRIES, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionResetError(104, "tracking server went away")
        return "ok"

    @task(**{**RETRIES, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def bad_config():
        calls["bad"] += 1
        raise UserError("--train.steps 0: must be >= 1")

    @flow
    def both():
        return flaky(), bad_config(return_state=True)

    value, bad_state = both()
    assert value == "ok" and calls["flaky"] == 2
    assert bad_state.is_failed() and calls["bad"] == 1


# ---------------------------------------------------------------------------------------------
# The launcher subprocess


def test_stream_process_forwards_lines_and_throttles_progress_bars():
    # what tqdm writes: each redraw starts with a carriage return, the final state ends the line
    script = ("import sys;print('a');sys.stdout.write('\\r10%\\r50%\\r100%\\n');print('b', flush=True);"
              "sys.exit(3)")
    lines: list[str] = []
    rc, tail = stream_process([sys.executable, "-c", script], env=dict(os.environ), log=lines.append,
                              progress_every=0)
    assert rc == 3
    assert lines == ["a", "10%", "50%", "100%", "b"] and tail == lines
    lines.clear()
    stream_process([sys.executable, "-c", script], env=dict(os.environ), log=lines.append, progress_every=600)
    assert lines == ["a", "10%", "100%", "b"]  # 50% came too soon after 10%; the final state always shows


def test_stream_process_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        print("started", flush=True)
        time.sleep(120)
    """)

    def log(line):
        raise KeyboardInterrupt  # what a cancelled flow run looks like to this loop

    with pytest.raises(KeyboardInterrupt):
        stream_process([sys.executable, "-c", script], env=dict(os.environ), log=log)
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, 9)
        pytest.fail("the launcher's child survived the flow run being stopped")


def test_slurm_launcher_is_the_cluster_submission_of_the_same_stage_command(tmp_path):
    # The real `vitpipe launch` in --dry-run: it prints the sbatch command it would submit.
    # (tests/test_slurm.py runs pretrain_flow(launcher="slurm") on a real Slurm cluster.)
    argv = launcher_argv("pretrain", tmp_path / "cfg.yaml", 2, "slurm", {"nodes": 2, "slurm.partition": "cpu"})
    argv.insert(argv.index("launch") + 1, "--dry-run")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert "sbatch " in out and "--nodes=2" in out and "--partition=cpu" in out
    assert "VITPIPE_PROCS_PER_NODE=2" in out and out.rstrip().endswith(f"pretrain --config {tmp_path / 'cfg.yaml'}")
    # Locally too the flow runs `vitpipe launch`, which stops every rank when it is stopped.
    local = launcher_argv("pretrain", tmp_path / "cfg.yaml", 2)
    assert local[1:] == ["-m", "vitpipe.cli", "launch", "--backend", "local", "--nproc-per-node", "2", "--",
                         "pretrain", "--config", str(tmp_path / "cfg.yaml")]
    local.insert(local.index("launch") + 1, "--dry-run")
    out = subprocess.run(local, capture_output=True, text=True, check=True).stdout
    assert "torch.distributed.run" in out and "--nproc-per-node 2" in out


def test_launch_task_fails_the_flow_with_the_launcher_error_and_no_retry(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {shards: /nonexistent}\noptim: {lr: -1}\n")

    @flow
    def launch():
        return launch_task("pretrain", str(bad), 1, "local", {})

    start = time.monotonic()
    state = launch(return_state=True)
    assert state.is_failed()
    with pytest.raises(LauncherError) as info:
        state.result()
    assert info.value.returncode == 2 and "optim.lr" in str(info.value)
    # exit 2 is bad input: not retried (a retry would have waited for the backoff)
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------------------------------------
# shard_flow: caching, artifacts, MLflow


def test_cache_key_follows_source_listing_and_output_options(small_digits, tmp_path):
    from pipeline.shard import ShardConfig

    cfg = ShardConfig(src=str(small_digits), out=str(tmp_path / "o"), max_samples_per_shard=50)
    key = shard_cache_key(cfg)
    assert key == shard_cache_key(cfg.model_copy(update={"workers": 2}))  # speed only
    assert key != shard_cache_key(cfg.model_copy(update={"max_samples_per_shard": 40}))
    before = source_listing_digest(str(small_digits))
    (small_digits / "3" / "extra.png").write_bytes((small_digits / "3").glob("*.png").__next__().read_bytes())
    assert source_listing_digest(str(small_digits)) != before
    with pytest.raises(UserError, match="does not exist"):
        source_listing_digest(str(tmp_path / "missing"))


def test_shard_flow_skips_complete_sharding_and_publishes_stats(small_digits, tmp_path, mlflow_uri):
    out = tmp_path / "shards" / "digits"
    parent = tracking.start_run(mlflow_uri, "flows-test", "parent")
    kwargs = dict(src=str(small_digits), out=str(out), overrides={"max_samples_per_shard": 40},
                  tracking_uri=mlflow_uri, experiment="flows-test", parent_run_id=parent)

    state = shard_flow(**kwargs, return_state=True)
    first = state.result()
    assert first["skipped"] is False and first["totals"]["num_samples"] == 120
    assert json.loads((out / CACHE_KEY_FILE).read_text())["key"]
    tars = sorted(out.glob("*.tar"))
    mtimes = [p.stat().st_mtime_ns for p in tars]

    # Prefect artifacts: the shard table (one row per tar) and the markdown summary
    arts = _artifacts(state.state_details.flow_run_id)
    assert {"shards-digits", "dataset-digits"} <= set(arts)
    table = arts["shards-digits"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert sorted(r["shard"] for r in table) == [p.name for p in tars]
    assert sum(r["samples"] for r in table) == 120

    # MLflow: a child run of `parent`, with the shard stats and the dataset as an input
    from mlflow import MlflowClient

    run = MlflowClient(mlflow_uri).get_run(first["mlflow_run_id"])
    assert run.data.tags[tracking.PARENT_TAG] == parent
    assert run.data.tags[tracking.FLOW_RUN_TAG] == str(state.state_details.flow_run_id)
    assert run.data.metrics["num_samples"] == 120 and run.info.status == "FINISHED"
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "digits" and ds.dataset.digest == first["digest"][:32]
    assert first["digest"] == tracking.index_digest(out / "index.json")

    # same source + config: skipped, nothing rewritten
    second = shard_flow(**kwargs)
    assert second["skipped"] is True and second["digest"] == first["digest"]
    assert [p.stat().st_mtime_ns for p in tars] == mtimes

    # a new source file invalidates the cache
    (small_digits / "7" / "new.png").write_bytes(next((small_digits / "7").glob("*.png")).read_bytes())
    third = shard_flow(**kwargs)
    assert third["skipped"] is False and third["totals"]["num_samples"] == 121


def test_shard_flow_bad_source_fails_without_retry(tmp_path):
    state = shard_flow(src=str(tmp_path / "nope"), out=str(tmp_path / "o"),
                       tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", return_state=True)
    assert state.is_failed()
    with pytest.raises(UserError, match="nope"):
        state.result()


def test_stage_run_marks_failed_runs(mlflow_uri):
    from mlflow import MlflowClient

    with pytest.raises(RuntimeError):
        with tracking.stage_run(mlflow_uri, "flows-test", "boom", stage="x") as run_id:
            raise RuntimeError("stage crashed")
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FAILED"


# ---------------------------------------------------------------------------------------------
# Stopping a launcher stops every rank (torchrun gives each rank a session of its own)


def test_stream_process_stops_children_in_other_sessions(tmp_path):
    """What a rank under torchrun is: a grandchild in a session of its own, which a signal to the
    launcher's process group never reaches."""
    pid_file = tmp_path / "rank.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(p.pid))
        print("started", flush=True)
        time.sleep(120)
    """)

    def log(line):
        raise KeyboardInterrupt  # what a cancelled flow run looks like to this loop

    with pytest.raises(KeyboardInterrupt):
        stream_process([sys.executable, "-c", script], env=dict(os.environ), log=log, stop_grace=5)
    _assert_gone(int(pid_file.read_text()), "the rank in its own session survived the flow run being stopped")


def _assert_gone(pid: int, message: str, timeout: float = 30) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail(message)


SLEEPER = '''
import os, signal, sys, time
from cluster.process_tree import die_with_parent_if_asked

die_with_parent_if_asked()  # what vitpipe.cli does first in every rank
out = os.environ["SLEEPER_DIR"]

def on_term(signum, frame):
    open(f"{out}/term-{os.environ['RANK']}", "w").write("checkpoint saved")  # a rank's SIGTERM handler
    sys.exit(128 + signum)

signal.signal(signal.SIGTERM, on_term)
open(f"{out}/pid-{os.environ['RANK']}", "w").write(str(os.getpid()))
time.sleep(300)
'''


def _launch_sleepers(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """`vitpipe launch --nproc-per-node 2` of a module whose ranks sleep; returns it and the ranks' pids."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    env = {**os.environ, "SLEEPER_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "vitpipe.cli", "launch", "--nproc-per-node", "2", "--stop-grace",
                             "20", "--module", "sleeper"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(pids := sorted(tmp_path.glob("pid-*"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.2)
    time.sleep(0.5)  # both ranks have set their SIGTERM handler
    return proc, [int(p.read_text()) for p in pids]


@pytest.mark.multiprocess
def test_sigterm_to_launch_stops_every_rank_and_exits_143(tmp_path):
    proc, ranks = _launch_sleepers(tmp_path)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, out  # 128 + SIGTERM: the flows' retry policy relaunches on it
    assert "received SIGTERM; stopping" in out and "resumes from the latest checkpoint" in out
    for rank, pid in enumerate(ranks):
        _assert_gone(pid, f"rank {rank} survived SIGTERM to its launcher")
        assert (tmp_path / f"term-{rank}").read_text() == "checkpoint saved"  # it got the signal, not SIGKILL


@pytest.mark.multiprocess
def test_killing_the_launcher_outright_leaves_no_rank(tmp_path):
    """SIGKILL cannot be caught: the ranks go because they die with their parent (PR_SET_PDEATHSIG)."""
    import psutil

    proc, ranks = _launch_sleepers(tmp_path)
    (torchrun,) = [p for p in psutil.Process(proc.pid).children() if "torch.distributed.run" in " ".join(p.cmdline())]
    torchrun.kill()  # the ranks' own parent goes first, so nothing is left to stop them in order
    proc.kill()
    proc.wait()
    for rank, pid in enumerate(ranks):
        _assert_gone(pid, f"rank {rank} outlived its killed launcher (an orphan training on)")


# ---------------------------------------------------------------------------------------------
# Durable places and tracking outages


def test_a_deployed_run_refuses_paths_that_vanish(tmp_path, monkeypatch):
    import tempfile

    from flows import storage

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert storage.why_not_durable("runs/x").startswith("is relative")
    assert "temporary directory" in storage.why_not_durable(scratch / "tmpab12prefect" / "mlflow.db")
    assert storage.why_not_durable(tmp_path / "store") is None and storage.why_not_durable("s3://b/x") is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("VITPIPE_HOME", str(tmp_path / "home"))
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    # outside a deployment a relative path is the user's choice, made absolute
    storage.require_durable(uri="sqlite:///mlflow.db", paths={"out": "runs"})
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "00000000-0000-0000-0000-000000000000")  # as a worker sets it
    with pytest.raises(UserError, match="tracking URI 'sqlite:///mlflow.db'.*relative.*MLFLOW_TRACKING_URI"):
        storage.require_durable(uri="sqlite:///mlflow.db")
    with pytest.raises(UserError, match=r"shard output '.*scratch.*' is inside the temporary directory.*--output-root"):
        storage.require_durable(paths={"shard output": scratch / "tmp1prefect" / "shards"})
    storage.require_durable(uri=f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}", paths={"out": tmp_path / "runs"})


@pytest.mark.timeout(180)
def test_a_tracking_server_that_hangs_costs_seconds_not_minutes(small_digits, tmp_path):
    """A server that accepts connections and never answers (what a wedged tracking server does):
    the flow warns, shards anyway, and says the record was not logged."""
    import socket

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # the kernel completes the handshakes; nobody ever reads or answers
    uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
    start = time.monotonic()
    try:
        result = shard_flow(src=str(small_digits), out=str(tmp_path / "shards"), tracking_uri=uri,
                            experiment="down", emit_ready=False)
    finally:
        hung.close()
    assert time.monotonic() - start < 90
    assert result["totals"]["num_samples"] == 120 and (tmp_path / "shards" / "index.json").is_file()
    assert result["mlflow_run_id"] is None  # not logged, and the flow says so instead of failing


# ---------------------------------------------------------------------------------------------
# New datasets announce themselves: `vitpipe shard` from a shell, a watched folder or bucket


def _events(name: str = "vitpipe.dataset.ready", wait_for: int = 0, timeout: float = 30) -> list[dict]:
    """The events of `name` the server has stored (waiting until there are `wait_for` of them)."""
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    body = json.dumps({"filter": {"event": {"name": [name]}}, "limit": 50}).encode()
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(f"{PREFECT_API_URL.value()}/events/filter", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            events = json.loads(r.read())["events"]
        if len(events) >= wait_for or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def _announced(*paths: str, timeout: float = 30) -> bool:
    """Whether the server received vitpipe.dataset.ready for each of `paths` (waiting for them)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {e["resource"]["vitpipe.dataset.path"] for e in _events()}
        if set(paths) <= seen or time.monotonic() > deadline:
            return set(paths) <= seen
        time.sleep(0.5)


def test_vitpipe_shard_announces_the_dataset_when_a_prefect_api_is_configured(small_digits, tmp_path):
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "cli-shards"
    before = len(_events())
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-m", "vitpipe.cli", "shard", str(small_digits), str(out), "--max-samples-per-shard", "50"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "announced dataset 'cli-shards' (vitpipe.dataset.ready" in first.stdout
    events = _events(wait_for=before + 1)
    (event,) = [e for e in events if e["resource"]["vitpipe.dataset.path"] == str(out)]
    assert event["resource"]["prefect.resource.id"] == "vitpipe.dataset.cli-shards"
    assert event["resource"]["vitpipe.dataset.digest"] == tracking.index_digest(out)
    # a re-run of the finished command is quiet: the same shard set is not announced twice
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and "announced" not in again.stdout
    # without an API the command says nothing about Prefect; a server that is down is said, not fatal
    env.pop("PREFECT_API_URL")
    quiet = subprocess.run(cmd, env={**env, "PREFECT_HOME": str(tmp_path / "no-profile")}, capture_output=True,
                           text=True, timeout=180)
    assert quiet.returncode == 0 and "Prefect" not in quiet.stdout
    down = subprocess.run([*cmd[:-3], str(tmp_path / "other"), "--overwrite"], capture_output=True, text=True,
                          env={**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}, timeout=180)
    assert down.returncode == 0 and "could not announce 'other'" in down.stdout and "re-run" in down.stdout


def test_watch_announces_new_and_changed_shard_sets_in_a_folder_and_a_bucket(small_digits, tmp_path, monkeypatch):
    """A watched local folder and an S3 prefix (moto's S3 server: a real HTTP S3 API)."""
    import fsspec
    from moto.server import ThreadedMotoServer

    from cluster.object_store import upload_shard_set
    from flows.events import watch_once
    from pipeline.shard import ShardConfig, shard

    folder = tmp_path / "landing"
    shard(ShardConfig(src=str(small_digits), out=str(folder / "a"), max_samples_per_shard=60))
    assert [d["name"] for d in watch_once(str(folder))] == ["a"]
    assert watch_once(str(folder)) == []  # nothing new
    shard(ShardConfig(src=str(small_digits), out=str(folder / "a"), max_samples_per_shard=40, overwrite=True))
    shard(ShardConfig(src=str(small_digits), out=str(folder / "b"), max_samples_per_shard=60))
    assert sorted(d["name"] for d in watch_once(str(folder))) == ["a", "b"]  # a changed, b new
    assert _announced(str(folder / "a"), str(folder / "b"))

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("landing-bucket")
        watch_once("s3://landing-bucket/datasets", announce_existing=False)  # an empty prefix: recorded
        upload_shard_set(str(folder / "b"), "s3://landing-bucket/datasets/b")
        (item,) = watch_once("s3://landing-bucket/datasets")
        assert item == {"name": "b", "path": "s3://landing-bucket/datasets/b",
                        "digest": tracking.index_digest(folder / "b")}
        assert watch_once("s3://landing-bucket/datasets") == []
        assert _announced("s3://landing-bucket/datasets/b")
    finally:
        fsspec.config.conf.pop("s3", None)
        server.stop()


# ---------------------------------------------------------------------------------------------
# What a run is keyed on


def test_training_key_follows_the_inputs_not_where_results_go(tmp_path):
    from flows import inputs
    from vit.train.config import FinetuneConfig

    cfg = FinetuneConfig(init="x", data={"shards": str(tmp_path)}, optim={"lr": 1e-3})
    key = inputs.training_key("finetune", cfg, dataset_digest="d1", init_identity="sha256:i1")
    moved = cfg.model_copy(update={"out": "/elsewhere", "data": cfg.data.model_copy(update={"shards": "/moved"})})
    assert inputs.training_key("finetune", moved, dataset_digest="d1", init_identity="sha256:i1") == key
    tracked = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"experiment": "other"})})
    assert inputs.training_key("finetune", tracked, dataset_digest="d1", init_identity="sha256:i1") == key
    assert inputs.training_key("finetune", cfg, dataset_digest="d2", init_identity="sha256:i1") != key
    assert inputs.training_key("finetune", cfg, dataset_digest="d1", init_identity="sha256:i2") != key
    lr = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 2e-3})})
    assert inputs.training_key("finetune", lr, dataset_digest="d1", init_identity="sha256:i1") != key


def test_init_aliases_resolve_to_a_version_or_fall_back(tmp_path, mlflow_uri):
    """A fresh store has no champion: the fallback is used and said; without one, one clear error."""
    import mlflow

    from flows.stages import choose_init
    from vit.models.vit import create_model
    from vit.models.weights import save_pretrained
    from vit.tracking import registry

    export = save_pretrained(create_model("micro/4", image_size=16, in_chans=1, num_classes=3), tmp_path / "export")
    loaded, identity, note = choose_init("models:/vitpipe-vit-{dataset}@champion", str(export), mlflow_uri,
                                         dataset="digits v2")
    assert loaded == str(export) and identity.startswith("sha256:")
    assert "models:/vitpipe-vit-digits-v2@champion does not exist yet; starting from the fallback" in note
    with pytest.raises(UserError, match="does not exist yet.*--finetune-init PATH.*--finetune-fallback-init"):
        choose_init("models:/vitpipe-vit@champion", None, mlflow_uri, dataset="digits")
    with tracking.using(mlflow_uri):
        registry.register_model(create_model("micro/4", image_size=16, in_chans=1, num_classes=3), "vitpipe-vit",
                                alias="champion")
    loaded, identity, _ = choose_init(None, str(export), mlflow_uri, dataset="digits")
    assert loaded == identity == "models:/vitpipe-vit/1"  # pinned: the alias may move during training
    assert mlflow.get_tracking_uri() != mlflow_uri  # the process-wide URI was given back


def test_the_flow_writes_only_what_was_set(tmp_path):
    """What made "takes 1-channel images but data.channels=3" in flow runs only."""
    from flows.stages import resolve_config, save_set_options
    from vit.train.config import FinetuneConfig

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {batch_size: 8}\ntrain: {steps: 3}\n")
    cfg = resolve_config(FinetuneConfig, str(recipe), {"optim.lr": 1e-3},
                         {"data.shards": str(tmp_path), "init": "models:/m/1", "tracking.uri": "sqlite:////x.db"})
    written = yaml.safe_load(save_set_options(cfg, tmp_path / "flow.yaml").read_text())
    assert written["data"] == {"batch_size": 8, "shards": str(tmp_path)}  # channels, mean, std, size: unset
    assert written["optim"] == {"lr": 1e-3} and written["init"] == "models:/m/1"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_stage_trained_during_an_outage_is_logged_when_the_flow_runs_again(digits_shards, tmp_path, mlflow_uri):
    """Tracking down: the flow trains anyway and says the record is not logged; run again with the
    store back, the stage is skipped (same inputs) and its record logged from its output folder.
    (The store "comes back" under another URI here; the flow does not key runs on the URI.)"""
    from mlflow import MlflowClient

    from flows.stages import pretrain_flow

    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "micro/4"},
        "data": {"shards": str(digits_shards), "image_size": 16, "channels": 1, "batch_size": 32, "num_workers": 0},
        "train": {"steps": 2, "eval_every": 0, "log_every": 1}, "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 0}, "tracking": {"system_metrics": False}, "out": str(tmp_path / "pre")}))
    down = "http://127.0.0.1:9"  # nothing listens there
    first = pretrain_flow(config=str(cfg), tracking_uri=down, experiment="outage")
    assert first["mlflow_run_id"] is None and first["skipped"] is False
    assert Path(first["export"], "model.safetensors").is_file() and first["metrics"]["train/loss"] > 0
    assert Path(first["out"]).parent == tmp_path / "pre"  # OUT/<key>

    second = pretrain_flow(config=str(cfg), tracking_uri=mlflow_uri, experiment="outage")
    assert second["skipped"] is True and second["out"] == first["out"] and second["mlflow_run_id"]
    client = MlflowClient(mlflow_uri)
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.tags["vitpipe.logged_late"] == "true" and run.info.status == "FINISHED"
    assert run.data.metrics["train/loss"] == first["metrics"]["train/loss"]
    assert run.data.params["model.preset"] == "micro/4"
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == tracking.index_digest(digits_shards)[:32]

    third = pretrain_flow(config=str(cfg), tracking_uri=mlflow_uri, experiment="outage")
    assert third["skipped"] is True and third["mlflow_run_id"] == second["mlflow_run_id"]  # logged once
    assert len(client.search_runs([run.info.experiment_id])) == 1
