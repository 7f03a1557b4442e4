"""Evaluation: measure any model on any sharded split, with results a person can read.

    vitpipe evaluate --model runs/digits/export --data.shards shards/digits --split val
    vitpipe evaluate --model models:/digits-vit@candidate --data.shards shards/digits
    vitpipe evaluate --model runs/pretrain/export --data.shards shards/digits --knn.enabled  # backbone only
    vitpipe evaluate eval.yaml --nproc 4      # 4 ranks (torchrun), each sample still counted once

From a training loop, call `evaluate_model(model, loader, class_names=..., device=...)` on every
rank, then `log_evaluation(results)` on rank 0 to log into the stage's own MLflow run. Results:
top-1, top-5 (>= 5 classes), loss, per-class precision/recall/F1, the confusion matrix (PNG and
JSON) and `results.json`; every sample of the split counts once over all ranks (see
`vit.evaluation.metrics.ClassificationMetrics`). `vitpipe evaluate` on its own opens one MLflow run for
itself (or resumes `MLFLOW_RUN_ID` when a flow created it), on rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from pydantic import Field, PositiveInt

from pipeline.loader import DataConfig
from vit.train.config import TrackingSection
from vit.tracking.tracker import is_mlflow_uri
from vitpipe.config import StageConfig, add_config_arguments, config_from_args, save_config
from vitpipe.errors import UserError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
CONFUSION_JSON = "confusion_matrix.json"
CONFUSION_PNG = "confusion_matrix.png"


# ---------------------------------------------------------------------------------------------
# Config


class KnnConfig(StageConfig):
    enabled: bool = Field(False, description="also measure k-NN accuracy on frozen features (works for a "
                                             "backbone without a classifier head)")
    memory_split: str | None = Field(None, description="split whose features are the k-NN memory (empty = "
                                                           "data.train_split); the evaluated split gives the queries")
    k: list[PositiveInt] = Field([10, 20], min_length=1, description="neighbour counts to report (DINO uses 20)")
    temperature: float = Field(0.07, gt=0, description="softmax temperature of the similarity-weighted vote")


class EvaluateConfig(StageConfig):
    """Options of `vitpipe evaluate`; precedence: command line > --config file > these defaults."""

    model: str = Field(..., description="what to evaluate: an export folder (model.safetensors + config.json), "
                                        "a weights file, or an MLflow URI (runs:/ID/model, models:/NAME@ALIAS). "
                                        "Unless given as data.* options, the image size and channels come from "
                                        "the model and, for an export, mean/std/eval crop from its training")
    model_preset: str = Field("", description="architecture of a bare weights file (a timm .safetensors/.pth "
                                              "without config.json): one of our presets (s/16, b/16) or a timm "
                                              "name (vit_small_patch16_224, deit_tiny_patch16_224); set for an "
                                              "export or hub folder, it must match the model's own")
    data: DataConfig = Field(default_factory=DataConfig, description="the shard set and how to read it")
    split: str | None = Field(None, description="split to evaluate on; empty = data.val_split")
    out: str = Field("runs/evaluate", description="folder for results.json, config.yaml and the confusion matrix")
    check_classes: bool = Field(True, description="refuse a model whose export records other class names (or "
                                                  "another order) than the data's; turn off when only the "
                                                  "names differ")
    knn: KnnConfig = Field(default_factory=KnnConfig)
    tracking: TrackingSection = Field(default_factory=TrackingSection)


# ---------------------------------------------------------------------------------------------
# Evaluation of a model on a loader (the part a training loop calls)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def split_fingerprint(shards: str, split: str) -> str:
    """`SPLIT:HASH` of a split's shard names and checksums: equal iff two evaluations saw the same data."""
    import fsspec

    url = shards if shards.endswith(".json") else shards.rstrip("/") + "/index.json"
    with fsspec.open(url, "rt") as f:
        index = json.load(f)
    entry = index.get("splits", {}).get(split)
    if entry is None:
        raise UserError(f"split {split!r} is not in {url}; it has {sorted(index.get('splits', {}))}")
    shards_list = [(s["name"], s.get("sha256"), s["num_samples"]) for s in entry["shards"]]
    digest = hashlib.sha256(json.dumps(shards_list, sort_keys=True).encode()).hexdigest()
    return f"{split}:{digest[:16]}"


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader: Iterable, *, class_names: Sequence[str],
                   device: torch.device | str = "cpu", world_size: int = 1, out_dir: str | Path | None = None,
                   split: str = "val", split_id: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Top-1/5, loss, per-class metrics and confusion matrix of `model` on `loader`; call on every rank.

    `loader` yields (images, targets, keys...) with targets -1 for unlabelled samples, each sample on
    exactly one rank. Counts are summed over ranks when `world_size > 1`. With `out_dir`, rank 0
    writes results.json and the confusion matrix (JSON + PNG) there; their paths are in
    `results["artifacts"]`. The model is left in the train/eval mode it came in.
    """
    from tqdm.auto import tqdm

    from vit.evaluation.metrics import ClassificationMetrics

    num_classes = len(class_names)
    if num_classes == 0:
        raise UserError("the split has no class names (an unlabelled shard set); evaluation needs labels. "
                        "Shard a labelled collection (one folder per class), or use k-NN on a labelled one")
    device = torch.device(device)
    metrics = ClassificationMetrics(num_classes)
    dtype = next(model.parameters()).dtype
    # A bf16/fp16 DeepSpeed engine expects inputs in its dtype; autocast keeps the rest consistent.
    autocast = torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16) else nullcontext()
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total = getattr(loader, "num_samples", None)
    bar = tqdm(total=total, desc=f"evaluate {split}", unit="img", disable=not progress or _rank() != 0,
               leave=False)
    try:
        for images, targets, *_ in loader:
            # A rank's tail batches may be empty so that all ranks step together. The forward still runs:
            # under ZeRO-3 every forward gathers weights collectively, so skipping one would hang the others.
            images = images.to(device, dtype=dtype if images.is_floating_point() else None, non_blocking=True)
            with autocast:
                logits = model(images)
            if targets.numel() == 0:
                continue
            metrics.update(logits, targets)
            bar.update(int(targets.shape[0]) * max(world_size, 1))
    finally:
        bar.close()
        model.train(was_training)
    if world_size > 1:
        metrics.reduce()
    results = metrics.compute(list(class_names))
    results.update(split=split, seconds=round(time.perf_counter() - start, 3))
    if split_id:
        results["split_id"] = split_id
    seen = results["num_samples"] + results["num_unlabelled"]
    if total is not None and seen != total:
        # Metrics over a different sample count than the index says are wrong, not just noisy:
        # a loader that pads or drops across ranks. Say it loudly; the numbers stay in results.
        log.warning("evaluated %d samples of split %r but its index lists %d; each sample must be seen "
                    "exactly once over all ranks", seen, split, total)
        results["num_samples_expected"] = total
    if out_dir is not None and _rank() == 0:
        results["artifacts"] = write_evaluation(results, out_dir)
    return results


def write_evaluation(results: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write results.json and the confusion matrix as JSON and PNG into `out_dir`; returns their paths."""
    from vit.evaluation.plots import plot_confusion_matrix

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = {"results": str(out / RESULTS_FILE)}
    cm = results.get("confusion_matrix")
    if cm is not None:  # absent for a backbone measured by k-NN only
        cm_json = out / CONFUSION_JSON
        cm_json.write_text(json.dumps(cm, indent=1))
        title = f"Confusion matrix, {results['split']}" if results.get("split") else "Confusion matrix"
        cm_png = plot_confusion_matrix(cm["counts"], cm["classes"], out / CONFUSION_PNG, title=title)
        artifacts.update(confusion_matrix_json=str(cm_json), confusion_matrix_png=str(cm_png))
    body = {k: v for k, v in results.items() if k not in ("artifacts", "confusion_matrix")}
    body["artifacts"] = artifacts
    (out / RESULTS_FILE).write_text(json.dumps(_json_safe(body), indent=1))
    return artifacts


def _json_safe(value: Any) -> Any:
    """NaN/inf become null: JSON has no NaN, and readers (jq, browsers) reject it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def scalar_metrics(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite scalar numbers of `results` (top1, loss, macro_f1, knn...), keys prefixed."""
    return {f"{prefix}{k}": float(v) for k, v in results.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_evaluation(results: dict[str, Any], run_id: str | None = None, *, prefix: str | None = None,
                   step: int | None = None) -> None:
    """Log metrics, results.json and the confusion matrix into the stage's MLflow run (rank 0 only).

    Logs into `run_id` when given, else into the active run. Metric names are `SPLIT/NAME`
    (e.g. `val/top1`) unless `prefix` says otherwise; files go under `evaluation/SPLIT/`.
    """
    if _rank() != 0:
        return
    import mlflow
    from mlflow import MlflowClient

    split = results.get("split", "eval")
    prefix = f"{split}/" if prefix is None else prefix
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_evaluation: no active MLflow run; call it inside mlflow.start_run() or pass run_id")
        run_id = active.info.run_id
    client = MlflowClient()
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step or 0)
                                      for k, v in scalar_metrics(results, prefix).items()])
    for path in (results.get("artifacts") or {}).values():
        client.log_artifact(run_id, path, artifact_path=f"evaluation/{split}")


# ---------------------------------------------------------------------------------------------
# The `vitpipe evaluate` stage


def load_model(source: str, *, map_location: str | torch.device = "cpu", preset: str = "",
               image_size: int | None = None) -> torch.nn.Module:
    """A model from an export folder / weights file (`vit.models.weights`) or an MLflow URI, in eval mode.

    `preset` names the architecture of a bare weights file (one of our presets or a timm name);
    for a model that carries its own config it must agree with it. `image_size`: for a bare file,
    the resolution to load at (its position embedding resampled once, from the file's own grid,
    rather than to the preset's size and then again); a model with a config loads at its own."""
    if is_mlflow_uri(source):
        if preset:
            raise UserError(f"--model-preset {preset}: an MLflow model carries its architecture; drop the option")
        from mlflow.exceptions import MlflowException

        from vit.tracking.registry import load_logged_model

        try:
            model = load_logged_model(source, map_location=map_location)
        except MlflowException as e:
            raise UserError(f"--model {source}: MLflow cannot load it ({e.message}); check the run id, "
                            f"registered name and alias, and --tracking.uri") from None
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"--model {source}: holds a {type(model).__name__}, not a torch module; "
                            f"log it with vit.tracking.registry.register_model")
        return model.eval()
    _check_model_path(source)
    _check_preset(source, preset)
    from vit.models.weights import architecture_differences, has_config, load_pretrained, named_config

    if has_config(source):
        model = load_pretrained(source)
        if preset:  # named anyway: the model must be that architecture
            diff = architecture_differences(model.cfg, named_config(preset))
            if diff:
                raise UserError(f"--model {source} is another architecture than --model-preset {preset} "
                                f"({'; '.join(diff)}); drop --model-preset, the model carries its own")
        return model.eval()
    return load_pretrained(source, config=preset, image_size=image_size).eval()


def _check_preset(source: str, preset: str) -> None:
    """A bare weights file needs its architecture named, and a name must be one vitpipe builds."""
    from vit.models.weights import has_config, named_config

    if preset:
        named_config(preset)  # an unknown or unsupported name fails here, before the data is opened
    elif not is_mlflow_uri(source) and not has_config(source):
        raise UserError(f"--model {source} is a bare weights file (no config.json, no vitpipe config in it), so "
                        f"its architecture is unknown; name it with --model-preset (e.g. s/16, b/16, "
                        f"vit_small_patch16_224, deit_tiny_patch16_224)")


def _model_num_classes(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "cfg", None)
    n = getattr(cfg, "num_classes", None) if cfg is not None else None
    if n is None and isinstance(cfg, dict):
        n = cfg.get("num_classes")
    return getattr(model, "num_classes", None) if n is None else n


def _check_model_path(source: str) -> None:
    if not is_mlflow_uri(source) and not Path(source).exists():
        raise UserError(f"--model {source}: no such file or folder; pass an export folder "
                        f"(model.safetensors + config), a weights file, or runs:/... / models:/NAME@ALIAS")


def _check_split(cfg: EvaluateConfig) -> str:
    """The split's fingerprint; a missing shard set or split fails here, before any model loads."""
    if not cfg.data.shards:
        raise UserError("data.shards is empty; pass --data.shards DIR (a folder written by 'vitpipe shard')")
    return split_fingerprint(cfg.data.shards, cfg.split or cfg.data.val_split)


def preflight(cfg: EvaluateConfig) -> None:
    """What a launch of N processes checks once first (else every rank prints the same error)."""
    _check_split(cfg)
    _check_model_path(cfg.model)
    _check_preset(cfg.model, cfg.model_preset)


def check_class_names(model_names: list[str] | None, data_names: list[str], *, model: str, data: str) -> None:
    """Refuse to score a head trained on other classes (or the same ones in another order): its
    output k would be compared with the data's class k. Unknown model names pass (timm files)."""
    if model_names is None or list(model_names) == list(data_names):
        return
    diff = [f"{i}: model {m!r} vs data {d!r}" for i, (m, d) in enumerate(zip(model_names, data_names)) if m != d]
    raise UserError(f"--model {model} was trained on other classes than {data} has ({'; '.join(diff[:3])}"
                    f"{'; ...' if len(diff) > 3 else ''}); evaluate it on data with its classes, fine-tune it on "
                    f"this dataset first (vitpipe finetune), or pass --no-check-classes if only the names differ")


def fit_data_to_model(cfg: EvaluateConfig, model: torch.nn.Module, say=print) -> EvaluateConfig:
    """`cfg` with the data options the user left unset taken from the model (as timm resolves a data
    config from a model): image size and channels from its architecture; mean, std and eval crop
    from the training config beside an export. An image size given explicitly evaluates
    there (position embedding resampled, said once); a different channel count is an error."""
    from vit.models.weights import data_for_model

    data = data_for_model(cfg.data, model, cfg.model, name=f"--model {cfg.model}")
    arch = getattr(model, "cfg", None)
    size, chans = getattr(arch, "image_size", None), getattr(arch, "in_chans", None)
    if isinstance(chans, int) and data.channels != chans:
        raise UserError(f"--model {cfg.model} takes {chans}-channel images but --data.channels is {data.channels}; "
                        f"drop the option (it is taken from the model)")
    if isinstance(size, int) and data.image_size != size:
        say(f"evaluate: --model {cfg.model} was trained at {size}x{size}; evaluating at "
            f"{data.image_size}x{data.image_size} as asked (position embedding resampled)")
        model.set_image_size(data.image_size)
    return cfg.model_copy(update={"data": data})


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the evaluate stage on every rank: load, evaluate the split (and k-NN), write and log results."""
    with contextlib.ExitStack() as loaders:  # their workers stop when the stage ends
        return _evaluate(cfg, loaders)


def _evaluate(cfg: EvaluateConfig, loaders: contextlib.ExitStack) -> dict[str, Any]:
    from pipeline.loader import make_eval_loader
    from vit.train import distributed as dist

    split = cfg.split or cfg.data.val_split
    memory_split = cfg.knn.memory_split or cfg.data.train_split
    # Checks that need no model run first: a wrong split fails in seconds, not after loading weights.
    split_id = _check_split(cfg)
    if cfg.knn.enabled:
        split_fingerprint(cfg.data.shards, memory_split)
    world = dist.World.from_env()
    device = dist.device_for(world)
    if world.is_distributed:
        dist.init_process_group(world, device)
    # An image size given for the data is the one to load at: resampling the file's grid once,
    # not to the config's and then again to the data's.
    asked = cfg.data.image_size if "image_size" in cfg.data.model_fields_set else None
    model = load_model(cfg.model, preset=cfg.model_preset, image_size=asked)
    cfg = fit_data_to_model(cfg, model, say=print if world.is_main else (lambda _: None))
    model = model.to(device)
    loader = loaders.enter_context(make_eval_loader(cfg.data, split, rank=world.rank, world_size=world.world_size))
    class_names = list(loader.class_names)
    if not class_names:
        raise UserError(f"data.shards={cfg.data.shards!r} is unlabelled (no classes in index.json); evaluation "
                        f"needs labels: shard a folder tree with one sub-folder per class. A self-supervised "
                        f"backbone is measured with --knn.enabled on a labelled shard set (k-NN needs labelled "
                        f"images too)")
    if loader.num_samples == 0:
        raise UserError(f"split {split!r} of {cfg.data.shards!r} has no samples (every input of it failed when "
                        f"sharding? see failures.jsonl there); evaluate on a split with images")
    model_classes = _model_num_classes(model)
    if model_classes == 0 and not cfg.knn.enabled:
        raise UserError(f"--model {cfg.model} has no classifier head (a pretraining backbone); measure its "
                        f"features with --knn.enabled, or fine-tune it first (vitpipe finetune)")
    if model_classes not in (0, None) and model_classes != len(class_names):
        if not cfg.knn.enabled:
            raise UserError(f"--model {cfg.model} predicts {model_classes} classes but {cfg.data.shards} has "
                            f"{len(class_names)}; fine-tune it on this dataset first (vitpipe finetune), or "
                            f"measure its features only with --knn.enabled")
        if world.is_main:
            print(f"evaluate: --model {cfg.model} predicts {model_classes} classes, {cfg.data.shards} has "
                  f"{len(class_names)}: measuring k-NN on its features only")
        model_classes = 0  # its head answers another question
    if model_classes and cfg.check_classes:
        check_class_names(getattr(model, "class_names", None), class_names, model=cfg.model, data=cfg.data.shards)
    out = Path(cfg.out)
    if world.is_main:
        save_config(cfg, out / "config.yaml")
    results: dict[str, Any] = {"split": split, "split_id": split_id}
    if model_classes != 0:
        results = evaluate_model(model, loader, class_names=class_names, device=device,
                                 world_size=world.world_size, split=split, split_id=split_id)
    if cfg.knn.enabled:
        from vit.evaluation.knn import knn_evaluate

        memory = loaders.enter_context(make_eval_loader(cfg.data, memory_split, rank=world.rank,
                                                        world_size=world.world_size))
        results.update(knn_evaluate(model, memory, loader, num_classes=len(class_names), ks=cfg.knn.k,
                                    temperature=cfg.knn.temperature, device=device, progress=world.is_main))
        results["knn_memory_split"] = memory_split
    results["model"] = cfg.model
    if world.is_main:
        results["artifacts"] = write_evaluation(results, out)
        if cfg.tracking.enabled:
            _log_stage_run(cfg, results)
    dist.barrier()
    return results


def _log_stage_run(cfg: EvaluateConfig, results: dict[str, Any]) -> None:
    """One MLflow run for a stand-alone evaluation (resumes MLFLOW_RUN_ID when a flow made it)."""
    import mlflow

    from vit.tracking.tracker import experiment_id, resolve_uri

    # The process-wide URI is borrowed for the run and given back: a caller that runs stages one
    # after another in one process (flows, notebooks) keeps its own tracking store and experiment.
    uri = resolve_uri(cfg.tracking)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        exp_id = None if os.environ.get("MLFLOW_RUN_ID") else experiment_id(uri, cfg.tracking.experiment)
        with mlflow.start_run(experiment_id=exp_id,
                              run_name=cfg.tracking.run_name or f"evaluate-{results['split']}") as run:
            mlflow.set_tags({"vitpipe.stage": "evaluate", "vitpipe.eval.split": results["split_id"]})
            mlflow.log_params({"model": cfg.model, "data.shards": cfg.data.shards, "split": results["split"]})
            mlflow.log_artifact(str(Path(cfg.out) / "config.yaml"))
            log_evaluation(results, run.info.run_id)
            results["mlflow_run_id"] = run.info.run_id
    finally:
        mlflow.set_tracking_uri(previous)


def summary_line(results: dict[str, Any]) -> str:
    """One line for the terminal: the numbers a person looks at first."""
    parts = [f"split {results.get('split')}"]
    if "num_samples" in results:
        parts.append(f"{results['num_samples']} samples")
    for key in ("top1", "top5", "loss", "macro_f1"):
        if key in results and isinstance(results[key], float) and math.isfinite(results[key]):
            parts.append(f"{key} {results[key]:.4f}")
    parts += [f"{k} {v:.4f}" for k, v in results.items() if k.startswith("knn_top1_k")]
    if "artifacts" in results:
        parts.append(f"-> {Path(results['artifacts']['results']).parent}")
    return "evaluate: " + ", ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vit.train.config import FROM_MODEL
    from vit.train.launch import add_launch_arguments

    parser.add_argument("config_file", nargs="?", default=None, metavar="CONFIG",
                        help="YAML file with any of the options below (same as --config)")
    # The data options only training reads (batches, shuffling, augmentation) stay out of --help.
    add_config_arguments(parser, EvaluateConfig, unused=("data.augment.", "data.batch_size", "data.shuffle_buffer",
                                                         "data.epoch_fill"), from_model=FROM_MODEL)
    add_launch_arguments(parser)


def cli_config(args: argparse.Namespace) -> EvaluateConfig:
    if args.config_file:
        if args.config and args.config != args.config_file:
            raise UserError(f"two config files given ({args.config_file!r} and --config {args.config!r}); pass one")
        args.config = args.config_file
    return config_from_args(EvaluateConfig, args)  # a bad option fails here, before any process starts


def run_cli(args: argparse.Namespace) -> int:
    from vit.train.launch import maybe_relaunch

    cfg = cli_config(args)
    # --nproc N: every sample still counts once, split over N ranks
    maybe_relaunch(args, preflight=lambda: preflight(cfg))
    from vit.train.distributed import destroy_process_group

    try:
        results = evaluate(cfg)
        if _rank() == 0:
            print(summary_line(results))
    finally:
        destroy_process_group()
    return 0
