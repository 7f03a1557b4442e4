"""`vitpipe deploy`: register the pipeline's Prefect deployments, schedule and trigger on a work pool.

Run it once per Prefect server (again after upgrading vitpipe: deployments are updated in place):

    prefect server start &                      # or PREFECT_API_URL pointing at an existing server
    vitpipe deploy --work-pool vitpipe-local --finetune-config vit/recipes/digits.yaml
    prefect worker start --pool vitpipe-local   # on the machine that runs the flows

What it registers, all on one work pool (a `process` pool, created if missing, for one machine;
for a GPU cluster use the pool described in docs/cluster.md and `--launcher slurm`):

- `shard/shard`, `evaluate/evaluate`, `pipeline/pipeline`: run on demand;
- `pretrain/pretrain`: on a cron schedule (`--pretrain-cron`, default nightly);
- `finetune/on-new-dataset`: triggered by every `vitpipe.dataset.ready` event that `shard_flow`
  emits; it fine-tunes the current champion backbone on the new shard set.

Deployments point at the flows by module path (`flows.stages.finetune_flow`), so a worker needs
only vitpipe installed, not a copy of this repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitpipe.errors import UserError

DEFAULT_POOL = "vitpipe-local"
DEFAULT_PRETRAIN_CRON = "0 2 * * *"  # nightly, when the machine is idle
FINETUNE_DEPLOYMENT = "on-new-dataset"


def dataset_ready_trigger(dataset_glob: str = "*"):
    """The trigger that runs a fine-tune for each `vitpipe.dataset.ready` event whose dataset name matches."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.stages import DATASET_READY, DATASET_RESOURCE_PREFIX, PATH_LABEL

    return DeploymentEventTrigger(
        name="finetune-on-new-dataset",
        description="Fine-tune the champion backbone on every newly sharded dataset",
        expect={DATASET_READY},
        match={"prefect.resource.id": f"{DATASET_RESOURCE_PREFIX}{dataset_glob}"},
        # one run per event, at once (not a count over a window)
        posture="Reactive",
        threshold=1,
        parameters={"dataset": f"{{{{ event.resource['{PATH_LABEL}'] }}}}",
                    "dataset_name": "{{ event.resource.name }}"},
    )


def _absolute(path: str | None, cls) -> str | None:
    """Config files are read by the worker, maybe from another directory: pass absolute paths.
    Each is checked now against its stage's config (`cls`): a typo would otherwise surface only
    when the schedule or trigger fires. Fields it may leave out (the flow passes the data) pass."""
    if path is None:
        return None
    from pydantic import ValidationError

    from vitpipe.config import ConfigError, format_validation_error, read_yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path!r} does not exist; pass an existing YAML file")
    try:
        cls.model_validate(read_yaml(p))
    except ValidationError as e:
        wrong = [err for err in e.errors() if err["type"] != "missing"]
        if wrong:
            shown = ValidationError.from_exception_data(e.title, wrong)
            raise ConfigError(f"config file {path!r}: " + format_validation_error(cls, shown)) from None
    return str(p.resolve())


def build_deployments(*, pretrain_config: str | None = None, pretrain_dataset: str | None = None,
                      finetune_config: str | None = None, evaluate_config: str | None = None,
                      pretrain_cron: str | None = DEFAULT_PRETRAIN_CRON, dataset_glob: str = "*",
                      tracking_uri: str | None = None, experiment: str | None = None,
                      nproc: int = 1, launcher: str = "local", tags: list[str] | None = None,
                      register_as: str | None = None) -> list:
    """The RunnerDeployments of every flow (not yet sent to a server).

    Triggered fine-tunes are evaluated and registered as `candidate` of `register_as`
    (default: the pipeline's model, so a better one becomes the next `champion`).
    """
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import pipeline_flow
    from flows.stages import REGISTERED_MODEL, evaluate_flow, finetune_flow, pretrain_flow, shard_flow
    from vit.train.config import FinetuneConfig, PretrainConfig
    from vit.evaluate import EvaluateConfig

    register_as = register_as or REGISTERED_MODEL

    common: dict[str, Any] = {k: v for k, v in {"tracking_uri": tracking_uri, "experiment": experiment}.items()
                              if v is not None}
    training = {**common, "nproc": nproc, "launcher": launcher}
    tags = ["vitpipe", *(tags or [])]

    def make(flow, name: str, parameters: dict, **kwargs):
        return flow.to_deployment(name=name, parameters={k: v for k, v in parameters.items() if v is not None},
                                  tags=tags, entrypoint_type=EntrypointType.MODULE_PATH, **kwargs)

    return [
        make(shard_flow, "shard", common),
        make(pretrain_flow, "pretrain",
             {**training, "config": _absolute(pretrain_config, PretrainConfig), "dataset": pretrain_dataset},
             cron=pretrain_cron),
        make(finetune_flow, FINETUNE_DEPLOYMENT,
             {**training, "config": _absolute(finetune_config, FinetuneConfig), "register_as": register_as},
             triggers=[dataset_ready_trigger(dataset_glob)]),
        make(evaluate_flow, "evaluate", {**common, "config": _absolute(evaluate_config, EvaluateConfig)}),
        make(pipeline_flow, "pipeline", {**common, "nproc": nproc, "launcher": launcher}),
    ]


def ensure_process_pool(name: str) -> None:
    """Create the `process` work pool `name` unless it exists (any type is accepted if it does)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return
        except ObjectNotFound:
            pass
        from prefect.workers.process import ProcessWorker

        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            pass


def deploy(work_pool: str = DEFAULT_POOL, **kwargs: Any) -> dict[str, str]:
    """Create the work pool if needed and register every deployment; returns {'flow/deployment': id}."""
    from prefect import deploy as prefect_deploy

    from prefect.settings import PREFECT_API_URL

    deployments = build_deployments(**kwargs)  # bad paths and configs fail here, before a server is needed
    if not PREFECT_API_URL.value():
        # Prefect would register everything on a temporary server that vanishes when this exits.
        raise UserError("no Prefect server to deploy to: start one ('prefect server start') and set "
                        "PREFECT_API_URL=http://127.0.0.1:4200/api (or 'prefect config set PREFECT_API_URL=...')")
    ensure_process_pool(work_pool)
    ids = prefect_deploy(*deployments, work_pool_name=work_pool, print_next_steps_message=False)
    return {f"{d.flow_name}/{d.name}": str(i) for d, i in zip(deployments, ids)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-pool", default=DEFAULT_POOL,
                        help=f"work pool to deploy to; created as a 'process' pool if missing [default: {DEFAULT_POOL}]")
    parser.add_argument("--pretrain-config", help="pretraining config YAML the scheduled runs use")
    parser.add_argument("--pretrain-dataset", help="shard directory the scheduled pretraining reads (else from the config)")
    parser.add_argument("--pretrain-cron", default=DEFAULT_PRETRAIN_CRON,
                        help=f"cron schedule of pretraining; 'none' for no schedule [default: '{DEFAULT_PRETRAIN_CRON}']")
    parser.add_argument("--finetune-config", help="fine-tuning config YAML (recipe) the triggered runs use")
    parser.add_argument("--evaluate-config", help="evaluation config YAML")
    parser.add_argument("--dataset-glob", default="*",
                        help="fine-tune only on new datasets whose name matches, e.g. 'digits*' [default: *]")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI the flows log to [default: $MLFLOW_TRACKING_URI "
                                               "or sqlite:///mlflow.db in the worker's directory]")
    parser.add_argument("--experiment", help="MLflow experiment [default: vitpipe]")
    parser.add_argument("--nproc", type=int, default=1, help="training ranks per run on one machine [default: 1]")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="run training here or submit it to Slurm (see docs/cluster.md) [default: local]")


def run_cli(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be >= 1, e.g. --nproc 2")
    cron = None if str(args.pretrain_cron).lower() in ("", "none", "off") else args.pretrain_cron
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError:
            raise UserError(f"--pretrain-cron {cron!r} is not a cron expression; "
                            "e.g. '0 2 * * *' (02:00 daily) or 'none'") from None
    if cron is not None and not args.pretrain_config:
        # a schedule without a config would fail every night; deploy pretraining on demand only
        print("vitpipe deploy: no --pretrain-config, so pretraining is deployed without its schedule")
        cron = None
    ids = deploy(args.work_pool, pretrain_config=args.pretrain_config, pretrain_dataset=args.pretrain_dataset,
                 finetune_config=args.finetune_config, evaluate_config=args.evaluate_config,
                 pretrain_cron=cron, dataset_glob=args.dataset_glob, tracking_uri=args.tracking_uri,
                 experiment=args.experiment, nproc=args.nproc, launcher=args.launcher)
    for name, deployment_id in ids.items():
        print(f"deployed {name:<28} {deployment_id}")
    print(f"vitpipe deploy: {len(ids)} deployments on work pool {args.work_pool!r}; "
          f"start a worker with: prefect worker start --pool {args.work_pool}")
    return 0
