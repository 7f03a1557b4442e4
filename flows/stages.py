"""One Prefect flow per stage: `shard_flow`, `pretrain_flow`, `finetune_flow`, `evaluate_flow`.

Flows only orchestrate. Sharding and evaluation call the stage functions (`pipeline.shard.shard`,
`vit.evaluate.evaluate`) in a task; training runs `vitpipe launch` as a subprocess (torchrun on
this machine, DeepSpeed's launcher over a hostfile, or a Slurm job), streams its output into the
flow run's log and fails the flow run with the launcher's error. Parameters are a config file plus
dotted overrides, exactly what `vitpipe STAGE --config FILE --key value` takes, so a deployment and
a shell command describe the same run; the config the stage gets holds only what was set (the
file, the overrides, the flow's own keys), so options left unset follow the starting model as they
do in the shell.

Results are keyed on their inputs (`flows.inputs`): a training or evaluation run writes into
`OUT/<key>/`, so changed inputs train anew and the same inputs are skipped; outputs and the
tracking store must be durable in a deployed run (`flows.storage`).

Retries: only failures that a second try can fix (I/O and network errors, a tracking server that is
briefly down, a launcher stopped by a signal: a preemption, a SIGTERM) are retried, with
exponential backoff; a bad config fails at once. Training resumes from its latest complete
checkpoint on a retry, so a retry costs only the steps since that checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.tasks import exponential_backoff

from flows import inputs, storage, tracking
from flows.events import DATASET_READY, dataset_resource, emit_dataset_ready  # noqa: F401  (re-exported)
from vit.tracking import lineage
from vitpipe.config import StageConfig, build_config
from vitpipe.errors import UserError

MLFLOW_UI_URL = os.environ.get("VITPIPE_MLFLOW_UI_URL", "http://127.0.0.1:5000")
CACHE_KEY_FILE = "flow-cache-key.json"
DATASET_TAG = "vitpipe.dataset"          # on every run of a dataset (shard, and what it triggered)
DIGEST_TAG = "vitpipe.dataset.digest"    # the first 16 hex digits of its index.json's sha256


class LauncherError(RuntimeError):
    """A training launcher exited non-zero; carries its exit status and the tail of its output."""

    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        errors = [line for line in tail if re.search(r"(Error|Exception|error:)", line)]
        reason = errors[-1].strip() if errors else (tail[-1].strip() if tail else "no output")
        if returncode in _SIGNAL_EXITS:  # what torchrun prints then is its own report of the signal
            name = signal.Signals(abs(returncode) % 128 if returncode > 0 else -returncode).name
            reason = f"stopped by {name} (a preemption, a kill or the OOM killer); a retry resumes from its " \
                     f"latest checkpoint"
        super().__init__(f"{stage} launcher exited with status {returncode}: {reason}\n"
                         f"--- last {len(tail)} lines of its output ---\n" + "\n".join(tail))


# ---------------------------------------------------------------------------------------------
# Which failures are worth a retry

_NOT_TRANSIENT_OSERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                           NotADirectoryError)
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ECONNREFUSED, errno.ECONNRESET,
                     errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ESTALE}
_TRANSIENT_LOG = re.compile(r"Connection (refused|reset|aborted)|Temporary failure|timed out|"
                            r"Max retries exceeded|Service Unavailable|Bad Gateway|database is locked")
# Exit statuses of a launcher stopped from outside (preemption, `kill`, the OOM killer, a node going
# away). A cancelled flow run never gets here: Prefect stops it without a retry.
_SIGNAL_EXITS = {128 + signal.SIGKILL, 128 + signal.SIGTERM, 128 + signal.SIGHUP, 128 + signal.SIGINT,
                 -signal.SIGKILL, -signal.SIGTERM, -signal.SIGHUP, -signal.SIGINT}


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry can fix; False for bad input and bugs, which fail at once."""
    if isinstance(exc, UserError):
        return False
    if isinstance(exc, LauncherError):
        if exc.returncode == 2:  # `vitpipe` exits 2 on a UserError: bad config, bad data
            return False
        return exc.returncode in _SIGNAL_EXITS or any(_TRANSIENT_LOG.search(l) for l in exc.tail)
    if isinstance(exc, _NOT_TRANSIENT_OSERRORS):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        # requests' and fsspec's network errors are OSErrors without an errno
        return exc.errno is None or exc.errno in _TRANSIENT_ERRNOS
    if type(exc).__name__ == "MlflowException":
        return bool(_TRANSIENT_LOG.search(str(exc)))
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task run only when `is_transient` says so."""
    try:
        exc = state.result(raise_on_failure=False)
    except BaseException as e:  # the result itself raised: judge that exception
        exc = e
    return isinstance(exc, BaseException) and is_transient(exc)


RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5),
               retry_jitter_factor=0.5, retry_condition_fn=retry_if_transient)


# ---------------------------------------------------------------------------------------------
# Configs


def resolve_config(cls: type[StageConfig], config: str | None, overrides: dict[str, Any] | None,
                   forced: dict[str, Any] | None = None) -> StageConfig:
    """A stage config from a file and dotted overrides; `forced` keys (set by the flow) win over both."""
    merged = dict(overrides or {})
    merged.update({k: v for k, v in (forced or {}).items() if v is not None})
    return build_config(cls, config, merged)


def set_options(cfg: StageConfig) -> dict:
    """What the user and the flow set, without the defaults: what `vitpipe STAGE --config` gets, so
    the stage fills the rest itself exactly as from a shell (data options follow the init)."""
    return cfg.model_dump(mode="json", exclude_unset=True)


def save_set_options(cfg: StageConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(set_options(cfg), sort_keys=False))
    return path


def _is_set(cfg: StageConfig, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if part not in node.model_fields_set:
            return False
        node = getattr(node, part)
    return True


def resolve_output_root(explicit: str | None) -> Path | None:
    """The root that relative and default outputs go under: the given one, else (in a deployed run,
    whose working directory vanishes) $VITPIPE_HOME/runs, else None (the working directory)."""
    if explicit:
        return Path(storage.absolute(explicit))
    return storage.default_output_root() if storage.in_deployed_run() else None


def place(path: str, root: Path | None) -> str:
    """An output path: absolute (or a URL) as given, relative ones under `root` (else the working dir)."""
    if "://" in path or os.path.isabs(os.path.expanduser(path)) or root is None:
        return storage.absolute(path)
    return str(root / path)


# ---------------------------------------------------------------------------------------------
# Sharding


def source_listing_digest(src: str) -> str:
    """sha256 over the source's file listing (path, size, mtime); any added, removed or edited file changes it."""
    from pipeline.sources import listing_digest

    return listing_digest(src)


# Options that change how fast shards are written, not what is written.
_NON_OUTPUT_OPTIONS = {"workers", "overwrite", "progress", "scheduler", "dask_address"}


def shard_cache_key(cfg: StageConfig) -> str:
    """Cache key of a sharding run: the source listing plus every option that changes the output."""
    options = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NON_OUTPUT_OPTIONS}
    blob = json.dumps({"source": source_listing_digest(str(cfg.src)), "config": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _recorded_key(out: Path) -> str | None:
    try:
        return json.loads((out / CACHE_KEY_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


@task(name="shard", **RETRIES)
def shard_task(cfg_json: dict, key: str, dask_scheduler: str | None = None) -> dict:
    """Shard unless `out` already holds a complete shard set for the same key; returns {'skipped', 'stats'}.

    The shard directory itself is the cache (not Prefect's result store): deleting it, or editing
    one source file, makes the next run shard again.
    """
    from pipeline.shard import ShardConfig, shard

    logger = get_run_logger()
    cfg = ShardConfig.model_validate(cfg_json)
    out = Path(cfg.out)
    recorded = _recorded_key(out)
    if recorded == key and (out / "index.json").is_file():
        logger.info("shards in %s are complete for this source and config (key %s); skipping", out, key[:12])
        return {"skipped": True, "stats": {}}
    if recorded is not None and not cfg.overwrite:
        # This flow wrote OUT from an older listing or config: it owns the directory, so replace
        # it. A shard set written by hand keeps the shard stage's refusal to delete it.
        logger.info("source or config changed since %s was sharded; re-sharding it", out)
        cfg = cfg.model_copy(update={"overwrite": True})
    if cfg.overwrite:
        (out / CACHE_KEY_FILE).unlink(missing_ok=True)  # the shard stage deletes only its own files
    if dask_scheduler:  # listing, planning and writing on the Dask cluster's workers
        from cluster.dask_shard import shard_on_dask

        stats = shard_on_dask(cfg, dask_scheduler)
    else:
        stats = shard(cfg)
    (out / CACHE_KEY_FILE).write_text(json.dumps({"key": key}))
    return {"skipped": False, "stats": stats}


def shard_table(index: dict) -> list[dict]:
    """One row per shard of an index: split, name, samples, bytes, sha256 prefix (a Prefect table artifact)."""
    return [{"split": split, "shard": s["name"], "samples": s["num_samples"], "bytes": s["num_bytes"],
             "sha256": s.get("sha256", "")[:16]}
            for split, info in index["splits"].items() for s in info["shards"]]


@flow(name="shard", log_prints=True)
def shard_flow(src: str | None = None, out: str | None = None, config: str | None = None,
               overrides: dict[str, Any] | None = None, name: str | None = None,
               emit_ready: bool = True, tracking_uri: str | None = None,
               experiment: str = tracking.DEFAULT_EXPERIMENT, parent_run_id: str | None = None,
               dask_scheduler: str | None = None) -> dict:
    """Shard a collection (skipped when already complete), publish its stats, emit `vitpipe.dataset.ready`.

    `dask_scheduler` (tcp://HOST:8786): list, plan and write on that Dask cluster's workers
    (`cluster.dask_shard`); the shards are the same bytes.

    Returns {'name', 'path', 'digest', 'skipped', 'totals', 'num_classes', 'mlflow_run_id'}.
    """
    from pipeline.index import load_index
    from pipeline.shard import ShardConfig

    logger = get_run_logger()
    cfg = resolve_config(ShardConfig, config, overrides, {"src": src, "out": out})
    uri = tracking.resolve_tracking_uri(tracking_uri)
    storage.require_durable(uri=uri, paths={"shard output": cfg.out})
    out_dir = Path(cfg.out).resolve()
    name = name or out_dir.name

    with tracking.stage_run(uri, experiment, f"shard-{name}", parent_run_id=parent_run_id,
                            stage="shard") as run_id:
        result = shard_task(cfg.model_dump(mode="json"), shard_cache_key(cfg), dask_scheduler)
        index = load_index(str(out_dir))
        digest = tracking.index_digest(out_dir)
        totals = index["totals"]
        _log_shard_run(uri, run_id, cfg, index, digest, name, out_dir, skipped=result["skipped"])

    create_table_artifact(shard_table(index), key=_artifact_key("shards", name),
                          description=f"Shards of dataset {name!r} in {out_dir}")
    create_markdown_artifact(
        f"### Dataset `{name}`\n\n| | |\n|---|---|\n| path | `{out_dir}` |\n"
        f"| samples | {totals['num_samples']} |\n| shards | {totals['num_shards']} |\n"
        f"| bytes | {totals['num_bytes']} |\n| failures | {totals.get('num_failures', 0)} |\n"
        f"| classes | {len(index['classes'])} |\n| index sha256 | `{digest[:16]}` |\n"
        f"| sharding | {'skipped (cached)' if result['skipped'] else 'done'} |\n",
        key=_artifact_key("dataset", name), description=f"Summary of dataset {name!r}")
    if emit_ready and not result["skipped"]:
        # Only fresh shards announce themselves: re-running a cached pipeline must not re-trigger
        # every fine-tune deployment listening for new datasets.
        emit_dataset_ready(name, out_dir, digest, run_id=run_id,
                           payload={"num_samples": totals["num_samples"], "classes": index["classes"]})
        logger.info("emitted %s for dataset %r (%s)", DATASET_READY, name, out_dir)
    print(f"shard: dataset {name!r}: {totals['num_samples']} samples in {totals['num_shards']} shards "
          f"({'cached' if result['skipped'] else 'written'}) at {out_dir}")
    return {"name": name, "path": str(out_dir), "digest": digest, "skipped": result["skipped"],
            "totals": totals, "num_classes": len(index["classes"]), "mlflow_run_id": run_id}


def _log_shard_run(uri: str, run_id: str | None, cfg: StageConfig, index: dict, digest: str, name: str,
                   out_dir: Path, *, skipped: bool) -> None:
    if run_id is None:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    def log() -> None:
        client = MlflowClient(uri)
        now = int(time.time() * 1000)
        params = [Param(k, str(v)[:6000]) for k, v in cfg.model_dump(mode="json").items()]
        metrics = [Metric(f"{k}", float(v), now, 0) for k, v in index["totals"].items()
                   if isinstance(v, (int, float))]
        metrics += [Metric(f"{split}_samples", float(info["num_samples"]), now, 0)
                    for split, info in index["splits"].items()]
        tags = [RunTag(DATASET_TAG, name), RunTag(DIGEST_TAG, digest[:16]),
                RunTag("vitpipe.cached", str(skipped).lower())]
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        client.log_artifact(run_id, str(out_dir / "index.json"))

    tracking.guarded(uri, "logging the shard run", log)
    tracking.log_dataset_input(uri, run_id, out_dir, name=name, context="output")


def _artifact_key(kind: str, name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{name}".lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Training stages: `vitpipe launch` as a subprocess, its log streamed into the flow run's log

Launcher = Literal["local", "deepspeed", "slurm"]
STOP_GRACE_S = 60.0  # what the launcher's ranks get to save a checkpoint when the flow stops them


def _flag(key: str, value: Any) -> list[str]:
    name = key.replace("_", "-")
    if isinstance(value, bool):
        head, _, leaf = name.rpartition(".")
        return [f"--{name}" if value else f"--{head + '.' if head else ''}no-{leaf}"]
    if isinstance(value, (list, tuple)):
        return [f"--{name}", yaml.safe_dump(list(value), default_flow_style=True).strip()]
    return [f"--{name}", str(value)]


def normalized_launch_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Launch options as `vitpipe launch` names them (`slurm.gpus-per-node`), whichever spelling was used."""
    return {k.replace("_", "-"): v for k, v in (options or {}).items() if v is not None}


def launcher_argv(stage: str, config_path: Path, nproc: int, launcher: str = "local",
                  launch_options: dict[str, Any] | None = None) -> list[str]:
    """The command that runs one training stage, exactly as a user would type it:
    `vitpipe launch --backend LAUNCHER --nproc-per-node N [options] -- STAGE --config FILE`.

    `vitpipe launch` stops every rank when it is stopped and exits 128 + the signal, which the
    retry policy reads as "relaunch, it resumes"; on Slurm it follows the job, prints its log and
    exits with its state (stopping it cancels the job).
    """
    options = {"nproc-per-node": nproc, **normalized_launch_options(launch_options)}
    flags = [a for k, v in options.items() for a in _flag(k, v)]
    return [sys.executable, "-m", "vitpipe.cli", "launch", "--backend", launcher, *flags, "--",
            stage, "--config", str(config_path)]


def stream_process(argv: list[str], *, env: dict[str, str], log, tail_lines: int = 60,
                   progress_every: float = 10.0, cwd: str | None = None,
                   stop_grace: float = STOP_GRACE_S) -> tuple[int, list[str]]:
    """Run `argv`, sending its output to `log` line by line; returns (exit status, last lines).

    Progress-bar updates (lines ended by a carriage return) are forwarded at most once every
    `progress_every` seconds: a bar redrawn ten times a second would otherwise flood the flow
    run's log. Leaving early (a cancelled or stopped flow run, an exception here) stops the child
    and every process below it, whatever their process group (torchrun gives each rank its own):
    SIGTERM, `stop_grace` seconds, then SIGKILL. A child that is a vitpipe command also dies with
    this process if it is killed outright (`cluster.process_tree`).
    """
    from cluster import process_tree

    tail: deque[str] = deque(maxlen=tail_lines)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                            env=process_tree.child_env(env), start_new_session=True)
    pending, last_progress = b"", -math.inf

    def emit(raw: bytes, is_progress: bool) -> None:
        nonlocal last_progress
        line = raw.decode(errors="replace").rstrip()
        if not line:
            return
        if is_progress:
            now = time.monotonic()
            if now - last_progress < progress_every:
                return
            last_progress = now
        tail.append(line)
        log(line)

    try:
        while chunk := proc.stdout.read1(1 << 16):
            parts = re.split(rb"(\r\n|\r|\n)", pending + chunk)
            pending = parts.pop()
            for raw, end in zip(parts[::2], parts[1::2]):
                emit(raw, is_progress=end == b"\r")
        emit(pending, is_progress=False)
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:
            # `vitpipe launch` stops its ranks on SIGTERM (on Slurm: cancels the job); the ranks get
            # it too, directly, in case the launcher is stuck.
            process_tree.stop_tree(proc.pid, grace=stop_grace)
            proc.wait()


@task(name="launch-training", **RETRIES)
def launch_task(stage: str, config_path: str, nproc: int, launcher: Launcher,
                env: dict[str, str], launch_options: dict[str, Any] | None = None,
                cwd: str | None = None) -> int:
    """Run a training stage to completion (locally, over a hostfile or on Slurm); raise LauncherError on failure.

    `cwd` is the stage's own output folder: whatever the launcher writes relative to its working
    directory (a Slurm job's log and working directory) lands there, not in the flow run's
    temporary directory. A retry relaunches the same command; training resumes from its latest
    complete checkpoint.
    """
    logger = get_run_logger()
    argv = launcher_argv(stage, Path(config_path), nproc, launcher, launch_options)
    logger.info("launching: %s", " ".join(argv))
    rc, tail = stream_process(argv, env={**os.environ, **env}, log=logger.info, cwd=cwd)
    if rc != 0:
        raise LauncherError(stage, rc, tail)
    return rc


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


RECORD_FILE = "flow-record.json"  # a finished stage's record, what a skipped re-run returns


def _finished(folder: Path, key: str) -> dict | None:
    """The record of a finished run with this key in `folder`, or None."""
    if inputs.recorded_key(folder) != key:
        return None
    record = _read_json(folder / RECORD_FILE)
    return record if record.get("key") == key else None


def _result_metrics(results: dict) -> dict[str, float]:
    metrics = {k: float(v) for k, v in results.items()
               if k.startswith("val/") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(results.get("final_loss"), (int, float)):
        metrics.setdefault("train/loss", float(results["final_loss"]))
    return metrics


def train_stage(stage: str, cfg: StageConfig, *, base_out: str, nproc: int, launcher: Launcher, uri: str,
                experiment: str, parent_run_id: str | None, launch_options: dict[str, Any] | None = None,
                init_identity: str | None = None, tags: dict[str, str] | None = None) -> dict:
    """Run a training stage into `base_out/<key>` as a child of `parent_run_id` in MLflow; returns its record.

    The key covers the dataset's digest, the init's identity and the config (`flows.inputs`):
    a finished run with the same key is skipped and its record returned (`skipped: True`).

    The flow creates the stage's run first and offers it to rank 0 through MLFLOW_RUN_ID. If the
    stage opens a run of its own instead (the run id stored in the checkpoint it resumes), that
    run is adopted: it gets the parent, the Prefect tags, and the flow's placeholder is deleted. A
    stage that dies before writing its results leaves the placeholder behind as FAILED, so the
    failure is visible in the tree. The stage logs its dataset input itself (`vit.tracking.lineage`).
    """
    logger = get_run_logger()
    shards = str(cfg.data.shards)
    name = lineage.dataset_name(shards)
    digest = inputs.dataset_digest(shards)
    key = inputs.training_key(stage, cfg, dataset_digest=digest, init_identity=init_identity)
    out = inputs.run_folder(base_out, key)
    run_name = cfg.tracking.run_name or f"{stage}-{name}"
    update: dict[str, Any] = {"out": str(out), "tracking": cfg.tracking.model_copy(update={"run_name": run_name})}
    if cfg.checkpoint.dir:  # a shared checkpoint root: one folder per key there too
        update["checkpoint"] = cfg.checkpoint.model_copy(update={"dir": str(inputs.run_folder(cfg.checkpoint.dir, key))})
    cfg = cfg.model_copy(update=update)
    launch_options = normalized_launch_options(launch_options)
    log = launch_options.get("slurm.output")
    storage.require_durable(uri=uri, paths={f"{stage} output": out, "checkpoint.dir": cfg.checkpoint.dir,
                                            # a relative job log lands in `out` (the job's working dir)
                                            "slurm.output": log if log and os.path.isabs(log) else None})
    tags = {DATASET_TAG: name, DIGEST_TAG: digest[:16], **(tags or {})}

    with inputs.exclusive(out, stage):
        done = _finished(out, key)
        if done is not None:
            logger.info("%s on %s: already done with these inputs (key %s) in %s; skipped, its results reused",
                        stage, name, key[:inputs.KEY_DIGITS], out)
            return _reuse(stage, done, out, uri=uri, experiment=experiment, parent_run_id=parent_run_id, tags=tags,
                          cfg=cfg)
        inputs.write_key(out, key, {"stage": stage, "dataset": shards, "dataset_sha256": digest,
                                    "init": init_identity, "config": inputs.result_config(cfg)})
        with tracking.stage_run(uri, experiment, run_name, parent_run_id=parent_run_id, stage=stage,
                                tags=tags) as run_id:
            config_path = save_set_options(cfg, out / f"{stage}-flow-config.yaml")
            env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment,
                   # one compute thread per rank: the ranks already fill the cores
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            if run_id:
                env["MLFLOW_RUN_ID"] = run_id
            launch_task(stage, str(config_path), nproc, launcher, env, launch_options, cwd=str(out))
            results = _read_json(out / "results.json")
        stage_run_id = results.get("run_id") or run_id
        if stage_run_id and stage_run_id != run_id:
            tracking.adopt_run(uri, stage_run_id, placeholder=run_id, parent_run_id=parent_run_id, stage=stage,
                               tags=tags)
        trained = _read_yaml(out / "export" / "train_config.yaml")
        record = {"key": key, "mlflow_run_id": stage_run_id, "out": str(out), "dataset": shards,
                  "dataset_digest": digest, "export": results.get("export", str(out / "export")),
                  "metrics": {**tracking.run_metrics(uri, stage_run_id), **_result_metrics(results)},
                  # how the stage read its images (after following the init): evaluating its model must
                  # read them the same way
                  "data_config": trained.get("data") or cfg.data.model_dump(mode="json"), "skipped": False}
        (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return _published(stage, name, record, uri)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _published(stage: str, name: str, record: dict, uri: str) -> dict:
    url = tracking.run_url(MLFLOW_UI_URL, uri, record["mlflow_run_id"])
    publish_summary(stage, name, record["metrics"], url,
                    extra={"output": f"`{record['out']}`", "dataset sha256": record["dataset_digest"][:16],
                           "run": "skipped (same inputs as before)" if record.get("skipped") else "trained"})
    get_run_logger().info("%s %s: %s", stage, "reused" if record.get("skipped") else "finished",
                          ", ".join(f"{k}={v:.4g}" for k, v in sorted(record["metrics"].items())
                                    if k.startswith(("val/", "train/loss"))))
    return {**record, "url": url}


def _reuse(stage: str, record: dict, out: Path, *, uri: str, experiment: str, parent_run_id: str | None,
           tags: dict[str, str], cfg: StageConfig) -> dict:
    """A skipped stage's record; one that ran while tracking was down gets its MLflow record now."""
    record = {**record, "skipped": True}
    if not record.get("mlflow_run_id") and not tracking.unavailable(uri):
        record["mlflow_run_id"] = tracking.log_late_record(
            uri, experiment, cfg.tracking.run_name or f"{stage}-{lineage.dataset_name(record['dataset'])}",
            stage=stage, params=cfg.model_dump(mode="json"), metrics=record["metrics"],
            artifacts={"model": Path(record["export"]), "": out / "config.yaml"}, parent_run_id=parent_run_id,
            tags=tags, dataset=(record["dataset"], lineage.dataset_name(record["dataset"]), "training"))
        if record["mlflow_run_id"]:
            get_run_logger().info("%s: logged to MLflow now (run %s); it ran while tracking was down", stage,
                                  record["mlflow_run_id"])
            (out / RECORD_FILE).write_text(json.dumps({**record, "skipped": False}, indent=2) + "\n")
    return _published(stage, lineage.dataset_name(record["dataset"]), record, uri)


def publish_summary(stage: str, dataset: str, metrics: dict[str, float], url: str,
                    extra: dict[str, str] | None = None) -> None:
    """Prefect artifacts of a stage: a markdown summary of its final metrics and a link to its MLflow run."""
    rows = "".join(f"| {k} | {v} |\n" for k, v in (extra or {}).items())
    rows += "".join(f"| {k} | {v:.4g} |\n" for k, v in sorted(metrics.items()))
    link = f"[MLflow run]({url})" if url else "(not tracked in MLflow: the tracking server was unreachable)"
    create_markdown_artifact(f"### {stage} on `{dataset}`\n\n| | |\n|---|---|\n{rows}\n{link}\n",
                             key=_artifact_key(f"{stage}-summary", dataset),
                             description=f"{stage} results on {dataset}")
    if url:
        create_link_artifact(url, link_text=f"MLflow run of {stage} on {dataset}",
                             key=_artifact_key(f"{stage}-mlflow", dataset))


def _default_out(stage: str, cfg: StageConfig, out: str | None, root: Path | None, name: str) -> str:
    """Where a training stage's runs go (each in a key subfolder): `out`, the config's own `out`,
    `<root>/<stage>/<dataset>`, else the stage's default (relative to the working directory)."""
    if out:
        return place(out, root)
    if _is_set(cfg, "out"):
        return place(cfg.out, root)
    if root is not None:
        return str(root / stage / name)
    return storage.absolute(cfg.out)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: str | None = None, overrides: dict[str, Any] | None = None,
                  dataset: str | None = None, nproc: int = 1, launcher: Launcher = "local",
                  tracking_uri: str | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT,
                  parent_run_id: str | None = None, launch_options: dict[str, Any] | None = None,
                  output_root: str | None = None) -> dict:
    """Pretrain a ViT on a shard set with `nproc` ranks per node; returns its MLflow run and metrics.

    The run goes to `OUT/<key>` where OUT is the config's `out` (relative ones under
    `output_root`) or `<output_root>/pretrain/<dataset>`.
    """
    from vit.train.config import PretrainConfig

    uri = tracking.resolve_tracking_uri(tracking_uri)
    cfg = resolve_config(PretrainConfig, config, overrides,
                         {"data.shards": dataset, "tracking.uri": uri, "tracking.experiment": experiment})
    base = _default_out("pretrain", cfg, None, resolve_output_root(output_root), lineage.dataset_name(cfg.data.shards))
    return train_stage("pretrain", cfg, base_out=base, nproc=nproc, launcher=launcher, uri=uri,
                       experiment=experiment, parent_run_id=parent_run_id or None, launch_options=launch_options)


REGISTERED_MODEL = "vitpipe-vit"
"""Registered model name of the pipeline's fine-tuned ViTs; `champion` is the best so far."""
CHAMPION_INIT = f"models:/{REGISTERED_MODEL}@champion"
PER_DATASET_MODEL = "vitpipe-vit-{dataset}"
"""What the fine-tune deployment registers into: one registered model per dataset, so each
dataset's `champion` is decided by evaluations on that dataset."""


def dataset_slug(name: str) -> str:
    """A dataset name as registered-model names and aliases allow it."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "dataset"


def _config_init(config: str | None, overrides: dict[str, Any] | None) -> str | None:
    if overrides and overrides.get("init"):
        return str(overrides["init"])
    if config:
        from vitpipe.config import read_yaml

        value = read_yaml(config).get("init")
        return str(value) if value else None
    return None


def choose_init(init: str | None, fallback: str | None, uri: str, *, dataset: str) -> tuple[str, str, str]:
    """(what the stage loads, its identity for the run key, a note) for a fine-tune's starting model.

    `init` may name the dataset (`models:/vitpipe-vit-{dataset}@champion`). A registry alias that
    does not exist yet (a fresh install: nothing promoted so far) falls back to `fallback` (a
    pretrained export, a timm file, another alias); without one it is a UserError that says so.
    """
    init = (init or CHAMPION_INIT).replace("{dataset}", dataset_slug(dataset))
    try:
        loaded, identity = inputs.resolve_model(init, uri)
        return loaded, identity, f"init {init}" + (f" = {loaded}" if loaded != init else "")
    except UserError as missing:
        if not inputs.split_alias(init):
            raise
        if not fallback:
            raise UserError(
                f"init {init}: the alias does not exist yet in the MLflow registry at {uri} (on a fresh install "
                f"nothing has been promoted so far); fine-tune from a model that exists: vitpipe deploy "
                f"--finetune-init PATH (a pretrained export or timm file), or keep the alias and add "
                f"--finetune-fallback-init PATH, used until the alias exists") from missing
        loaded, identity, note = choose_init(fallback, None, uri, dataset=dataset)
        return loaded, identity, f"{init} does not exist yet; starting from the fallback {note}"


@flow(name="finetune", log_prints=True)
def finetune_flow(dataset: str | None = None, dataset_name: str | None = None, config: str | None = None,
                  overrides: dict[str, Any] | None = None, init: str | None = None,
                  init_fallback: str | None = None, out: str | None = None, output_root: str | None = None,
                  nproc: int = 1, launcher: Launcher = "local", tracking_uri: str | None = None,
                  experiment: str = tracking.DEFAULT_EXPERIMENT, parent_run_id: str | None = None,
                  launch_options: dict[str, Any] | None = None, register_as: str | None = None,
                  evaluate_overrides: dict[str, Any] | None = None, dataset_digest: str | None = None) -> dict:
    """Fine-tune from `init` on the shard set `dataset`; this is what the `vitpipe.dataset.ready` trigger runs.

    `init`: the parameter, else the config's `init`, else the champion `models:/vitpipe-vit@champion`;
    an alias that does not exist yet falls back to `init_fallback` (see `choose_init`). The run goes
    to `OUT/<key>`, OUT being `out`, the config's `out`, `<output_root>/finetune/<name>`, or
    `<dataset>-finetune` beside a local dataset. With `register_as` (`{dataset}` is replaced by the
    dataset's name), the result is evaluated on the val split, registered as `candidate` of that
    model and promoted to `champion` if it beats the champion on the same split (the champion is
    evaluated on it first when it was evaluated on another). `dataset_digest` (from the event):
    a run whose dataset changed since the event is skipped, the newer event's run trains it.
    """
    from vit.train.config import FinetuneConfig

    logger = get_run_logger()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if not dataset:
        dataset = _config_data(config, overrides)
    name = dataset_name or lineage.dataset_name(str(dataset))
    if dataset_digest and inputs.dataset_digest(dataset) != dataset_digest:
        logger.warning("dataset %s changed since this run was triggered (index sha256 %s, now %s); skipped: the run "
                       "triggered by the newer shard set trains it", dataset, dataset_digest[:12],
                       inputs.dataset_digest(dataset)[:12])
        return {"skipped": True, "superseded": True, "dataset": str(dataset)}
    storage.require_durable(uri=uri)
    loaded, identity, note = choose_init(init or _config_init(config, overrides), init_fallback, uri, dataset=name)
    logger.info("fine-tuning %s from %s", name, note)
    cfg = resolve_config(FinetuneConfig, config, overrides,
                         {"data.shards": dataset, "init": loaded, "tracking.uri": uri,
                          "tracking.experiment": experiment})
    root = resolve_output_root(output_root)
    if out or _is_set(cfg, "out") or root is not None:
        base = _default_out("finetune", cfg, out, root, name)
    elif "://" in str(dataset):  # nothing beside a bucket's dataset to write to
        base = str(storage.default_output_root() / "finetune" / name)
    else:
        base = str(Path(str(dataset)).resolve().with_name(f"{name}-finetune"))
    parent, tags = _trigger_parent(uri, parent_run_id, experiment)
    record = train_stage("finetune", cfg, base_out=base, nproc=nproc, launcher=launcher, uri=uri,
                         experiment=experiment, parent_run_id=parent, launch_options=launch_options,
                         init_identity=identity, tags=tags)
    if register_as:
        model_name = register_as.replace("{dataset}", dataset_slug(name))
        record["evaluation"] = evaluate_flow(model=record["export"], dataset=record["dataset"],
                                             out=str(Path(record["out"]) / "evaluation"), tracking_uri=uri,
                                             experiment=experiment, parent_run_id=parent,
                                             overrides={"data": record["data_config"], **(evaluate_overrides or {})},
                                             tags=tags)
        record["registered"] = register_and_promote(record, model_name, uri, experiment=experiment,
                                                    parent_run_id=parent)
    return record


def register_and_promote(record: dict, name: str, uri: str, *, experiment: str, parent_run_id: str | None) -> dict:
    """Register a fine-tune's export in `name` and promote it if better; a champion that was
    evaluated on another split (its dataset was re-sharded since) is evaluated on this one first."""
    registered = register_task(record["export"], name, record["mlflow_run_id"], record["evaluation"], uri)
    champion = registered.get("needs_champion_evaluation")
    if champion:
        get_run_logger().info("champion %s v%s was evaluated on another split; evaluating it on %s", name, champion,
                              record["evaluation"]["split_id"])
        again = evaluate_flow(model=f"models:/{name}/{champion}", dataset=record["dataset"],
                              out=str(Path(record["out"]) / f"champion-v{champion}"), tracking_uri=uri,
                              experiment=experiment, parent_run_id=parent_run_id,
                              overrides={"data": record["data_config"]})
        registered = promote_task(name, registered["version"], uri,
                                  champion_results={**again["metrics"], "split_id": again["split_id"]})
    return registered


def _config_data(config: str | None, overrides: dict[str, Any] | None) -> str:
    shards = (overrides or {}).get("data.shards")
    if not shards and config:
        from vitpipe.config import read_yaml

        shards = (read_yaml(config).get("data") or {}).get("shards")
    if not shards:
        raise UserError("finetune_flow: no dataset; pass dataset=SHARD_DIR (the trigger passes the new one)")
    return str(shards)


def _trigger_parent(uri: str, parent_run_id: str | None, experiment: str) -> tuple[str | None, dict[str, str]]:
    """Where a triggered run hangs in MLflow: under the run that made its dataset when that run is in
    the same experiment (MLflow nests within one), else only tagged with it."""
    if not parent_run_id:
        return None, {}
    tags = {"vitpipe.trigger.run_id": parent_run_id}
    return (parent_run_id if tracking.same_experiment(uri, parent_run_id, experiment) else None), tags


@task(name="evaluate", **RETRIES)
def evaluate_task(cfg_json: dict, run_id: str | None, uri: str) -> dict:
    """Call the evaluate stage in this process, logging into the flow-made run `run_id` (None: untracked)."""
    from vit.evaluate import EvaluateConfig, evaluate, scalar_metrics

    cfg = EvaluateConfig.model_validate(cfg_json)
    if run_id is None:
        cfg.tracking.enabled = False
    else:  # `evaluate` resumes MLFLOW_RUN_ID (and start_run removes it again once used)
        os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        with tracking.using(uri):  # a models:/ or runs:/ model is fetched from this store
            results = evaluate(cfg)
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)
    return {"metrics": scalar_metrics(results), "split_id": results.get("split_id"),
            "artifacts": results.get("artifacts", {})}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(model: str | None = None, dataset: str | None = None, split: str | None = None,
                  config: str | None = None, overrides: dict[str, Any] | None = None,
                  out: str | None = None, tracking_uri: str | None = None,
                  experiment: str = tracking.DEFAULT_EXPERIMENT, parent_run_id: str | None = None,
                  output_root: str | None = None, tags: dict[str, str] | None = None) -> dict:
    """Evaluate `model` (export folder, weights file, runs:/ or models:/ URI) on a split of `dataset`.

    Keyed like training (the model's identity, the dataset's digest, the config): the same
    evaluation again is skipped and its record returned; results go to `OUT/<key>`.
    """
    from vit.evaluate import EvaluateConfig

    logger = get_run_logger()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    cfg = resolve_config(EvaluateConfig, config, overrides,
                         {"model": model, "data.shards": dataset, "split": split,
                          "tracking.uri": uri, "tracking.experiment": experiment})
    shards = str(cfg.data.shards)
    name = lineage.dataset_name(shards)
    loaded, identity = inputs.resolve_model(cfg.model, uri)
    digest = inputs.dataset_digest(shards)
    key = inputs.evaluation_key(cfg, dataset_digest=digest, model_identity=identity)
    root = resolve_output_root(output_root)
    base = place(out, root) if out else (place(cfg.out, root) if _is_set(cfg, "out") or root is None
                                         else str(root / "evaluate" / name))
    folder = inputs.run_folder(base, key)
    storage.require_durable(uri=uri, paths={"evaluation output": folder})
    run_name = cfg.tracking.run_name or f"evaluate-{name}-{cfg.split or cfg.data.val_split}"
    cfg = cfg.model_copy(update={"model": loaded, "out": str(folder),
                                 "tracking": cfg.tracking.model_copy(update={"run_name": run_name})})
    tags = {DATASET_TAG: name, DIGEST_TAG: digest[:16], **(tags or {})}
    with inputs.exclusive(folder, "this evaluation"):
        record = _finished(folder, key)
        if record is not None:
            logger.info("evaluation of %s on %s: already done (key %s); skipped, its results reused", cfg.model,
                        name, key[:inputs.KEY_DIGITS])
            record["skipped"] = True
        else:
            inputs.write_key(folder, key, {"model": identity, "dataset": shards, "dataset_sha256": digest})
            with tracking.stage_run(uri, experiment, run_name, parent_run_id=parent_run_id or None,
                                    stage="evaluate", tags=tags) as run_id:
                tracking.log_dataset_input(uri, run_id, shards, name=name, context="evaluation")
                result = evaluate_task(set_options(cfg), run_id, uri)
            record = {"key": key, "mlflow_run_id": run_id, "metrics": result["metrics"],
                      "split_id": result["split_id"], "out": str(folder), "dataset": shards, "model": loaded,
                      "skipped": False}
            (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    url = tracking.run_url(MLFLOW_UI_URL, uri, record["mlflow_run_id"])
    publish_summary("evaluate", name, record["metrics"], url,
                    extra={"model": f"`{loaded}`", "split": f"`{record['split_id']}`"})
    print("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items()
                                   if k in ("top1", "top5", "loss", "macro_f1")))
    return {**record, "url": url}


@task(name="register", **RETRIES)
def register_task(export: str, name: str, run_id: str | None, evaluation: dict, uri: str) -> dict:
    """Register a fine-tuned export as `candidate` of `name` (in its training run); promote it if better.

    The version carries its evaluation as tags, so `promote_if_better` compares it with the
    champion on the same split; when the champion was evaluated on another split, the result
    says so (`needs_champion_evaluation`: its version). A training run registered before (a
    skipped re-run) is not registered again.
    """
    from mlflow import MlflowClient

    from vit.models.weights import load_pretrained
    from vit.tracking import registry

    logger = get_run_logger()
    if run_id is None or tracking.unavailable(uri):
        logger.warning("not registered in MLflow (no tracking); the model is kept at %s", export)
        return {"name": name, "version": None, "promoted": False, "reason": "not registered: no tracking"}
    existing = [v for v in _versions_of(MlflowClient(uri), name) if v.run_id == run_id]
    if existing:
        version = existing[0]
        reason = f"training run {run_id} is already registered as {name} v{version.version}; not registered again"
        logger.info(reason)
        return {"name": name, "version": str(version.version), "promoted": False, "reason": reason}
    model = load_pretrained(export)
    results = {**evaluation["metrics"], "split_id": evaluation["split_id"]}
    with tracking.activate(uri, run_id):
        version = registry.register_model(model, name, alias=registry.CANDIDATE, results=results)
        promotion = registry.promote_if_better(name, version.version)
        champion = registry.version_by_alias(name, registry.CHAMPION)
    logger.info("registered %s version %s as %s; %s", name, version.version, registry.CANDIDATE, promotion.reason)
    record = _registry_decision(name, str(version.version), promotion)
    if not promotion.promoted and champion is not None and str(champion.version) != str(version.version) \
            and champion.tags.get(registry.SPLIT_TAG) != evaluation["split_id"]:
        record["needs_champion_evaluation"] = str(champion.version)
    return record


@task(name="promote", **RETRIES)
def promote_task(name: str, version: str, uri: str, champion_results: dict) -> dict:
    """Promote `version` of `name` if it beats the champion's `champion_results` (on the same split)."""
    from vit.tracking import registry

    with tracking.using(uri):
        promotion = registry.promote_if_better(name, version, champion_results=champion_results)
    get_run_logger().info("%s v%s: %s", name, version, promotion.reason)
    return _registry_decision(name, version, promotion)


def _registry_decision(name: str, version: str, promotion) -> dict:
    create_markdown_artifact(f"### Model `{name}` v{version}\n\n{promotion.reason}\n",
                             key=_artifact_key("registry", name), description="Model registry decision")
    return {"name": name, "version": version, "promoted": promotion.promoted, "reason": promotion.reason}


def _versions_of(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []
