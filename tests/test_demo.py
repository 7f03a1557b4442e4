"""`vitpipe demo --size small` as a user runs it, checked through the MLflow and Prefect clients.

The demo runs once per session (the `small_demo` fixture in conftest.py): real packaged images,
real shards, 2 DeepSpeed ranks on the CPU, Prefect's temporary local server, a SQLite MLflow
store. The accuracy goal of the full-size demo (>= 97% on digits) is not asserted here: the small
run trains for a few steps only; docs/demo.md records the full run.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from flows import tracking
from flows.demo import EXPERIMENT, demo
from vitpipe.errors import UserError

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STAGES = {"shard", "pretrain", "finetune", "evaluate"}


@pytest.fixture(scope="module")
def runs(small_demo):
    """The demo's MLflow runs: (parent, {stage: [child runs]})."""
    from mlflow import MlflowClient

    client = MlflowClient(small_demo["tracking_uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    all_runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in all_runs if r.data.tags.get(tracking.STAGE_TAG) == "pipeline"]
    children: dict[str, list] = {}
    for r in all_runs:
        if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id:
            children.setdefault(r.data.tags[tracking.STAGE_TAG], []).append(r)
    return client, parent, children


def test_demo_prints_the_summary_and_the_mlflow_ui_command(small_demo):
    out = small_demo["stdout"]
    for stage in ("pretrain", "finetune", "evaluate"):
        assert any(line.startswith(stage) and "%" in line for line in out.splitlines()), out
    assert f"mlflow ui --backend-store-uri {small_demo['tracking_uri']}" in out
    assert "registered model vitpipe-vit v1" in out


def test_one_parent_run_with_a_finished_child_per_stage(runs, small_demo):
    client, parent, children = runs
    assert parent.info.status == "FINISHED" and parent.info.run_name == "demo-small"
    assert set(children) == STAGES and len(children["shard"]) == 2
    assert all(r.info.status == "FINISHED" for rs in children.values() for r in rs)
    # every run points back at the Prefect flow run that made it
    flow_runs = {r.data.tags[tracking.FLOW_RUN_TAG] for rs in children.values() for r in rs}
    assert len(flow_runs) == 5 and parent.data.tags[tracking.FLOW_RUN_TAG] not in flow_runs
    assert "evaluate_top1" in parent.data.metrics


def test_training_runs_log_their_dataset_metrics_and_artifacts(runs, small_demo):
    client, _, children = runs
    for stage, dataset in (("pretrain", "shapes_faces"), ("finetune", "digits")):
        (run,) = children[stage]
        (inp,) = run.inputs.dataset_inputs
        index = small_demo["out"] / "shards" / dataset / "index.json"
        assert inp.dataset.name == dataset
        assert inp.dataset.digest == hashlib.sha256(index.read_bytes()).hexdigest()[:32]
        assert json.loads(inp.dataset.source)["uri"] == str(index.parent)
        assert "train/loss" in run.data.metrics and "val/top1" in run.data.metrics
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert len(history) >= 2
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "model" in artifacts and "loss_curve.png" in artifacts
    (ev,) = children["evaluate"]
    files = {a.path for a in client.list_artifacts(ev.info.run_id, "evaluation/val")}
    assert {"evaluation/val/confusion_matrix.png", "evaluation/val/results.json"} <= files
    assert 0.0 <= ev.data.metrics["val/top1"] <= 1.0


def test_finetuned_model_is_registered_as_candidate_and_champion(runs, small_demo):
    import mlflow
    import torch

    from vit.tracking.registry import load_registered

    client, _, children = runs
    (ft,) = children["finetune"]
    champion = client.get_model_version_by_alias("vitpipe-vit", "champion")
    candidate = client.get_model_version_by_alias("vitpipe-vit", "candidate")
    assert str(champion.version) == str(candidate.version) == "1"
    assert champion.run_id == ft.info.run_id
    assert champion.tags["vitpipe.eval.split"].startswith("val:")
    mlflow.set_tracking_uri(small_demo["tracking_uri"])
    model = load_registered("vitpipe-vit", "champion")
    with torch.no_grad():
        logits = model(torch.zeros(3, 1, 16, 16))
    assert logits.shape == (3, 10)


def test_prefect_flow_runs_completed_with_artifacts(runs, small_demo):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from test_deploy import running_prefect_server

    _, parent, _ = runs
    # The demo's temporary server is gone; a server on the same database answers for it.
    with running_prefect_server(small_demo["prefect_home"]) as server, \
            temporary_settings(updates={PREFECT_API_URL: server["api"]}), get_client(sync_client=True) as client:
        pipeline = client.read_flow_run(parent.data.tags[tracking.FLOW_RUN_TAG])
        assert pipeline.state.is_completed()
        flows = {f.id: f.name for f in client.read_flows()}
        names = sorted(flows[r.flow_id] for r in client.read_flow_runs() if r.state.is_completed())
        # the supervised pipeline, then the self-supervised path's own shard, pretrain and evaluate
        assert names == ["evaluate", "evaluate", "finetune", "pipeline", "pretrain", "pretrain", "shard", "shard",
                         "shard"]
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["pipeline-summary", "shards-digits", "finetune-mlflow-digits"])))}
        assert keys == {"pipeline-summary", "shards-digits", "finetune-mlflow-digits"}


def test_self_supervised_path_pretrains_mae_on_unlabelled_digits_then_knn(small_demo):
    from mlflow import MlflowClient

    assert "self-supervised: MAE on 300 unlabelled digits, frozen encoder k-NN top-1" in small_demo["stdout"]
    index = json.loads((small_demo["out"] / "shards" / "digits_unlabelled" / "index.json").read_text())
    assert index["classes"] == []
    client = MlflowClient(small_demo["tracking_uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    (mae,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.params.get("train.objective") == "mae"]
    assert mae.info.status == "FINISHED" and "val/knn_top1" in mae.data.metrics and "val/loss" in mae.data.metrics
    pngs = [a.path for a in client.list_artifacts(mae.info.run_id, "reconstructions")]
    assert pngs and all(p.startswith("reconstructions/reconstruction_step") for p in pngs)
    knn = [r for r in client.search_runs([exp.experiment_id]) if "val/knn_top1_k20" in r.data.metrics]
    assert len(knn) == 1 and 0 < knn[0].data.metrics["val/knn_top1_k20"] <= 1


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="--size 'huge'"):
        demo(tmp_path, size="huge")
    with pytest.raises(UserError, match="--nproc 0"):
        demo(tmp_path, nproc=0)
