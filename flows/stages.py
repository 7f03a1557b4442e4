"""One Prefect flow per stage: `shard_flow`, `pretrain_flow`, `finetune_flow`, `evaluate_flow`.

Flows only orchestrate. Sharding and evaluation call the stage functions (`pipeline.shard.shard`,
`vit.evaluate.evaluate`) in a task; training runs the stage's distributed launcher as a subprocess
(or submits it to Slurm through `cluster.launch`), streams its output into the flow run's log and
fails the flow run with the launcher's error. Parameters are a config file plus dotted overrides,
exactly what `vitpipe STAGE --config FILE --key value` takes, so a deployment and a shell command
describe the same run.

Retries: only failures that a second try can fix (I/O and network errors, a tracking server that is
briefly down, a launcher killed by a signal) are retried, with exponential backoff; a bad config
fails at once. Training resumes from its latest complete checkpoint on a retry, so a retry costs
only the steps since that checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.tasks import exponential_backoff

from flows import tracking
from vitpipe.config import StageConfig, build_config, save_config
from vitpipe.errors import UserError

DATASET_READY = "vitpipe.dataset.ready"
"""Event emitted when `shard_flow` finishes a shard set; the fine-tune deployment triggers on it."""
DATASET_RESOURCE_PREFIX = "vitpipe.dataset."
PATH_LABEL = "vitpipe.dataset.path"
MLFLOW_UI_URL = os.environ.get("VITPIPE_MLFLOW_UI_URL", "http://127.0.0.1:5000")
CACHE_KEY_FILE = "flow-cache-key.json"


class LauncherError(RuntimeError):
    """A training launcher exited non-zero; carries its exit status and the tail of its output."""

    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        errors = [line for line in tail if re.search(r"(Error|Exception|error:)", line)]
        reason = errors[-1].strip() if errors else (tail[-1].strip() if tail else "no output")
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
# Exit statuses of a launcher killed from outside (preemption, OOM killer, a node going away).
_SIGNAL_EXITS = {128 + signal.SIGKILL, 128 + signal.SIGTERM, 128 + signal.SIGHUP,
                 -signal.SIGKILL, -signal.SIGTERM, -signal.SIGHUP}


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


# ---------------------------------------------------------------------------------------------
# Sharding


def source_listing_digest(src: str) -> str:
    """sha256 over the source's file listing (path, size, mtime); any added, removed or edited file changes it."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(src)
    if not fs.exists(root):
        raise UserError(f"shard source {src!r} does not exist; pass a folder of images or a manifest file")
    if fs.isdir(root):
        entries = fs.find(root, detail=True)
    else:
        entries = {root: fs.info(root)}
    h = hashlib.sha256()
    for path in sorted(entries):
        info = entries[path]
        rel = os.path.relpath(path, root) if path != root else os.path.basename(path)
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
        h.update(f"{rel}\0{info.get('size')}\0{mtime}\n".encode())
    return h.hexdigest()


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
def shard_task(cfg_json: dict, key: str) -> dict:
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
    stats = shard(cfg)
    (out / CACHE_KEY_FILE).write_text(json.dumps({"key": key}))
    return {"skipped": False, "stats": stats}


def shard_table(index: dict) -> list[dict]:
    """One row per shard of an index: split, name, samples, bytes, sha256 prefix (a Prefect table artifact)."""
    return [{"split": split, "shard": s["name"], "samples": s["num_samples"], "bytes": s["num_bytes"],
             "sha256": s.get("sha256", "")[:16]}
            for split, info in index["splits"].items() for s in info["shards"]]


def dataset_resource(name: str, out: Path, digest: str) -> dict[str, str]:
    """The Prefect event resource that names a shard set."""
    return {"prefect.resource.id": f"{DATASET_RESOURCE_PREFIX}{name}", "prefect.resource.name": name,
            PATH_LABEL: str(out), "vitpipe.dataset.digest": digest}


@flow(name="shard", log_prints=True)
def shard_flow(src: str | None = None, out: str | None = None, config: str | None = None,
               overrides: dict[str, Any] | None = None, name: str | None = None,
               emit_ready: bool = True, tracking_uri: str | None = None,
               experiment: str = tracking.DEFAULT_EXPERIMENT, parent_run_id: str | None = None) -> dict:
    """Shard a collection (skipped when already complete), publish its stats, emit `vitpipe.dataset.ready`.

    Returns {'name', 'path', 'digest', 'skipped', 'totals', 'num_classes', 'mlflow_run_id'}.
    """
    from pipeline.index import load_index
    from pipeline.shard import ShardConfig

    logger = get_run_logger()
    cfg = resolve_config(ShardConfig, config, overrides, {"src": src, "out": out})
    out_dir = Path(cfg.out).resolve()
    name = name or out_dir.name
    uri = tracking_uri or tracking.default_tracking_uri()

    with tracking.stage_run(uri, experiment, f"shard-{name}", parent_run_id=parent_run_id,
                            stage="shard") as run_id:
        result = shard_task(cfg.model_dump(mode="json"), shard_cache_key(cfg))
        index = load_index(str(out_dir))
        digest = tracking.index_digest(out_dir / "index.json")
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
        emit_event(DATASET_READY, resource=dataset_resource(name, out_dir, digest),
                   payload={"num_samples": totals["num_samples"], "classes": index["classes"]})
        logger.info("emitted %s for dataset %r (%s)", DATASET_READY, name, out_dir)
    print(f"shard: dataset {name!r}: {totals['num_samples']} samples in {totals['num_shards']} shards "
          f"({'cached' if result['skipped'] else 'written'}) at {out_dir}")
    return {"name": name, "path": str(out_dir), "digest": digest, "skipped": result["skipped"],
            "totals": totals, "num_classes": len(index["classes"]), "mlflow_run_id": run_id}


def _log_shard_run(uri: str, run_id: str, cfg: StageConfig, index: dict, digest: str, name: str,
                   out_dir: Path, *, skipped: bool) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    params = [Param(k, str(v)[:6000]) for k, v in cfg.model_dump(mode="json").items()]
    metrics = [Metric(f"{k}", float(v), now, 0) for k, v in index["totals"].items()
               if isinstance(v, (int, float))]
    metrics += [Metric(f"{split}_samples", float(info["num_samples"]), now, 0)
                for split, info in index["splits"].items()]
    tags = [RunTag("vitpipe.dataset", name), RunTag("vitpipe.cached", str(skipped).lower())]
    client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
    client.log_artifact(run_id, str(out_dir / "index.json"))
    tracking.log_dataset_input(uri, run_id, out_dir, name=name, context="output")


def _artifact_key(kind: str, name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{name}".lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Training stages: the launcher as a subprocess, its log streamed into the flow run's log

Launcher = Literal["local", "slurm"]


def launcher_argv(stage: str, config_path: Path, nproc: int) -> list[str]:
    """The command that runs one training stage on this machine, as a user would type it."""
    argv = [sys.executable, "-m", "vitpipe.cli", stage, "--config", str(config_path)]
    if nproc > 1:
        argv += ["--nproc", str(nproc)]
    return argv


def stream_process(argv: list[str], *, env: dict[str, str], log, tail_lines: int = 60) -> tuple[int, list[str]]:
    """Run `argv`, sending each output line (tqdm's carriage-return updates too) to `log`.

    Returns (exit status, last `tail_lines` lines). The child gets its own process group so that
    cancelling the flow run (or an exception here) takes down every rank it started.
    """
    tail: deque[str] = deque(maxlen=tail_lines)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    pending = b""
    try:
        while chunk := proc.stdout.read1(1 << 16):
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for raw in lines:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    tail.append(line)
                    log(line)
        if pending.strip():
            tail.append(pending.decode(errors="replace").rstrip())
            log(tail[-1])
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@task(name="launch-training", **RETRIES)
def launch_task(stage: str, config_path: str, nproc: int, launcher: Launcher,
                env: dict[str, str]) -> int:
    """Run a training stage to completion (locally or on Slurm); raise LauncherError on failure.

    A retry relaunches the same command; training resumes from its latest complete checkpoint.
    """
    logger = get_run_logger()
    if launcher == "slurm":
        return _submit_slurm(stage, config_path, nproc, env, logger)
    argv = launcher_argv(stage, Path(config_path), nproc)
    logger.info("launching: %s", " ".join(argv))
    rc, tail = stream_process(argv, env={**os.environ, **env}, log=logger.info)
    if rc != 0:
        raise LauncherError(stage, rc, tail)
    return rc


def _submit_slurm(stage: str, config_path: str, nproc: int, env: dict[str, str], logger) -> int:
    """The seam to the cluster code: `cluster.launch.run_slurm_stage` submits, waits and streams."""
    try:
        from cluster.launch import run_slurm_stage
    except ImportError as e:
        raise UserError("launcher='slurm' needs cluster.launch.run_slurm_stage (cluster/ is not "
                        f"installed or too old: {e}); use launcher='local'") from None
    return run_slurm_stage(stage, config_path, nproc=nproc, env=env, log=logger.info)


def _shards_dir(shards: Any) -> Path:
    """The directory of a config's `data.shards` (a shard directory, its index.json, or a list of those)."""
    first = shards[0] if isinstance(shards, (list, tuple)) else shards
    path = Path(str(first))
    return path.parent if path.name == "index.json" else path


def train_stage(stage: str, cfg: StageConfig, *, nproc: int, launcher: Launcher, uri: str,
                experiment: str, parent_run_id: str | None) -> dict:
    """Run a training stage under its own MLflow run (nested under `parent_run_id`); returns its record.

    The run is created here and handed to rank 0 through MLFLOW_RUN_ID, so the stage's
    "one run per job" lands in the pipeline's tree, and a retry keeps logging into the same run.
    """
    logger = get_run_logger()
    shards = _shards_dir(cfg.data.shards)
    out = Path(cfg.out).resolve()
    with tracking.stage_run(uri, experiment, f"{stage}-{shards.name}", parent_run_id=parent_run_id,
                            stage=stage) as run_id:
        digest = tracking.log_dataset_input(uri, run_id, shards, name=shards.name, context="training")
        config_path = save_config(cfg, out / f"{stage}-flow-config.yaml")
        env = {"MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment,
               # one compute thread per rank: the ranks already fill the cores
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        launch_task(stage, str(config_path), nproc, launcher, env)
    metrics = tracking.run_metrics(uri, run_id)
    url = tracking.run_url(MLFLOW_UI_URL, uri, run_id)
    publish_summary(stage, shards.name, metrics, url, extra={"output": f"`{out}`", "dataset sha256": digest[:16]})
    logger.info("%s finished: %s", stage, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())[:12]))
    return {"mlflow_run_id": run_id, "metrics": metrics, "out": str(out), "dataset": str(shards),
            "url": url}


def publish_summary(stage: str, dataset: str, metrics: dict[str, float], url: str,
                    extra: dict[str, str] | None = None) -> None:
    """Prefect artifacts of a stage: a markdown summary of its final metrics and a link to its MLflow run."""
    rows = "".join(f"| {k} | {v} |\n" for k, v in (extra or {}).items())
    rows += "".join(f"| {k} | {v:.4g} |\n" for k, v in sorted(metrics.items()))
    create_markdown_artifact(f"### {stage} on `{dataset}`\n\n| | |\n|---|---|\n{rows}\n[MLflow run]({url})\n",
                             key=_artifact_key(f"{stage}-summary", dataset),
                             description=f"{stage} results on {dataset}")
    create_link_artifact(url, link_text=f"MLflow run of {stage} on {dataset}",
                         key=_artifact_key(f"{stage}-mlflow", dataset))


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: str | None = None, overrides: dict[str, Any] | None = None,
                  dataset: str | None = None, nproc: int = 1, launcher: Launcher = "local",
                  tracking_uri: str | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT,
                  parent_run_id: str | None = None) -> dict:
    """Pretrain a ViT on a shard set with `nproc` DeepSpeed ranks; returns its MLflow run and metrics."""
    from vit.config import PretrainConfig

    uri = tracking_uri or tracking.default_tracking_uri()
    cfg = resolve_config(PretrainConfig, config, overrides,
                         {"data.shards": dataset, "tracking.uri": uri, "tracking.experiment": experiment})
    return train_stage("pretrain", cfg, nproc=nproc, launcher=launcher, uri=uri, experiment=experiment,
                       parent_run_id=parent_run_id)


BACKBONE_MODEL = "vitpipe-backbone"
CHAMPION_INIT = f"models:/{BACKBONE_MODEL}@champion"


@flow(name="finetune", log_prints=True)
def finetune_flow(dataset: str | None = None, dataset_name: str | None = None, config: str | None = None,
                  overrides: dict[str, Any] | None = None, init: str | None = CHAMPION_INIT,
                  out: str | None = None, nproc: int = 1, launcher: Launcher = "local",
                  tracking_uri: str | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT,
                  parent_run_id: str | None = None) -> dict:
    """Fine-tune from `init` (default: the champion backbone) on the shard set `dataset`.

    This is what the `vitpipe.dataset.ready` trigger runs: `dataset` is the new shard directory.
    Without `out`, results go next to the dataset, in `<dataset>-finetune`.
    """
    from vit.config import FinetuneConfig

    uri = tracking_uri or tracking.default_tracking_uri()
    if out is None and dataset is not None:
        out = str(Path(dataset).resolve().with_name(f"{dataset_name or Path(dataset).name}-finetune"))
    cfg = resolve_config(FinetuneConfig, config, overrides,
                         {"data.shards": dataset, "init": init, "out": out, "tracking.uri": uri,
                          "tracking.experiment": experiment})
    return train_stage("finetune", cfg, nproc=nproc, launcher=launcher, uri=uri, experiment=experiment,
                       parent_run_id=parent_run_id)


@task(name="evaluate", **RETRIES)
def evaluate_task(cfg_json: dict, run_id: str) -> dict:
    """Call the evaluate stage in this process, logging into the flow-made run `run_id`."""
    from vit.evaluate import EvaluateConfig, evaluate, scalar_metrics

    # `evaluate` resumes MLFLOW_RUN_ID (and start_run removes it again once used).
    os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        results = evaluate(EvaluateConfig.model_validate(cfg_json))
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)
    return {"metrics": scalar_metrics(results), "split_id": results.get("split_id"),
            "artifacts": results.get("artifacts", {})}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(model: str | None = None, dataset: str | None = None, split: str | None = None,
                  config: str | None = None, overrides: dict[str, Any] | None = None,
                  out: str | None = None, tracking_uri: str | None = None,
                  experiment: str = tracking.DEFAULT_EXPERIMENT, parent_run_id: str | None = None) -> dict:
    """Evaluate `model` (export folder, weights file, runs:/ or models:/ URI) on a split of `dataset`."""
    from vit.evaluate import EvaluateConfig

    uri = tracking_uri or tracking.default_tracking_uri()
    cfg = resolve_config(EvaluateConfig, config, overrides,
                         {"model": model, "data.shards": dataset, "split": split, "out": out,
                          "tracking.uri": uri, "tracking.experiment": experiment})
    shards = _shards_dir(cfg.data.shards)
    with tracking.stage_run(uri, experiment, f"evaluate-{shards.name}-{cfg.split}",
                            parent_run_id=parent_run_id, stage="evaluate") as run_id:
        tracking.log_dataset_input(uri, run_id, shards, name=shards.name, context="evaluation")
        result = evaluate_task(cfg.model_dump(mode="json"), run_id)
    url = tracking.run_url(MLFLOW_UI_URL, uri, run_id)
    publish_summary("evaluate", shards.name, result["metrics"], url,
                    extra={"model": f"`{cfg.model}`", "split": f"`{result['split_id']}`"})
    print("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()
                                   if k in ("top1", "top5", "loss", "macro_f1")))
    return {"mlflow_run_id": run_id, "metrics": result["metrics"], "split_id": result["split_id"],
            "out": str(Path(cfg.out).resolve()), "url": url}
