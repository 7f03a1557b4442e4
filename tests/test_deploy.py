"""`vitpipe deploy` against a real `prefect server start` on 127.0.0.1, with a real process worker.

The end-to-end tests do what a platform engineer does: `vitpipe deploy` (no tracking URI), a
process worker started as a separate process in a directory that is not the repository, then new
datasets arriving three ways (a shard deployment run, the same dataset changed, `vitpipe shard`
from a shell). The triggered fine-tunes are real 2-rank DeepSpeed runs on the CPU; one of them
is SIGTERM'd mid-training (a preemption) and must resume under Prefect's retry without leaving a
rank behind. The same deployment is then run through a real one-host Slurm cluster.

The test machine's temporary directory is `scratch/` (TMPDIR of the deploy and the worker, so
Prefect's flow-run working directories are made there); durable storage is everything else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.deploy import FINETUNE_DEPLOYMENT, build_deployments
from slurm_cluster import slurm_cluster  # noqa: F401  (fixture)
from vit.train.distributed import free_port
from vitpipe.cli import main as vitpipe_main

PREFECT = str(Path(sys.executable).with_name("prefect"))
VITPIPE = [sys.executable, "-m", "vitpipe.cli"]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy at {url} after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_prefect_server(home: Path):
    """`prefect server start` on a free 127.0.0.1 port with its database in `home`; stopped on exit.

    Yields {'api': URL, 'env': the environment a client or worker of this server needs}.
    """
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(f"{api}/health", proc, log, timeout=180)
        yield {"api": api, "home": home, "env": {**env, "PREFECT_API_URL": api}}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server for this module, its home and database in a temp dir."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect_home")) as server:
        yield server


@pytest.fixture
def use_server(prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["api"]}):
        yield prefect_server


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """This test's machine keeps its temporary files in tmp_path/scratch; the rest of tmp_path is durable."""
    import tempfile

    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Bad input, before any server is contacted


def test_deploy_rejects_a_bad_cron_and_a_missing_config(tmp_path, capsys):
    assert vitpipe_main(["deploy", "--pretrain-cron", "every night"]) == 2
    assert "--pretrain-cron 'every night'" in capsys.readouterr().err
    assert vitpipe_main(["deploy", "--pretrain-cron", "0 2 * * *", "--timezone", "Mars/Base"]) == 2
    assert "--timezone 'Mars/Base' is not an IANA time zone" in capsys.readouterr().err
    assert vitpipe_main(["deploy", "--finetune-config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_deploy_checks_config_files_and_needs_a_server(tmp_path, scratch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  lrr: 0.001\n")
    assert vitpipe_main(["deploy", "--pretrain-config", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "typo.yaml" in err and "unknown key 'optim.lrr'" in err
    text = tmp_path / "notes.yaml"
    text.write_text("just some notes\n")
    assert vitpipe_main(["deploy", "--evaluate-config", str(text)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err
    partial = tmp_path / "recipe.yaml"  # no data.shards: the trigger passes it
    partial.write_text(f"mode: linear_probe\ninit: {tmp_path}\n")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert vitpipe_main(["deploy", "--finetune-config", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "no Prefect server to deploy to" in err and "PREFECT_API_URL" in err


@pytest.mark.parametrize("args, message", [
    (["--tracking-uri", "sqlite:///mlflow.db"], "tracking URI 'sqlite:///mlflow.db': its store 'mlflow.db' is relative"),
    (["--tracking-uri", "sqlite:///{scratch}/mlflow.db"], "is inside the temporary directory"),
    (["--output-root", "runs"], "--output-root 'runs' is relative"),
    (["--output-root", "{scratch}/runs"], "is inside the temporary directory"),
    (["--finetune-init", "{tmp}/no-such-export"], "no-such-export' does not exist"),
    (["--finetune-init", "pretrained/export"], "--finetune-init 'pretrained/export' is relative"),
    (["--finetune-init", "models:/vitpipe-vit@champion"], "does not exist in the MLflow registry"),
    ([], "the default init models:/vitpipe-vit@champion does not exist"),
    (["--slurm-partition", "gpu"], "--slurm-partition is a slurm option, but the deployments launch with "
                                   "--launcher local"),
    (["--launcher", "slurm", "--hostfile", "{tmp}/hosts"], "--hostfile is a deepspeed option"),
    (["--nodes", "2"], "--nodes 2 with --backend local"),
    (["--launcher", "slurm", "--slurm-output", "{scratch}/job-%j.out"], "--slurm-output"),
    (["--launcher", "deepspeed", "--hostfile", "{tmp}/missing-hosts"], "missing-hosts' does not exist"),
])
def test_deploy_refuses_what_would_fail_at_night(args, message, tmp_path, scratch, capsys, monkeypatch):
    """A relative or temporary store or output root, an init that does not exist, launch options
    of another launcher: one line at deploy time, before anything is registered."""
    monkeypatch.setenv("VITPIPE_HOME", str(tmp_path / "home"))  # a fresh store: nothing registered yet
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    init = [] if any(a.startswith("--finetune-init") for a in args) or not args else \
        ["--finetune-init", str(_export(tmp_path / "pretrained"))]
    argv = [a.format(scratch=scratch, tmp=tmp_path) for a in args]
    assert vitpipe_main(["deploy", "--pretrain-cron", "none", *init, *argv]) == 2
    err = capsys.readouterr().err
    assert message.format(scratch=scratch, tmp=tmp_path) in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "home" / "mlflow.db").exists()  # checking an alias created no store


def _export(folder: Path, *, size: int = 16) -> Path:
    """A pretrained micro/4 ViT export (1 channel): the backbone fresh installs fine-tune from."""
    from vit.models.vit import create_model
    from vit.models.weights import save_pretrained

    if not (folder / "export" / "model.safetensors").is_file():
        save_pretrained(create_model("micro/4", image_size=size, in_chans=1, num_classes=10), folder / "export")
    return folder / "export"


def test_deployments_carry_schedule_trigger_launch_options_and_module_entrypoints(tmp_path, scratch):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("mode: full\n")
    export = _export(tmp_path / "pretrained")
    deps = {d.name: d for d in build_deployments(
        finetune_config=str(cfg), pretrain_cron="0 3 * * *", timezone="Europe/Berlin", dataset_glob="digits*",
        finetune_init=str(export), output_root=str(tmp_path / "runs"), launcher="slurm", nproc=4,
        launch={"nodes": 2, "slurm_partition": "gpu", "slurm_account": "vision", "slurm_gpus_per_node": 4,
                "slurm_output": str(tmp_path / "logs" / "vitpipe-%j.out")},
        watch="s3://bucket/datasets", watch_every=60)}
    assert set(deps) == {"shard", "pretrain", FINETUNE_DEPLOYMENT, "evaluate", "pipeline", "watch-datasets"}
    schedule = deps["pretrain"].schedules[0].schedule
    assert schedule.cron == "0 3 * * *" and schedule.timezone == "Europe/Berlin"
    ft = deps[FINETUNE_DEPLOYMENT]
    assert ft.entrypoint == "flows.stages.finetune_flow"
    (trigger,) = ft.triggers
    assert trigger.expect == {"vitpipe.dataset.ready"}
    assert trigger.match.root["prefect.resource.id"] == "vitpipe.dataset.digits*"
    assert ft.parameters["config"] == str(cfg.resolve())
    assert ft.parameters["init"] == str(export) and ft.parameters["output_root"] == str(tmp_path / "runs")
    assert ft.parameters["register_as"] == "vitpipe-vit-{dataset}"
    assert "tracking_uri" not in ft.parameters  # the worker's environment decides
    assert ft.parameters["launcher"] == "slurm" and ft.parameters["nproc"] == 4
    assert ft.parameters["launch_options"] == {"nodes": 2, "slurm.partition": "gpu", "slurm.account": "vision",
                                               "slurm.gpus-per-node": 4,
                                               "slurm.output": str(tmp_path / "logs" / "vitpipe-%j.out")}
    assert deps["pipeline"].parameters["launch_options"] == ft.parameters["launch_options"]
    assert deps["watch-datasets"].parameters == {"root": "s3://bucket/datasets", "pattern": "*/index.json"}
    assert deps["watch-datasets"].schedules[0].schedule.interval.total_seconds() == 60
    # ...and the flows turn them into the `vitpipe launch` command line
    from flows.stages import launcher_argv

    argv = launcher_argv("finetune", tmp_path / "c.yaml", 4, "slurm", ft.parameters["launch_options"])
    argv.insert(argv.index("launch") + 1, "--dry-run")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    for part in ("--nodes=2", "--partition=gpu", "--account=vision", "--gpus-per-node=4",
                 f"--output={tmp_path / 'logs' / 'vitpipe-%j.out'}"):
        assert part in out, out


# ---------------------------------------------------------------------------------------------
# The real thing


def _flow_runs_of(deployment_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _wait_for(what: str, check, timeout: float, poll: float = 1.0, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


def _final_state(run_id, timeout: float, logs) -> object:
    from prefect.client.orchestration import get_client

    def final():
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        return state if state.is_final() else None

    return _wait_for(f"flow run {run_id} to end", final, timeout, poll=2, on_timeout=logs)


def _task_runs(flow_run_id, name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))


def _processes_under(path: Path) -> list:
    """Living processes whose command line names `path` (a run's config or output): ranks, launchers."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(path) in a for a in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


class Site:
    """One machine as a platform engineer sets it up: durable folders, a scratch TMPDIR, a worker."""

    def __init__(self, root: Path, server: dict, pool: str):
        self.root, self.pool = root, pool
        self.scratch, self.home, self.data = root / "scratch", root / "vitpipe-home", root / "data"
        self.worker_dir, self.runs = root / "worker-cwd", root / "runs"
        for d in (self.scratch, self.home, self.data, self.worker_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {**server["env"], "TMPDIR": str(self.scratch), "VITPIPE_HOME": str(self.home),
                    "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(root / "client-prefect-home"),
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        self.env.pop("MLFLOW_TRACKING_URI", None)  # no tracking URI anywhere: the stated default applies
        self.uri = f"sqlite:///{self.home / 'mlflow.db'}"
        self.worker = None

    def vitpipe(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([*VITPIPE, *args], env=self.env, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"vitpipe {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def start_worker(self) -> None:
        self.worker_log = self.root / f"worker-{self.pool}.log"
        with open(self.worker_log, "wb") as log:
            self.worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", self.pool, "--type", "process"],
                                           cwd=self.worker_dir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)

    def stop_worker(self) -> None:
        if self.worker is not None:
            _stop(self.worker)

    def logs(self) -> str:
        return self.worker_log.read_text(errors="replace")[-6000:] if self.worker else ""

    def run_deployment(self, name: str, **parameters) -> object:
        from prefect.deployments import run_deployment

        return run_deployment(name, parameters=parameters, timeout=0)


def _finetune_runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.`vitpipe.stage` = 'finetune'",
                              order_by=["attributes.start_time ASC"])


def _recipe(path: Path, *, steps: int) -> Path:
    """A fine-tuning recipe that says nothing about the data's size, channels or normalisation:
    those follow the init, in a flow run exactly as from a shell."""
    path.write_text(yaml.safe_dump({
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {"steps": steps, "eval_every": 0, "log_every": 1},
        "schedule": {"warmup_steps": 1}, "checkpoint": {"every_steps": 1, "keep_last": 2},
        "tracking": {"system_metrics": False},
    }))
    return path


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(1800)
def test_new_datasets_trigger_fine_tunes_on_a_worker_from_a_fresh_install(prefect_server, tmp_path):
    """The issue's first paragraph, done again: nothing lost, nothing stale, triggers that work."""
    import psutil
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.packaged_data import write_digits, write_faces

    site = Site(tmp_path, prefect_server, "e2e-pool")
    export = _export(site.data / "pretrained")
    recipe = _recipe(site.data / "finetune.yaml", steps=10)
    out = site.vitpipe("deploy", "--work-pool", site.pool, "--pretrain-cron", "none", "--finetune-config",
                       str(recipe), "--finetune-init", str(export), "--output-root", str(site.runs),
                       "--nproc", "2", "--experiment", "e2e").stdout
    assert "no --tracking-uri" in out and "VITPIPE_HOME" in out

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["api"]}):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            finetune_id = client.read_deployment_by_name(f"finetune/{FINETUNE_DEPLOYMENT}").id
        site.start_worker()
        try:
            # 1. A new dataset, sharded by the shard deployment on the worker.
            digits = write_digits(site.data / "images" / "digits", size=16, limit=60)
            shards = site.data / "shards" / "digits"
            shard_run = site.run_deployment("shard/shard", src=str(digits), out=str(shards))
            assert _final_state(shard_run.id, 300, site.logs).is_completed(), site.logs()
            (ft1,) = _wait_for("the trigger's fine-tune run", lambda: _flow_runs_of(finetune_id), 120)
            assert ft1.parameters["dataset"] == str(shards) and ft1.parameters["dataset_name"] == "digits"

            # ...preempted mid-training: SIGTERM to its launcher once a checkpoint exists.
            base = site.runs / "finetune" / "digits"
            latest = _wait_for("the first checkpoint", lambda: next(base.glob("*/checkpoints/latest"), None), 400,
                               poll=0.2, on_timeout=site.logs)
            run_dir = latest.parent.parent
            launcher = _wait_for("the launcher", lambda: [p for p in _processes_under(run_dir)
                                                          if "launch" in p.cmdline()], 30, poll=0.2)[0]
            tree = [launcher, *launcher.children(recursive=True)]
            assert sum("vitpipe.cli" in " ".join(p.cmdline()) for p in tree) >= 3  # launch + 2 ranks
            launcher.send_signal(signal.SIGTERM)
            gone, alive = psutil.wait_procs(tree, timeout=90)
            assert not alive, f"left running after SIGTERM to the launcher: {[p.cmdline() for p in alive]}"
            if importlib.util.find_spec("vit.train.stopping"):  # the ranks' side of a stop (checkpoint, KILLED)
                (killed,) = _finetune_runs(MlflowClient(site.uri), "e2e")
                assert killed.info.status == "KILLED", killed.info.status  # until the retry reopens it
            state = _final_state(ft1.id, 600, site.logs)
            assert state.is_completed(), f"{state.type}: {state.message}\n{site.logs()}"
            (launch,) = _task_runs(ft1.id, "launch-training")
            assert launch.run_count == 2, "the SIGTERM'd launch was not retried"
            results = json.loads((run_dir / "results.json").read_text())
            assert results["resumed_from"] and results["step"] == 10 and results["steps_this_launch"] < 10

            # 2. The same dataset, changed (more images), through the same deployment.
            write_digits(digits, size=16, limit=80)
            shard_run = site.run_deployment("shard/shard", src=str(digits), out=str(shards))
            assert _final_state(shard_run.id, 300, site.logs).is_completed(), site.logs()
            ft2 = _wait_for("a second fine-tune", lambda: [r for r in _flow_runs_of(finetune_id) if r.id != ft1.id],
                            120)[0]
            assert _final_state(ft2.id, 600, site.logs).is_completed(), site.logs()

            # 3. A dataset sharded the README's way, from a shell, announces itself.
            faces = write_faces(site.data / "images" / "faces", size=16)
            said = site.vitpipe("shard", str(faces), str(site.data / "shards" / "faces")).stdout
            assert "announced dataset 'faces'" in said and prefect_server["api"] in said
            assert "announced" not in site.vitpipe("shard", str(faces), str(site.data / "shards" / "faces")).stdout
            ft3 = _wait_for("the fine-tune of the CLI's dataset",
                            lambda: [r for r in _flow_runs_of(finetune_id) if r.id not in (ft1.id, ft2.id)], 120)
            assert len(ft3) == 1 and ft3[0].parameters["dataset_name"] == "faces"
            assert _final_state(ft3[0].id, 600, site.logs).is_completed(), site.logs()

            # 4. The same inputs again (a re-delivered event, a re-run by hand): skipped, nothing registered twice.
            again = site.run_deployment(f"finetune/{FINETUNE_DEPLOYMENT}", dataset=str(shards), dataset_name="digits")
            assert _final_state(again.id, 300, site.logs).is_completed(), site.logs()
            assert _task_runs(again.id, "launch-training") == []
        finally:
            site.stop_worker()

    # Nothing lost: the MLflow store is the stated default in VITPIPE_HOME, not in a working dir.
    assert (site.home / "mlflow.db").is_file() and any((site.home / "mlartifacts").rglob("model.safetensors"))
    assert not [p for p in site.scratch.rglob("*") if p.name in ("mlflow.db", "mlartifacts", "mlruns")]
    assert not list(site.scratch.glob("*prefect")), "the worker's temporary working directories are still there"
    assert not list(site.worker_dir.iterdir())
    client = MlflowClient(site.uri)
    runs = _finetune_runs(client, "e2e")
    assert [r.data.tags["vitpipe.dataset"] for r in runs] == ["digits", "digits", "faces"]
    assert all(r.info.status == "FINISHED" and "train/loss" in r.data.metrics for r in runs)
    assert [r.data.tags["prefect.flow_run_id"] for r in runs] == [str(ft1.id), str(ft2.id), str(ft3[0].id)]

    # Nothing stale: the changed dataset trained a new model from the start, in its own folder.
    first, second, third = runs
    assert first.inputs.dataset_inputs[0].dataset.digest != second.inputs.dataset_inputs[0].dataset.digest
    assert len(first.inputs.dataset_inputs) == len(second.inputs.dataset_inputs) == 1
    runs_dirs = sorted(p.parent for p in base.glob("*/results.json"))
    assert len(runs_dirs) == 2
    changed = json.loads((next(d for d in runs_dirs if d != run_dir) / "results.json").read_text())
    assert changed["steps_this_launch"] == 10 and changed["resumed_from"] is None
    weights = [(d / "export" / "model.safetensors").read_bytes() for d in runs_dirs]
    assert weights[0] != weights[1]

    # A champion per dataset, decided by evaluations on that dataset; runs grouped under their dataset.
    v1, v2 = sorted(client.search_model_versions("name='vitpipe-vit-digits'"), key=lambda v: int(v.version))
    assert (v1.run_id, v2.run_id) == (first.info.run_id, second.info.run_id)
    assert client.get_model_version_by_alias("vitpipe-vit-digits", "candidate").version == v2.version
    # v1 (the champion) was evaluated on the old split: it is evaluated on v2's before they are compared
    exp_id = client.get_experiment_by_name("e2e").experiment_id
    (again,) = client.search_runs([exp_id], filter_string="params.model = 'models:/vitpipe-vit-digits/1'")
    assert again.data.tags["vitpipe.eval.split"] == v2.tags["vitpipe.eval.split"] != v1.tags["vitpipe.eval.split"]
    assert client.get_model_version_by_alias("vitpipe-vit-faces", "champion").run_id == third.info.run_id
    shard_runs = {r.data.tags["vitpipe.dataset.digest"]: r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("e2e").experiment_id], filter_string="tags.`vitpipe.stage` = 'shard'")}
    assert first.data.tags["vitpipe.trigger.run_id"] in shard_runs.values()
    assert first.data.tags["mlflow.parentRunId"] == first.data.tags["vitpipe.trigger.run_id"]  # nested under it
    assert "mlflow.parentRunId" not in third.data.tags  # `vitpipe shard` has no MLflow run to nest under

    # No orphans: nothing that ran these trainings is still alive.
    assert not _processes_under(site.runs), [p.cmdline() for p in _processes_under(site.runs)]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_the_same_deployment_through_slurm(prefect_server, slurm_cluster, tmp_path):
    """`vitpipe deploy --launcher slurm`: the triggered fine-tune is a Slurm job (sbatch, srun, torchrun)
    whose working directory and log are in the run's durable folder; a SIGTERM to its launcher
    cancels the job, Prefect retries, the new job resumes from the checkpoint."""
    import psutil
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cluster import slurm
    from pipeline.packaged_data import write_digits

    site = Site(tmp_path, prefect_server, "slurm-pool")
    site.env["SLURM_CONF"] = str(slurm_cluster.conf)
    export = _export(site.data / "pretrained")
    recipe = _recipe(site.data / "finetune.yaml", steps=10)
    site.vitpipe("deploy", "--work-pool", site.pool, "--pretrain-cron", "none", "--finetune-config", str(recipe),
                 "--finetune-init", str(export), "--output-root", str(site.runs), "--experiment", "slurm-e2e",
                 "--launcher", "slurm", "--slurm-gpus-per-node", "0", "--slurm-cpus-per-task", "1",
                 "--slurm-poll", "1")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["api"]}):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            finetune_id = client.read_deployment_by_name(f"finetune/{FINETUNE_DEPLOYMENT}").id
        earlier = {r.id for r in _flow_runs_of(finetune_id)}
        site.start_worker()
        try:
            digits = write_digits(site.data / "images" / "digits-slurm", size=16, limit=60)
            shard_run = site.run_deployment("shard/shard", src=str(digits), out=str(site.data / "shards" / "digits-slurm"))
            assert _final_state(shard_run.id, 300, site.logs).is_completed(), site.logs()
            (ft,) = _wait_for("the trigger's fine-tune run",
                              lambda: [r for r in _flow_runs_of(finetune_id) if r.id not in earlier], 120)
            base = site.runs / "finetune" / "digits-slurm"
            latest = _wait_for("the first checkpoint", lambda: next(base.glob("*/checkpoints/latest"), None), 400,
                               poll=0.2, on_timeout=site.logs)
            run_dir = latest.parent.parent
            procs = _processes_under(run_dir)
            launcher = next(p for p in procs if "launch" in p.cmdline())
            ranks = [p for p in procs if "launch" not in p.cmdline()]
            assert ranks, "no rank of the Slurm job was found"
            launcher.send_signal(signal.SIGTERM)
            gone, alive = psutil.wait_procs([launcher, *ranks], timeout=90)
            assert not alive, [p.cmdline() for p in alive]
            state = _final_state(ft.id, 600, site.logs)
            assert state.is_completed(), f"{state.type}: {state.message}\n{site.logs()}"
            (launch,) = _task_runs(ft.id, "launch-training")
            assert launch.run_count == 2, "the SIGTERM'd Slurm launch was not retried"
        finally:
            site.stop_worker()

    jobs = sorted(run_dir.glob("vitpipe-*.out"))  # the job logs: in the run's folder, not a temporary one
    assert len(jobs) == 2 and "vitpipe: job" in jobs[0].read_text()
    first_job = jobs[0].name.removeprefix("vitpipe-").removesuffix(".out")
    assert slurm.status(first_job).state == "CANCELLED"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed_from"] and results["step"] == 10
    client = MlflowClient(site.uri)
    (run,) = _finetune_runs(client, "slurm-e2e")
    assert run.info.status == "FINISHED" and run.data.tags["vitpipe.dataset"] == "digits-slurm"
    (inp,) = run.inputs.dataset_inputs  # logged by the rank in the Slurm job itself
    assert inp.dataset.name == "digits-slurm"
    assert client.get_model_version_by_alias("vitpipe-vit-digits-slurm", "champion").run_id == run.info.run_id
    assert not list(site.scratch.glob("*prefect")) and not _processes_under(site.runs)
