"""`pipeline_flow`: shard -> pretrain -> fine-tune -> evaluate, as subflows under one MLflow parent run.

    from flows.pipeline import pipeline_flow
    pipeline_flow(pretrain_src="images/shapes", finetune_src="images/digits", workdir="runs/today",
                  pretrain_config="vit/recipes/shapes.yaml", finetune_config="vit/recipes/digits.yaml")

Each stage is its own subflow (its own Prefect flow run, artifacts and MLflow child run), so a
platform team sees in both UIs which stage failed and can re-run it alone. Re-running the
pipeline with the same sources and configs skips the sharding that is complete and resumes
training from its checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows import storage, tracking
from flows.stages import (MLFLOW_UI_URL, REGISTERED_MODEL, Launcher, evaluate_flow, finetune_flow, place,
                          pretrain_flow, publish_summary, register_and_promote, resolve_output_root, shard_flow)

# What the summary table shows of each stage, in order: (stage, metric keys tried in turn).
SUMMARY_METRICS = {
    "pretrain": ("val/top1", "val_top1", "top1"),
    "finetune": ("val/top1", "val_top1", "top1"),
    "evaluate": ("top1",),
}


def summary_rows(records: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per stage for the summary table: stage, dataset, top-1, loss, MLflow run id."""
    rows = []
    for stage, record in records.items():
        metrics = record.get("metrics", {})
        top1 = next((metrics[k] for k in SUMMARY_METRICS.get(stage, ()) if k in metrics), None)
        loss = next((metrics[k] for k in ("val/loss", "val_loss", "loss", "train/loss") if k in metrics), None)
        rows.append({"stage": stage, "dataset": Path(record.get("dataset", "")).name,
                     "top1": None if top1 is None else round(top1, 4),
                     "loss": None if loss is None else round(loss, 4),
                     "mlflow_run_id": record.get("mlflow_run_id", "")})
    return rows


@flow(name="pipeline", log_prints=True)
def pipeline_flow(pretrain_src: str, finetune_src: str, workdir: str = "vitpipe-runs",
                  pretrain_config: str | None = None, finetune_config: str | None = None,
                  evaluate_config: str | None = None, shard_overrides: dict[str, Any] | None = None,
                  pretrain_overrides: dict[str, Any] | None = None,
                  finetune_overrides: dict[str, Any] | None = None,
                  evaluate_overrides: dict[str, Any] | None = None, nproc: int = 1,
                  launcher: Launcher = "local", tracking_uri: str | None = None,
                  experiment: str = tracking.DEFAULT_EXPERIMENT, run_name: str = "pipeline",
                  register_as: str | None = REGISTERED_MODEL, announce_datasets: bool = False,
                  launch_options: dict[str, Any] | None = None, output_root: str | None = None) -> dict:
    """Shard both collections, pretrain on the first, fine-tune on the second, evaluate the result.

    The fine-tuned model is registered as `candidate` of `register_as` (None: not registered)
    and promoted to `champion` when it beats the champion on the same split.
    `announce_datasets=False` keeps the pipeline's own shard sets from firing the fine-tune
    trigger of a deployment on the same server (the pipeline fine-tunes them itself).
    A relative `workdir` is under `output_root` (in a deployed run: $VITPIPE_HOME/runs by default).
    Returns {'mlflow_run_id': parent run, 'stages': {stage: record}, 'summary': rows}.
    """
    logger = get_run_logger()
    work = Path(place(workdir, resolve_output_root(output_root)))
    uri = tracking.resolve_tracking_uri(tracking_uri)
    storage.require_durable(uri=uri, paths={"pipeline workdir": work})
    common = dict(tracking_uri=uri, experiment=experiment)
    training = dict(nproc=nproc, launcher=launcher, launch_options=launch_options)
    with tracking.stage_run(uri, experiment, run_name, stage="pipeline") as parent:
        runs = dict(**common, parent_run_id=parent)
        pre_data = shard_flow(src=pretrain_src, out=str(work / "shards" / Path(pretrain_src).name),
                              overrides=shard_overrides, emit_ready=announce_datasets, **runs)
        ft_data = shard_flow(src=finetune_src, out=str(work / "shards" / Path(finetune_src).name),
                             overrides=shard_overrides, emit_ready=announce_datasets, **runs)
        pre = pretrain_flow(config=pretrain_config, dataset=pre_data["path"],
                            overrides={"out": str(work / "pretrain"), **(pretrain_overrides or {})},
                            **training, **runs)
        ft = finetune_flow(dataset=ft_data["path"], dataset_name=ft_data["name"], config=finetune_config,
                           overrides=finetune_overrides, init=pre["export"], out=str(work / "finetune"),
                           **training, **runs)
        ev = evaluate_flow(model=ft["export"], dataset=ft_data["path"], config=evaluate_config,
                           overrides={"data": ft["data_config"], **(evaluate_overrides or {})},
                           out=str(work / "evaluate"), **runs)
        records = {"pretrain": pre, "finetune": ft, "evaluate": ev}
        if register_as:
            ft["registered"] = register_and_promote({**ft, "evaluation": ev}, register_as, uri,
                                                    experiment=experiment, parent_run_id=parent)
        _log_parent(uri, parent, records, {"shard_pretrain": pre_data, "shard_finetune": ft_data})

    rows = summary_rows(records)
    create_table_artifact(rows, key="pipeline-summary", description="Final metrics of each stage")
    url = tracking.run_url(MLFLOW_UI_URL, uri, parent)
    publish_summary("pipeline", ft_data["name"],
                    {f"{r['stage']}_top1": r["top1"] for r in rows if r["top1"] is not None}, url)
    logger.info("pipeline finished; MLflow parent run %s", parent)
    return {"mlflow_run_id": parent, "stages": records, "summary": rows,
            "datasets": {"pretrain": pre_data, "finetune": ft_data}, "url": url}


def _log_parent(uri: str, parent: str | None, records: dict[str, dict], datasets: dict[str, dict]) -> None:
    """The parent run carries the headline numbers, so runs compare at a glance in the MLflow UI."""
    if parent is None:
        return
    from mlflow import MlflowClient

    def log() -> None:
        client = MlflowClient(uri)
        for row in summary_rows(records):
            if row["top1"] is not None:
                client.log_metric(parent, f"{row['stage']}_top1", row["top1"])
        for key, data in datasets.items():
            client.log_param(parent, f"{key}_dataset", data["path"])
            client.log_param(parent, f"{key}_sha256", data["digest"][:16])

    tracking.guarded(uri, "logging the pipeline's summary", log)
    for key, data in datasets.items():
        tracking.log_dataset_input(uri, parent, data["path"], name=data["name"],
                                   context="training" if key == "shard_pretrain" else "finetuning")
