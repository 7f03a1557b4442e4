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
    if cfg.overwrite:
        (out / CACHE_KEY_FILE).unlink(missing_ok=True)  # the shard stage deletes only its own files
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


def launcher_argv(stage: str, config_path: Path, nproc: int, launcher: str = "local",
                  launch_options: dict[str, Any] | None = None) -> list[str]:
    """The command that runs one training stage, exactly as a user would type it.

    local: `vitpipe STAGE --config FILE --nproc N` (the stage relaunches itself under torchrun);
    slurm: `vitpipe launch --backend slurm ... STAGE --config FILE`, the cluster code's submission,
    which follows the job, prints its log and exits with its state (Ctrl-C cancels the job).
    """
    stage_argv = [stage, "--config", str(config_path)]
    if launcher == "local":
        return [sys.executable, "-m", "vitpipe.cli", *stage_argv, *(["--nproc", str(nproc)] if nproc > 1 else [])]
    options = {"nproc-per-node": nproc, **(launch_options or {})}
    flags = [a for k, v in options.items() for a in (f"--{k}", str(v))]
    return [sys.executable, "-m", "vitpipe.cli", "launch", "--backend", launcher, *flags, "--", *stage_argv]


def stream_process(argv: list[str], *, env: dict[str, str], log, tail_lines: int = 60,
                   progress_every: float = 10.0) -> tuple[int, list[str]]:
    """Run `argv`, sending its output to `log` line by line; returns (exit status, last lines).

    Progress-bar updates (lines ended by a carriage return) are forwarded at most once every
    `progress_every` seconds: a bar redrawn ten times a second would otherwise flood the flow
    run's log. The child gets its own process group so that cancelling the flow run (or an
    exception here) takes down every rank it started.
    """
    tail: deque[str] = deque(maxlen=tail_lines)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
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
        # Stop it gently first: torchrun stops its ranks on SIGINT, and `vitpipe launch --backend
        # slurm` cancels the job; then insist.
        for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, None)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass


@task(name="launch-training", **RETRIES)
def launch_task(stage: str, config_path: str, nproc: int, launcher: Launcher,
                env: dict[str, str], launch_options: dict[str, Any] | None = None) -> int:
    """Run a training stage to completion (locally or on Slurm); raise LauncherError on failure.

    A retry relaunches the same command; training resumes from its latest complete checkpoint.
    """
    logger = get_run_logger()
    argv = launcher_argv(stage, Path(config_path), nproc, launcher, launch_options)
    logger.info("launching: %s", " ".join(argv))
    rc, tail = stream_process(argv, env={**os.environ, **env}, log=logger.info)
    if rc != 0:
        raise LauncherError(stage, rc, tail)
    return rc


def _shards_dir(shards: Any) -> Path:
    """The directory of a config's `data.shards` (a shard directory, its index.json, or a list of those)."""
    first = shards[0] if isinstance(shards, (list, tuple)) else shards
    path = Path(str(first))
    return path.parent if path.name == "index.json" else path


def train_stage(stage: str, cfg: StageConfig, *, nproc: int, launcher: Launcher, uri: str,
                experiment: str, parent_run_id: str | None,
                launch_options: dict[str, Any] | None = None) -> dict:
    """Run a training stage as a child of `parent_run_id` in MLflow; returns its record.

    The flow creates the stage's run first and offers it to rank 0 through MLFLOW_RUN_ID. If the
    stage opens a run of its own instead (its "one run per job", or the run id stored in the
    checkpoint it resumes), that run is adopted: it gets the parent, the Prefect tags and the
    dataset input, and the flow's placeholder is deleted. A stage that dies before writing its
    results leaves the placeholder behind as FAILED, so the failure is visible in the tree.
    """
    logger = get_run_logger()
    shards = _shards_dir(cfg.data.shards)
    out = Path(cfg.out).resolve()
    run_name = cfg.tracking.run_name or f"{stage}-{shards.name}"
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_name": run_name})})
    with tracking.stage_run(uri, experiment, run_name, parent_run_id=parent_run_id, stage=stage) as run_id:
        digest = tracking.log_dataset_input(uri, run_id, shards, name=shards.name, context="training")
        config_path = save_config(cfg, out / f"{stage}-flow-config.yaml")
        env = {"MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment,
               # one compute thread per rank: the ranks already fill the cores
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        launch_task(stage, str(config_path), nproc, launcher, env, launch_options)
        results = _read_json(out / "results.json")
    stage_run_id = results.get("run_id") or run_id
    if stage_run_id != run_id:
        tracking.adopt_run(uri, stage_run_id, placeholder=run_id, parent_run_id=parent_run_id, stage=stage)
        tracking.log_dataset_input(uri, stage_run_id, shards, name=shards.name, context="training")
    metrics = {**tracking.run_metrics(uri, stage_run_id),
               **{k: float(v) for k, v in results.items() if k.startswith("val/") and isinstance(v, (int, float))}}
    url = tracking.run_url(MLFLOW_UI_URL, uri, stage_run_id)
    publish_summary(stage, shards.name, metrics, url, extra={"output": f"`{out}`", "dataset sha256": digest[:16]})
    logger.info("%s finished: %s", stage, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                                                   if k.startswith(("val/", "train/loss"))))
    return {"mlflow_run_id": stage_run_id, "metrics": metrics, "out": str(out), "dataset": str(shards),
            "export": results.get("export", str(out / "export")), "url": url,
            # how the stage read its images: evaluating its model must read them the same way
            "data_config": cfg.data.model_dump(mode="json")}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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
                  parent_run_id: str | None = None, launch_options: dict[str, Any] | None = None) -> dict:
    """Pretrain a ViT on a shard set with `nproc` DeepSpeed ranks; returns its MLflow run and metrics."""
    from vit.train.config import PretrainConfig

    uri = tracking_uri or tracking.default_tracking_uri()
    cfg = resolve_config(PretrainConfig, config, overrides,
                         {"data.shards": dataset, "tracking.uri": uri, "tracking.experiment": experiment})
    return train_stage("pretrain", cfg, nproc=nproc, launcher=launcher, uri=uri, experiment=experiment,
                       parent_run_id=parent_run_id, launch_options=launch_options)


REGISTERED_MODEL = "vitpipe-vit"
"""Registered model name of the pipeline's fine-tuned ViTs; `champion` is the best so far."""
CHAMPION_INIT = f"models:/{REGISTERED_MODEL}@champion"


@flow(name="finetune", log_prints=True)
def finetune_flow(dataset: str | None = None, dataset_name: str | None = None, config: str | None = None,
                  overrides: dict[str, Any] | None = None, init: str | None = CHAMPION_INIT,
                  out: str | None = None, nproc: int = 1, launcher: Launcher = "local",
                  tracking_uri: str | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT,
                  parent_run_id: str | None = None, launch_options: dict[str, Any] | None = None,
                  register_as: str | None = None, evaluate_overrides: dict[str, Any] | None = None) -> dict:
    """Fine-tune from `init` (default: the champion's backbone, with a new head) on the shard set `dataset`.

    This is what the `vitpipe.dataset.ready` trigger runs: `dataset` is the new shard directory.
    Without `out`, results go next to the dataset, in `<dataset>-finetune`. With `register_as`,
    the result is then evaluated on the val split, registered as `candidate` of that model and
    promoted to `champion` if it beats the champion on the same split.
    """
    from vit.train.config import FinetuneConfig

    uri = tracking_uri or tracking.default_tracking_uri()
    if out is None and dataset is not None:
        out = str(Path(dataset).resolve().with_name(f"{dataset_name or Path(dataset).name}-finetune"))
    cfg = resolve_config(FinetuneConfig, config, overrides,
                         {"data.shards": dataset, "init": init, "out": out, "tracking.uri": uri,
                          "tracking.experiment": experiment})
    record = train_stage("finetune", cfg, nproc=nproc, launcher=launcher, uri=uri, experiment=experiment,
                         parent_run_id=parent_run_id, launch_options=launch_options)
    if register_as:
        record["evaluation"] = evaluate_flow(model=record["export"], dataset=record["dataset"],
                                             out=str(Path(record["out"]) / "evaluation"), tracking_uri=uri,
                                             experiment=experiment, parent_run_id=parent_run_id,
                                             overrides={"data": record["data_config"], **(evaluate_overrides or {})})
        record["registered"] = register_task(record["export"], register_as, record["mlflow_run_id"],
                                             record["evaluation"], uri)
    return record


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
    run_name = cfg.tracking.run_name or f"evaluate-{shards.name}-{cfg.split or cfg.data.val_split}"
    cfg.tracking.run_name = run_name
    with tracking.stage_run(uri, experiment, run_name, parent_run_id=parent_run_id, stage="evaluate") as run_id:
        tracking.log_dataset_input(uri, run_id, shards, name=shards.name, context="evaluation")
        result = evaluate_task(cfg.model_dump(mode="json"), run_id)
    url = tracking.run_url(MLFLOW_UI_URL, uri, run_id)
    publish_summary("evaluate", shards.name, result["metrics"], url,
                    extra={"model": f"`{cfg.model}`", "split": f"`{result['split_id']}`"})
    print("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()
                                   if k in ("top1", "top5", "loss", "macro_f1")))
    return {"mlflow_run_id": run_id, "metrics": result["metrics"], "split_id": result["split_id"],
            "out": str(Path(cfg.out).resolve()), "url": url, "dataset": str(shards)}


@task(name="register", **RETRIES)
def register_task(export: str, name: str, run_id: str, evaluation: dict, uri: str) -> dict:
    """Register a fine-tuned export as `candidate` of `name` (in its training run); promote it if better.

    The version carries its evaluation as tags, so `promote_if_better` compares it with the
    champion on the same split only.
    """
    from vit.tracking import registry
    from vit.models.weights import load_pretrained

    logger = get_run_logger()
    model = load_pretrained(export)
    results = {**evaluation["metrics"], "split_id": evaluation["split_id"]}
    with tracking.activate(uri, run_id):
        version = registry.register_model(model, name, alias=registry.CANDIDATE, results=results)
        promotion = registry.promote_if_better(name, version.version)
    logger.info("registered %s version %s as %s; %s", name, version.version, registry.CANDIDATE, promotion.reason)
    create_markdown_artifact(f"### Model `{name}` v{version.version}\n\n{promotion.reason}\n",
                             key=_artifact_key("registry", name), description="Model registry decision")
    return {"name": name, "version": str(version.version), "promoted": promotion.promoted,
            "reason": promotion.reason}
