"""`vitpipe deploy` against a real `prefect server start` on 127.0.0.1, with a real process worker.

The end-to-end test deploys every flow, shards a new dataset in a separate process (which emits
`vitpipe.dataset.ready`), checks that the trigger created a fine-tune flow run for exactly that
dataset, then starts a worker and waits for the run to complete: a real DeepSpeed fine-tune of
the registered champion on the new shards, tracked in a SQLite MLflow store.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.deploy import FINETUNE_DEPLOYMENT, build_deployments, deploy
from vit.train.distributed import free_port
from vitpipe.cli import main as vitpipe_main

PREFECT = str(Path(sys.executable).with_name("prefect"))


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


# ---------------------------------------------------------------------------------------------
# Bad input, before any server is contacted


def test_deploy_rejects_a_bad_cron_and_a_missing_config(tmp_path, capsys):
    assert vitpipe_main(["deploy", "--pretrain-cron", "every night"]) == 2
    assert "--pretrain-cron 'every night'" in capsys.readouterr().err
    assert vitpipe_main(["deploy", "--finetune-config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_deploy_checks_config_files_and_needs_a_server(tmp_path, capsys):
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
    partial = tmp_path / "recipe.yaml"  # no data.shards or init: the trigger passes those
    partial.write_text("mode: linear_probe\n")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert vitpipe_main(["deploy", "--finetune-config", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "no Prefect server to deploy to" in err and "PREFECT_API_URL" in err


def test_deployments_describe_schedule_trigger_and_module_entrypoints(tmp_path):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("init: models:/vitpipe-vit@champion\n")
    deps = {d.name: d for d in build_deployments(finetune_config=str(cfg), pretrain_cron="0 3 * * *",
                                                 dataset_glob="digits*")}
    assert set(deps) == {"shard", "pretrain", FINETUNE_DEPLOYMENT, "evaluate", "pipeline"}
    assert deps["pretrain"].schedules[0].schedule.cron == "0 3 * * *"
    assert deps[FINETUNE_DEPLOYMENT].entrypoint == "flows.stages.finetune_flow"
    (trigger,) = deps[FINETUNE_DEPLOYMENT].triggers
    assert trigger.expect == {"vitpipe.dataset.ready"}
    assert trigger.match.root["prefect.resource.id"] == "vitpipe.dataset.digits*"
    assert deps[FINETUNE_DEPLOYMENT].parameters["config"] == str(cfg.resolve())


# ---------------------------------------------------------------------------------------------
# The real thing


def _register_champion(uri: str, image_size: int) -> None:
    """A tiny real ViT registered as vitpipe-vit@champion: the backbone new datasets start from."""
    import mlflow

    from vit.tracking import registry
    from vit.models.vit import create_model

    model = create_model("micro/4", image_size=image_size, in_chans=1, num_classes=10)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        registry.register_model(model, "vitpipe-vit", alias=registry.CHAMPION)
    finally:
        mlflow.set_tracking_uri(previous)


def _flow_runs_of(deployment_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_new_dataset_triggers_a_finetune_that_a_worker_completes(use_server, tmp_path, mlflow_uri):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from pipeline.packaged_data import write_faces

    size = 16
    _register_champion(mlflow_uri, size)
    recipe = tmp_path / "finetune.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"image_size": size, "channels": 1, "mean": [0.5], "std": [0.5], "batch_size": 16,
                 "num_workers": 0},
        "train": {"steps": 2, "eval_every": 0, "log_every": 1},
        "schedule": {"warmup_steps": 1}, "checkpoint": {"every_steps": 0},
        "tracking": {"system_metrics": False},
    }))
    ids = deploy("test-pool", finetune_config=str(recipe), tracking_uri=mlflow_uri, experiment="deploy-test",
                 pretrain_cron="0 2 * * *")
    assert len(ids) == 5
    with get_client(sync_client=True) as client:
        pretrain = client.read_deployment_by_name("pretrain/pretrain")
        assert pretrain.schedules and pretrain.schedules[0].schedule.cron == "0 2 * * *"
        finetune_id = client.read_deployment_by_name(f"finetune/{FINETUNE_DEPLOYMENT}").id
        assert client.read_automations_by_name("finetune-on-new-dataset")
    assert _flow_runs_of(finetune_id) == []

    # A new dataset, sharded by another process: its shard_flow emits vitpipe.dataset.ready.
    faces = write_faces(tmp_path / "faces", size=size)
    shards = tmp_path / "shards" / "faces-new"
    script = textwrap.dedent(f"""
        from flows.stages import shard_flow
        shard_flow(src={str(faces)!r}, out={str(shards)!r}, tracking_uri={mlflow_uri!r}, experiment="deploy-test")
    """)
    subprocess.run([sys.executable, "-c", script], env=use_server["env"], check=True, timeout=300,
                   capture_output=True)

    deadline = time.monotonic() + 120
    while not (runs := _flow_runs_of(finetune_id)) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(runs) == 1, "the dataset.ready trigger did not create a fine-tune flow run"
    (run,) = runs
    assert run.parameters["dataset"] == str(shards.resolve())
    assert run.parameters["dataset_name"] == "faces-new"

    # A process worker picks it up and runs the real fine-tune to completion.
    worker_env = {**use_server["env"], "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "test-pool", "--type", "process"],
                                  cwd=tmp_path, env=worker_env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                state = client.read_flow_run(run.id).state
                if state.is_final():
                    break
                time.sleep(2)
    finally:
        _stop(worker)
    assert state.is_completed(), f"fine-tune run ended {state.type}: {state.message}\n" + \
        (tmp_path / "worker.log").read_text()[-4000:]

    # MLflow: the fine-tune run is tagged with the flow run and has the new dataset as its input.
    client = MlflowClient(mlflow_uri)
    (ft,) = client.search_runs([client.get_experiment_by_name("deploy-test").experiment_id],
                               filter_string="tags.`vitpipe.stage` = 'finetune'")
    assert ft.data.tags["prefect.flow_run_id"] == str(run.id)
    assert [d.dataset.name for d in ft.inputs.dataset_inputs] == ["faces-new"]
    assert ft.info.status == "FINISHED" and "train/loss" in ft.data.metrics
    assert (shards.parent / "faces-new-finetune" / "export").is_dir()
    # ...and evaluated and registered as the new candidate. The champion stays: it has no
    # evaluation on this split to compare against.
    candidate = client.get_model_version_by_alias("vitpipe-vit", "candidate")
    assert str(candidate.version) == "2" and candidate.run_id == ft.info.run_id
    assert candidate.tags["vitpipe.eval.split"].startswith("val:")
    assert str(client.get_model_version_by_alias("vitpipe-vit", "champion").version) == "1"
