"""Flows against Prefect's test harness (a temporary local server) and a real SQLite MLflow store.

Real parts throughout: the shard stage writes real tars, MLflow runs are read back through
`MlflowClient`, Prefect artifacts and task runs through the Prefect client, and the launcher is a
real subprocess. The training flows end to end are covered by tests/test_demo.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
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
