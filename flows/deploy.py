"""`vitpipe deploy`: register the pipeline's Prefect deployments, schedule and trigger on a work pool.

Run it once per Prefect server (again after upgrading vitpipe: deployments are updated in place):

    prefect server start &                      # or PREFECT_API_URL pointing at an existing server
    vitpipe deploy --work-pool vitpipe-local --finetune-config vit/recipes/digits_finetune.yaml \\
        --finetune-init /shared/runs/shapes/export --output-root /shared/runs
    prefect worker start --pool vitpipe-local   # on the machine that runs the flows

What it registers, all on one work pool (a `process` pool, created if missing):

- `shard/shard`, `evaluate/evaluate`, `pipeline/pipeline`: run on demand;
- `pretrain/pretrain`: on a cron schedule (`--pretrain-cron`, default nightly, in `--timezone`,
  default UTC);
- `finetune/on-new-dataset`: triggered by every `vitpipe.dataset.ready` event (`shard_flow`,
  `vitpipe shard` with a Prefect API configured, the watcher); it fine-tunes `--finetune-init` on
  the new shard set and registers the result in the dataset's own model (`vitpipe-vit-<dataset>`),
  whose champion is decided by evaluations on that dataset;
- `watch/<folder>` with `--watch URL`: every `--watch-every` seconds, announces new `index.json`
  files under a folder or bucket prefix.

Training runs where `--launcher` says (this machine, a DeepSpeed hostfile, Slurm) with the launch
options given here (`--nodes`, `--slurm-partition`...), written into the deployments. Everything
that would fail at 02:00 fails here, in one line: a relative or temporary tracking store or output
root, an init that does not exist, launch options of another launcher, a config with a typo.

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
DEFAULT_TIMEZONE = "UTC"  # Prefect's own default for cron schedules, made explicit
FINETUNE_DEPLOYMENT = "on-new-dataset"
DEFAULT_WATCH_EVERY = 300.0

# `vitpipe deploy` option -> `vitpipe launch` option, and the launcher it belongs to (None: any).
LAUNCH_FLAGS: dict[str, tuple[str, str | None]] = {
    "nodes": ("nodes", None),
    "hostfile": ("deepspeed.hostfile", "deepspeed"),
    "master_addr": ("deepspeed.master-addr", "deepspeed"),
    "slurm_partition": ("slurm.partition", "slurm"),
    "slurm_account": ("slurm.account", "slurm"),
    "slurm_time": ("slurm.time", "slurm"),
    "slurm_gpus_per_node": ("slurm.gpus-per-node", "slurm"),
    "slurm_cpus_per_task": ("slurm.cpus-per-task", "slurm"),
    "slurm_output": ("slurm.output", "slurm"),
    "slurm_extra_args": ("slurm.extra-args", "slurm"),
    "slurm_poll": ("slurm.poll", "slurm"),
}


def dataset_ready_trigger(dataset_glob: str = "*"):
    """The trigger that runs a fine-tune for each `vitpipe.dataset.ready` event whose dataset name matches."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.events import DATASET_READY, DATASET_RESOURCE_PREFIX, DIGEST_LABEL, PATH_LABEL, RUN_LABEL

    return DeploymentEventTrigger(
        name="finetune-on-new-dataset",
        description="Fine-tune on every newly sharded dataset",
        expect={DATASET_READY},
        match={"prefect.resource.id": f"{DATASET_RESOURCE_PREFIX}{dataset_glob}"},
        # one run per event, at once (not a count over a window)
        posture="Reactive",
        threshold=1,
        parameters={"dataset": f"{{{{ event.resource['{PATH_LABEL}'] }}}}",
                    "dataset_name": "{{ event.resource.name }}",
                    "dataset_digest": f"{{{{ event.resource.get('{DIGEST_LABEL}', '') }}}}",
                    "parent_run_id": f"{{{{ event.resource.get('{RUN_LABEL}', '') }}}}"},
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


def launch_options(launcher: str, nproc: int, options: dict[str, Any]) -> dict[str, Any]:
    """The deployments' `launch_options` from `vitpipe deploy`'s flags; checked as `vitpipe launch` would."""
    from cluster.launch import LaunchConfig, build_launch
    from flows import storage
    from vitpipe.config import ConfigError, build_config

    given = {k: v for k, v in options.items() if v not in (None, [], (), "")}
    if isinstance(given.get("slurm_extra_args"), str):
        import shlex

        given["slurm_extra_args"] = shlex.split(given["slurm_extra_args"])
    for key in given:
        flag, owner = LAUNCH_FLAGS[key]
        if owner and owner != launcher:
            raise UserError(f"--{key.replace('_', '-')} is a {owner} option, but the deployments launch with "
                            f"--launcher {launcher}; deploy with --launcher {owner} or drop it")
    out = {LAUNCH_FLAGS[k][0]: v for k, v in given.items()}
    log = out.get("slurm.output")
    if log and Path(log).is_absolute():  # a relative log lands in the stage's output folder (the job's cwd)
        storage.check_durable(log, "--slurm-output", storage.OUTPUT_FIX)
    if out.get("deepspeed.hostfile"):
        hostfile = Path(out["deepspeed.hostfile"])
        storage.check_durable(hostfile, "--hostfile", "pass an absolute path the worker can read")
        out["deepspeed.hostfile"] = str(hostfile.resolve())
    try:
        cfg = build_config(LaunchConfig, None, {"backend": launcher, "nproc_per_node": nproc,
                                                **{k.replace("-", "_"): v for k, v in out.items()}})
        build_launch(cfg.model_copy(update={"module": "unused"}), [])  # the launcher's own checks
    except ConfigError as e:
        raise UserError(f"launch options: {e}") from None
    return out


def check_init(init: str | None, fallback: str | None, finetune_config: str | None, tracking_uri: str | None) -> None:
    """The fine-tune trigger's starting model must exist where the worker will look, or it fails at 02:00."""
    from flows import inputs, storage, tracking
    from flows.stages import CHAMPION_INIT, _config_init

    chosen = init or _config_init(finetune_config, None) or CHAMPION_INIT
    where = "--finetune-init" if init else (f"init in {finetune_config}" if _config_init(finetune_config, None)
                                            else "the default init")
    for value, what in ((chosen, where), (fallback, "--finetune-fallback-init")):
        if not value or value.startswith(("runs:/", "mlflow-artifacts:/")) or "{dataset}" in value:
            continue  # a run's artifacts, or a per-dataset alias: resolved when the trigger fires
        if value.startswith("models:/"):
            if inputs.split_alias(value) is None:
                continue
            uri = tracking.resolve_tracking_uri(tracking_uri)
            why = tracking.unavailable(uri)
            if why:
                raise UserError(f"{what} {value}: cannot check it, MLflow at {uri} is unreachable ({why}); start "
                                f"it or pass --tracking-uri")
            if inputs.alias_version(value, uri) is None and not (value == chosen and fallback):
                raise UserError(f"{what} {value} does not exist in the MLflow registry at {uri} (a fresh install has "
                                f"no champion yet): pass --finetune-init PATH (a pretrained export or a timm file), "
                                f"or add --finetune-fallback-init PATH to start from until the alias exists")
            continue
        storage.check_durable(value, what, "pass an absolute path the worker can read")
        if not Path(value).exists():
            raise UserError(f"{what} {value!r} does not exist; pass a pretrained export folder, a timm weights "
                            f"file or a models:/NAME@ALIAS")


def check_schedule(cron: str | None, timezone: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron or "0 2 * * *", timezone=timezone)
    except ValidationError as e:
        if e.errors()[0]["loc"] == ("timezone",):
            raise UserError(f"--timezone {timezone!r} is not an IANA time zone; e.g. UTC, Europe/Berlin, "
                            f"America/New_York") from None
        raise UserError(f"--pretrain-cron {cron!r} is not a cron expression; e.g. '0 2 * * *' "
                        f"(02:00 daily) or 'none'") from None


def build_deployments(*, pretrain_config: str | None = None, pretrain_dataset: str | None = None,
                      finetune_config: str | None = None, evaluate_config: str | None = None,
                      pretrain_cron: str | None = DEFAULT_PRETRAIN_CRON, timezone: str = DEFAULT_TIMEZONE,
                      dataset_glob: str = "*", tracking_uri: str | None = None, experiment: str | None = None,
                      nproc: int = 1, launcher: str = "local", launch: dict[str, Any] | None = None,
                      output_root: str | None = None, finetune_init: str | None = None,
                      finetune_fallback_init: str | None = None, register_as: str | None = None,
                      watch: str | None = None, watch_every: float = DEFAULT_WATCH_EVERY,
                      watch_pattern: str = "*/index.json", tags: list[str] | None = None) -> list:
    """The RunnerDeployments of every flow (not yet sent to a server); bad settings raise UserError.

    Triggered fine-tunes are evaluated and registered as `candidate` of `register_as` (default:
    one registered model per dataset, `vitpipe-vit-{dataset}`).
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    from flows import storage
    from flows.pipeline import pipeline_flow
    from flows.stages import PER_DATASET_MODEL, evaluate_flow, finetune_flow, pretrain_flow, shard_flow
    from flows.watch import watch_flow
    from vit.evaluate import EvaluateConfig
    from vit.train.config import FinetuneConfig, PretrainConfig

    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be >= 1, e.g. --nproc 2")
    check_schedule(pretrain_cron, timezone)
    if tracking_uri:
        storage.check_tracking_uri(tracking_uri, storage.TRACKING_FIX)
    if output_root:
        storage.check_durable(output_root, "--output-root", storage.OUTPUT_FIX)
    options = launch_options(launcher, nproc, launch or {})
    configs = {"pretrain": _absolute(pretrain_config, PretrainConfig),
               "finetune": _absolute(finetune_config, FinetuneConfig),
               "evaluate": _absolute(evaluate_config, EvaluateConfig)}
    check_init(finetune_init, finetune_fallback_init, configs["finetune"], tracking_uri)
    schedule = Cron(pretrain_cron, timezone=timezone) if pretrain_cron else None

    def given(**kw: Any) -> dict[str, Any]:
        return {k: v for k, v in kw.items() if v not in (None, {}, [])}

    common = given(tracking_uri=tracking_uri, experiment=experiment)
    training = {**common, "nproc": nproc, "launcher": launcher, **given(launch_options=options,
                                                                         output_root=output_root)}
    tags = ["vitpipe", *(tags or [])]

    def make(flow, name: str, parameters: dict, **kwargs):
        return flow.to_deployment(name=name, parameters={k: v for k, v in parameters.items() if v is not None},
                                  tags=tags, entrypoint_type=EntrypointType.MODULE_PATH, **kwargs)

    deployments = [
        make(shard_flow, "shard", common),
        make(pretrain_flow, "pretrain", {**training, "config": configs["pretrain"], "dataset": pretrain_dataset},
             schedule=schedule),
        make(finetune_flow, FINETUNE_DEPLOYMENT,
             {**training, "config": configs["finetune"], "register_as": register_as or PER_DATASET_MODEL,
              "init": finetune_init, "init_fallback": finetune_fallback_init},
             triggers=[dataset_ready_trigger(dataset_glob)]),
        make(evaluate_flow, "evaluate", {**common, "config": configs["evaluate"], **given(output_root=output_root)}),
        make(pipeline_flow, "pipeline", training),
    ]
    if watch:
        if watch_every <= 0:
            raise UserError(f"--watch-every {watch_every:g}: must be > 0 seconds, e.g. 300")
        root = watch if "://" in watch else str(Path(watch).absolute())
        deployments.append(make(watch_flow, watch_deployment_name(root), {"root": root, "pattern": watch_pattern},
                                schedule=Interval(watch_every)))
    return deployments


def watch_deployment_name(root: str) -> str:
    """`watch/<name>`: the last part of the folder or prefix, which a person recognises."""
    import re

    return "watch-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", root.rstrip("/").rsplit("/", 1)[-1]).strip("-") or "root")


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
                        help=f"cron schedule of pretraining, in --timezone; 'none' for no schedule "
                             f"[default: '{DEFAULT_PRETRAIN_CRON}']")
    parser.add_argument("--timezone", default=DEFAULT_TIMEZONE,
                        help="IANA time zone of the cron schedule, e.g. Europe/Berlin [default: UTC]")
    parser.add_argument("--finetune-config", help="fine-tuning config YAML (recipe) the triggered runs use")
    parser.add_argument("--finetune-init",
                        help="what triggered fine-tunes start from: a pretrained export folder, a timm weights file "
                             "(with model.preset in the config) or models:/NAME@ALIAS; checked now "
                             "[default: init in the config, else models:/vitpipe-vit@champion]")
    parser.add_argument("--finetune-fallback-init",
                        help="used while the --finetune-init alias does not exist yet (a fresh install), e.g. a "
                             "pretrained export; without it such a trigger fails, saying so")
    parser.add_argument("--register-as", help="registered model of triggered fine-tunes; {dataset} is replaced by the "
                                              "dataset's name [default: vitpipe-vit-{dataset}: a champion per dataset]")
    parser.add_argument("--evaluate-config", help="evaluation config YAML")
    parser.add_argument("--dataset-glob", default="*",
                        help="fine-tune only on new datasets whose name matches, e.g. 'digits*' [default: *]")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI the flows log to (absolute) [default: the "
                                               "worker's $MLFLOW_TRACKING_URI, else sqlite:///$VITPIPE_HOME/mlflow.db "
                                               "on the worker, VITPIPE_HOME defaulting to ~/.vitpipe]")
    parser.add_argument("--output-root", help="absolute folder for the training and evaluation outputs [default: "
                                              "beside a local dataset, else $VITPIPE_HOME/runs on the worker]")
    parser.add_argument("--experiment", help="MLflow experiment [default: vitpipe]")
    g = parser.add_argument_group("where training runs (written into the deployments; see docs/cluster.md)")
    g.add_argument("--launcher", choices=["local", "deepspeed", "slurm"], default="local",
                   help="local: torchrun on the worker's machine; deepspeed: a hostfile's machines over ssh; "
                        "slurm: a batch job [default: local]")
    g.add_argument("--nproc", type=int, default=1, help="training ranks per node, one per GPU [default: 1]")
    g.add_argument("--nodes", type=int, help="machines per training run (deepspeed, slurm) [default: 1]")
    g.add_argument("--hostfile", help="deepspeed: the hostfile ('HOST slots=GPUS' lines)")
    g.add_argument("--master-addr", help="deepspeed: address of the first host as the others reach it")
    g.add_argument("--slurm-partition", help="slurm: partition")
    g.add_argument("--slurm-account", help="slurm: account")
    g.add_argument("--slurm-time", help="slurm: wall-clock limit, e.g. 2-00:00:00")
    g.add_argument("--slurm-gpus-per-node", type=int, help="slurm: GPUs per node [default: --nproc]; 0 on CPU nodes")
    g.add_argument("--slurm-cpus-per-task", type=int, help="slurm: cores per node for the data loaders")
    g.add_argument("--slurm-output", help="slurm: job log, e.g. /shared/logs/vitpipe-%%j.out [default: "
                                          "vitpipe-<jobid>.out in the stage's output folder]")
    g.add_argument("--slurm-extra-args", help="slurm: more sbatch options in one string, e.g. "
                                              "--slurm-extra-args='--qos=high --exclusive'")
    g.add_argument("--slurm-poll", type=float, help="slurm: seconds between job state checks [default: 10]")
    g = parser.add_argument_group("watching a folder or bucket for new shard sets")
    g.add_argument("--watch", help="folder or fsspec URL (s3://bucket/datasets) to look in for new */index.json")
    g.add_argument("--watch-every", type=float, default=DEFAULT_WATCH_EVERY,
                   help=f"seconds between looks [default: {DEFAULT_WATCH_EVERY:g}]")
    g.add_argument("--watch-pattern", default="*/index.json",
                   help="glob under --watch of the index files [default: */index.json]")


def run_cli(args: argparse.Namespace) -> int:
    cron = None if str(args.pretrain_cron).lower() in ("", "none", "off") else args.pretrain_cron
    check_schedule(cron, args.timezone)
    if cron is not None and not args.pretrain_config:
        # a schedule without a config would fail every night; deploy pretraining on demand only
        print("vitpipe deploy: no --pretrain-config, so pretraining is deployed without its schedule")
        cron = None
    ids = deploy(args.work_pool, pretrain_config=args.pretrain_config, pretrain_dataset=args.pretrain_dataset,
                 finetune_config=args.finetune_config, evaluate_config=args.evaluate_config,
                 pretrain_cron=cron, timezone=args.timezone, dataset_glob=args.dataset_glob,
                 tracking_uri=args.tracking_uri, experiment=args.experiment, nproc=args.nproc,
                 launcher=args.launcher, launch={k: getattr(args, k) for k in LAUNCH_FLAGS},
                 output_root=args.output_root, finetune_init=args.finetune_init,
                 finetune_fallback_init=args.finetune_fallback_init, register_as=args.register_as,
                 watch=args.watch, watch_every=args.watch_every, watch_pattern=args.watch_pattern)
    for name, deployment_id in ids.items():
        print(f"deployed {name:<28} {deployment_id}")
    if not args.tracking_uri:
        print("vitpipe deploy: no --tracking-uri: runs log to the worker's MLFLOW_TRACKING_URI, else "
              "sqlite:///$VITPIPE_HOME/mlflow.db on the worker (VITPIPE_HOME defaults to ~/.vitpipe)")
    print(f"vitpipe deploy: {len(ids)} deployments on work pool {args.work_pool!r}; "
          f"start a worker with: prefect worker start --pool {args.work_pool}")
    return 0
