"""Every training run records the shard set it read (name, digest of index.json, location), however
it is launched: here the plain `vitpipe pretrain` command, with no flow around it (flows and Slurm
runs are checked in tests/test_deploy.py and tests/test_demo.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from vit.tracking import lineage


def test_dataset_entity_of_a_shard_set(digits_shards):
    dataset, digest = lineage.dataset_entity(str(digits_shards / "index.json"))
    assert digest == hashlib.sha256((digits_shards / "index.json").read_bytes()).hexdigest()
    assert dataset.name == digits_shards.name and dataset.digest == digest[:32]
    assert json.loads(dataset.source) == {"uri": str(digits_shards.resolve())}
    profile = json.loads(dataset.profile)
    assert profile["num_classes"] == 10 and profile["sha256"] == digest and profile["splits"]["val"] > 0


@pytest.mark.slow
def test_plain_cli_training_logs_its_dataset_input(digits_shards, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "micro/4"},
        "data": {"shards": str(digits_shards), "image_size": 16, "channels": 1, "batch_size": 32, "num_workers": 0},
        "train": {"steps": 2, "eval_every": 0, "log_every": 1}, "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 0}, "tracking": {"uri": uri, "experiment": "cli", "system_metrics": False},
        "out": str(tmp_path / "run")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_RUN_ID", "PREFECT__"))}
    proc = subprocess.run([sys.executable, "-m", "vitpipe.cli", "pretrain", str(cfg)], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == digits_shards.name
    assert inp.dataset.digest == hashlib.sha256((digits_shards / "index.json").read_bytes()).hexdigest()[:32]
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}
