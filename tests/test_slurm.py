"""cluster.slurm and cluster/vitpipe.sbatch on a real one-host Slurm cluster (2 emulated nodes).

The cluster (munged, slurmctld, two slurmd) is started by the `slurm_cluster` fixture from
tests/slurm_cluster.py with a generated slurm.conf; jobs run through the real sbatch, srun and
torchrun, so the multi-node rendezvous of the batch script really happens (over loopback).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import slurm
from cluster.launch import SBATCH_SCRIPT
from slurm_cluster import slurm_cluster  # noqa: F401  (fixture)
from vitpipe.errors import UserError

pytestmark = [pytest.mark.multiprocess]

# The test nodes have no GPUs and 2 CPUs each.
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=2"]
RANK_ENV = {"VITPIPE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.sh"
    path.write_text("#!/bin/bash\n" + body + "\n")
    return path


@pytest.mark.slow
def test_batch_script_rendezvous_over_two_nodes(slurm_cluster, tmp_path):
    """sbatch -> srun (one torchrun per node) -> c10d rendezvous -> 2 ranks all_reduce."""
    log = tmp_path / "allreduce-%j.out"
    job = slurm.submit(SBATCH_SCRIPT, sbatch_args=["--nodes=2", *CPU_NODE, f"--output={log}"],
                       env={**RANK_ENV, "VITPIPE_MODULE": "cluster.allreduce_check"}, cwd=tmp_path)
    lines: list[str] = []
    states: list[str] = []
    final = slurm.wait(job, poll=0.5, on_log=lines.append, on_state=lambda st: states.append(st.state),
                       timeout=180)
    text = "\n".join(lines)
    assert final.ok, f"{final.summary()}\n{text}\n{slurm_cluster.logs()}"
    assert final.state == "COMPLETED" and final.exit_code == 0
    assert final.nodes == "node[1-2]"
    assert "2 node(s) x 1 rank(s)" in text
    assert "rank 0/2" in text and "rank 1/2" in text and "OK, 2 ranks" in text
    assert states[-1] == "COMPLETED" and len(states) >= 2  # saw it before the end too
    assert final.log and Path(final.log).name == f"allreduce-{job}.out"


def test_failed_job_reports_its_exit_code(slurm_cluster, tmp_path):
    script = _script(tmp_path, 'echo "about to fail"\nexit 3')
    job = slurm.submit(script, sbatch_args=["--gpus-per-node=0", f"--output={tmp_path}/fail-%j.out"])
    lines: list[str] = []
    final = slurm.wait(job, poll=0.5, on_log=lines.append, timeout=60)
    assert final.state == "FAILED" and final.exit_code == 3 and not final.ok
    assert lines == ["about to fail"]
    assert "FAILED (exit 3)" in final.summary()


def test_wait_timeout_cancels_the_job(slurm_cluster, tmp_path):
    """Leaving wait early (timeout, Ctrl-C, flow cancellation) must not leave the job running."""
    script = _script(tmp_path, "echo started\nsleep 300")
    job = slurm.submit(script, sbatch_args=["--gpus-per-node=0", f"--output={tmp_path}/sleep-%j.out"])
    with pytest.raises(TimeoutError, match=job):
        slurm.wait(job, poll=0.5, timeout=3)
    deadline = time.monotonic() + 30
    while not (st := slurm.status(job)).done and time.monotonic() < deadline:
        time.sleep(0.5)
    assert st.state == "CANCELLED", st.summary()


def test_cancel_running_job(slurm_cluster, tmp_path):
    script = _script(tmp_path, "echo started\nsleep 300")
    job = slurm.submit(script, sbatch_args=["--gpus-per-node=0", f"--output={tmp_path}/c-%j.out"])
    deadline = time.monotonic() + 30
    while slurm.status(job).state != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.3)
    slurm.cancel(job)
    final = slurm.wait(job, poll=0.5, timeout=30)
    assert final.state == "CANCELLED" and not final.ok
    slurm.cancel(job)  # cancelling an ended job is not an error


def test_submit_errors_name_the_problem(slurm_cluster, tmp_path):
    script = _script(tmp_path, "true")
    with pytest.raises(UserError, match="sbatch refused the job.*partition"):
        slurm.submit(script, sbatch_args=["--partition=no-such-partition"])
    with pytest.raises(UserError, match="does not exist"):
        slurm.submit(tmp_path / "missing.sbatch")
    with pytest.raises(UserError, match="unknown"):
        slurm.status("999999")


def test_a_host_without_a_slurm_setup_is_told_so(tmp_path, monkeypatch):
    """sbatch installed but no slurm.conf or controller: the hint is about the host, not an option."""
    import shutil

    if not shutil.which("sbatch") or Path("/etc/slurm/slurm.conf").exists():
        pytest.skip("needs sbatch installed and no system Slurm config (tests/system-deps.sh installs it)")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    with pytest.raises(UserError, match="sbatch found no Slurm cluster(.|\n)*submit from a login node"):
        slurm.submit(_script(tmp_path, "true"))


def _micro_pretrain_yaml(path: Path, shards: Path, out: Path, uri: str, experiment: str, **model) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "model": {"preset": "micro/4", **model},
        "data": {"shards": str(shards), "channels": 1, "mean": [0.5], "std": [0.5],
                 "batch_size": 16, "num_workers": 0},
        "schedule": {"warmup_steps": 1},
        "train": {"steps": 4, "eval_every": 0, "log_every": 1},
        "checkpoint": {"every_steps": 0},
        "tracking": {"uri": uri, "experiment": experiment, "system_metrics": False},
        "out": str(out),
    }))
    return path


@pytest.mark.slow
def test_pretrain_on_two_nodes_through_launch(slurm_cluster, digits_shards, tmp_path, capfd, monkeypatch):
    """`vitpipe launch --backend slurm pretrain CFG`: a real 2-rank DeepSpeed (CPU) pretraining job,
    followed to the end; the run is tracked in MLflow by rank 0 with world size 2."""
    import mlflow

    from vitpipe.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _micro_pretrain_yaml(tmp_path / "micro.yaml", digits_shards, tmp_path / "run", uri, "slurm-test")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = main(["launch", "--backend", "slurm", "--nodes", "2", "--nproc-per-node", "1",
               "--slurm.gpus-per-node", "0", "--slurm.cpus-per-task", "2", "--slurm.poll", "1",
               "--slurm.output", str(tmp_path / "pretrain-%j.out"), "pretrain", str(cfg)])
    out, err = capfd.readouterr()
    assert rc == 0, out[-4000:] + err[-2000:] + slurm_cluster.logs()
    assert "submitted Slurm job" in err and "COMPLETED (exit 0)" in err
    assert "2 node(s) x 1 rank(s)" in out  # the job's log, streamed while it ran
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("slurm-test").experiment_id])
    assert len(runs) == 1  # only rank 0 tracks
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["derived.world_size"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 2


def _rank_pids(cfg: Path) -> dict[int, int]:
    """rank -> pid of the training processes of the job whose config is `cfg` (on this one-host cluster)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if str(cfg) in cmd and "vitpipe.cli" in cmd and "torch.distributed.run" not in cmd:
                found[int(p.environ()["RANK"])] = p.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            pass
    return found


@pytest.mark.slow
def test_a_bare_sbatch_job_closes_its_run_when_rank0_is_sigkilled(slurm_cluster, digits_shards, tmp_path):
    """`sbatch cluster/vitpipe.sbatch pretrain CFG` with nothing of vitpipe on the submitting side:
    rank 0 SIGKILLed mid-run (the OOM killer) cannot close its MLflow run; the batch script does
    once srun returns (FAILED), and the job still fails with the ranks' exit code."""
    import yaml
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _micro_pretrain_yaml(tmp_path / "micro.yaml", digits_shards, tmp_path / "run", uri, "slurm-sigkill")
    spec = yaml.safe_load(cfg.read_text())
    spec["train"]["steps"] = 100_000  # runs until killed
    cfg.write_text(yaml.safe_dump(spec))
    job = slurm.submit(SBATCH_SCRIPT, ["pretrain", str(cfg)], cwd=tmp_path, env=RANK_ENV,
                       sbatch_args=["--nodes=2", *CPU_NODE, f"--output={tmp_path}/job-%j.out"])
    client = MlflowClient(uri)

    def losses() -> int:
        exp = client.get_experiment_by_name("slurm-sigkill")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return len(client.get_metric_history(runs[0].info.run_id, "train/loss")) if runs else 0

    deadline = time.monotonic() + 240
    while losses() < 2:
        assert time.monotonic() < deadline and not slurm.status(job).done, slurm.status(job).summary()
        time.sleep(0.5)
    ranks = _rank_pids(tmp_path / "micro.yaml")
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[0], signal.SIGKILL)
    final = slurm.wait(job, poll=0.5, timeout=180)
    text = Path(final.log).read_text()
    assert final.state == "FAILED" and final.exit_code != 0, f"{final.summary()}\n{text[-3000:]}"
    (run,) = client.search_runs([client.get_experiment_by_name("slurm-sigkill").experiment_id])
    assert run.info.status == "FAILED", text[-3000:]
    assert f"MLflow run {run.info.run_id} closed as FAILED" in text


@pytest.mark.slow
def test_pretrain_flow_submits_to_slurm(slurm_cluster, digits_shards, tmp_path, monkeypatch):
    """The Prefect pretrain flow with launcher="slurm": the job runs on 2 nodes, the flow reports the
    job's end state; a job that fails makes the flow fail with the job's error, not hang or pass."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.stages import LauncherError, pretrain_flow

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    launch = {"nodes": 2, "slurm.gpus-per-node": 0, "slurm.cpus-per-task": 2, "slurm.poll": 1,
              "slurm.output": str(tmp_path / "flow-%j.out")}
    good = _micro_pretrain_yaml(tmp_path / "good.yaml", digits_shards, tmp_path / "good", uri, "flow-slurm")
    bad = _micro_pretrain_yaml(tmp_path / "bad.yaml", digits_shards, tmp_path / "bad", uri, "flow-slurm",
                               overrides={"no_such_field": 1})
    with prefect_test_harness(server_startup_timeout=120):
        record = pretrain_flow(config=str(good), nproc=1, launcher="slurm", tracking_uri=uri,
                               experiment="flow-slurm", launch_options=launch)
        with pytest.raises(LauncherError) as failed:
            pretrain_flow(config=str(bad), nproc=1, launcher="slurm", tracking_uri=uri,
                          experiment="flow-slurm", launch_options=launch)
    assert record["metrics"]["train/loss"] > 0
    assert Path(record["export"], "model.safetensors").is_file()
    logs = sorted(tmp_path.glob("flow-*.out"))
    assert len(logs) == 2  # bad input in the job: exit status 2, which the flow does not retry
    assert "2 node(s) x 1 rank(s)" in logs[0].read_text()
    assert failed.value.returncode == 2
    # The flow's error names the job's state and the ranks' own error, not just torchrun's report.
    reason = str(failed.value).splitlines()[0]
    assert "FAILED (exit" in reason and "no_such_field" in reason, reason


def test_launch_without_wait_prints_the_job_id(slurm_cluster, tmp_path, capfd):
    from vitpipe.cli import main

    rc = main(["launch", "--backend", "slurm", "--no-slurm.wait", "--slurm.gpus-per-node", "0",
               "--slurm.cpus-per-task", "1", "--slurm.output", str(tmp_path / "nowait-%j.out"),
               "--module", "cluster.allreduce_check"])
    out, _ = capfd.readouterr()
    job = out.strip().splitlines()[-1]
    assert rc == 0 and job.isdigit()
    final = slurm.wait(job, poll=0.5, timeout=120)
    assert final.ok, final.summary() + Path(final.log).read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_launch_cancels_the_job(slurm_cluster, tmp_path, sig):
    """A flow run's cancellation stops `vitpipe launch` (SIGINT, then SIGTERM); the job must go too."""
    script = _script(tmp_path, "echo started\nsleep 300")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitpipe.cli", "launch", "--backend", "slurm", "--slurm.script", str(script),
         "--slurm.gpus-per-node", "0", "--slurm.cpus-per-task", "1", "--slurm.poll", "0.5",
         "--slurm.output", str(tmp_path / "stop-%j.out"), "--module", "unused"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = None
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        if m := re.search(r"submitted Slurm job (\d+)", line):
            job = m.group(1)
        if job and "RUNNING" in line or time.monotonic() > deadline:
            break
    assert job, "launch did not submit"
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode != 0
    assert f"cancelled Slurm job {job}" in rest
    assert slurm.wait(job, poll=0.5, timeout=30).state == "CANCELLED"
