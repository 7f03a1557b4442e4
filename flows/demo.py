"""`vitpipe demo`: the whole pipeline on packaged data, on a laptop CPU, in a few minutes.

    vitpipe demo                       # -> demo-output/, then prints the `mlflow ui` command
    vitpipe demo --size small          # a faster, smaller run (what the tests use)

What it does, with nothing to download or configure:
1. Builds two real image collections from data shipped inside installed packages: a pretraining
   collection of generated shapes (10 classes, the volume) plus scikit-image's faces / non-faces,
   and scikit-learn's handwritten digits for fine-tuning (`pipeline.packaged_data`).
2. Runs `pipeline_flow` under Prefect's temporary local server: shards both collections,
   pretrains a small ViT with 2 DeepSpeed ranks on the CPU, fine-tunes it on the digits,
   evaluates it on the held-out digits, and registers it in MLflow (`candidate`, `champion`).
3. Self-supervised: the digits' images with their labels dropped are sharded and pretrained on
   by a masked autoencoder (`--train.objective mae`, `pretrain_flow`), whose frozen encoder is
   then measured by k-NN on the labelled digits (`evaluate_flow --knn.enabled`).
4. Prints a summary table and the command that opens the MLflow UI on the results, which live
   in a SQLite store (`demo-output/mlflow.db`) and an artifact folder next to it.

Re-running it reuses the collections and the complete shard sets, and skips the trainings and the
evaluation, whose inputs did not change (so a second run is quick; delete demo-output/ to start over).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitpipe.errors import UserError

EXPERIMENT = "vitpipe-demo"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo's data and training are; `full` is the advertised run, `small` a smoke test.

    Training starts from the recipes in vit/recipes (the documented way to train on these
    collections); the demo overrides only what it must to fit its time budget.
    """

    shapes_per_class: int          # generated pretraining images per shape class
    digits_limit: int | None       # digits used for fine-tuning (None: all 1797)
    image_size: int                # side of the written images
    pretrain_recipe: str = "shapes_pretrain.yaml"
    finetune_recipe: str = "digits_finetune.yaml"
    mae_recipe: str = "digits_mae_pretrain.yaml"
    pretrain: dict[str, Any] = field(default_factory=dict)   # dotted overrides of the pretrain recipe
    finetune: dict[str, Any] = field(default_factory=dict)   # dotted overrides of the finetune recipe
    mae: dict[str, Any] = field(default_factory=dict)        # dotted overrides of the MAE recipe


SIZES: dict[str, DemoSize] = {
    # The recipes as they are; measured on 2 cores in docs/demo.md.
    "full": DemoSize(shapes_per_class=600, digits_limit=None, image_size=32,
                     mae={"train.steps": 300, "train.eval_every": 300, "schedule.warmup_steps": 30}),
    "small": DemoSize(shapes_per_class=24, digits_limit=300, image_size=16,
                      pretrain={"train.steps": 6, "train.log_every": 2, "schedule.warmup_steps": 1,
                                "data.image_size": 16, "data.batch_size": 32},
                      finetune={"train.steps": 6, "train.log_every": 2, "schedule.warmup_steps": 1,
                                "data.batch_size": 32},
                      mae={"train.steps": 6, "train.eval_every": 6, "train.log_every": 2,
                           "schedule.warmup_steps": 1, "data.batch_size": 32}),
}

# Settings of this demo run whatever the recipe says: the demo's own tracking store and no
# checkpoints in between (a run this short restarts faster than it resumes).
DEMO_OVERRIDES = {"checkpoint.every_steps": 0, "checkpoint.keep_last": 1, "tracking.system_metrics": False}


def training_overrides(size: DemoSize, stage: str) -> dict[str, Any]:
    return {**DEMO_OVERRIDES, **{"pretrain": size.pretrain, "finetune": size.finetune, "mae": size.mae}[stage]}


def recipe(name: str) -> str:
    """Path of a training recipe shipped in vit/recipes (package data, so found where vit is installed)."""
    import importlib.util

    recipes = Path(importlib.util.find_spec("vit").origin).parent / "recipes"
    path = recipes / name
    if not path.is_file():
        raise UserError(f"recipe {name!r} is missing from {recipes}; reinstall vitpipe")
    return str(path)


def build_collections(images: Path, size: DemoSize) -> tuple[Path, Path]:
    """Write the pretraining and fine-tuning collections once; a re-run reuses them unchanged.

    Rewriting would give the files new modification times and so invalidate the shard cache.
    """
    from pipeline.packaged_data import write_digits, write_faces, write_shapes, write_unlabelled

    pretrain, finetune = images / "shapes_faces", images / "digits"
    done = images / ".complete"
    if done.is_file() and done.read_text() == repr(size):
        return pretrain, finetune
    import shutil

    shutil.rmtree(images, ignore_errors=True)
    write_shapes(pretrain, per_class=size.shapes_per_class, size=size.image_size)
    write_faces(pretrain, size=size.image_size)
    write_digits(finetune, size=size.image_size, limit=size.digits_limit)
    write_unlabelled(images / UNLABELLED, finetune)
    done.write_text(repr(size))
    return pretrain, finetune


UNLABELLED = "digits_unlabelled"  # the digits' images without their class folders, under OUT/images


def self_supervised(out: Path, size: DemoSize, *, labelled_shards: str, uri: str, nproc: int) -> dict:
    """MAE pretraining on unlabelled images, then k-NN of its frozen encoder on labelled ones:
    the same flows as the supervised pipeline, the objective a config value."""
    from flows.stages import evaluate_flow, pretrain_flow, shard_flow

    common = dict(tracking_uri=uri, experiment=EXPERIMENT)
    data = shard_flow(src=str(out / "images" / UNLABELLED), out=str(out / "shards" / UNLABELLED),
                      overrides={"max_samples_per_shard": 1000}, emit_ready=False, **common)
    pre = pretrain_flow(config=recipe(size.mae_recipe), dataset=data["path"], nproc=nproc,
                        overrides={"out": str(out / "pretrain_mae"), "probe.shards": labelled_shards,
                                   **training_overrides(size, "mae")}, **common)
    knn = evaluate_flow(model=pre["export"], dataset=labelled_shards, out=str(out / "evaluate_mae"),
                        overrides={"data": pre["data_config"], "knn.enabled": True, "knn.k": [20]}, **common)
    return {"pretrain": pre, "knn": knn, "dataset": data}


def _prepare_tracking(out: Path) -> str:
    """A SQLite store in OUT; its experiment keeps the artifacts in OUT too (OUT/mlartifacts)."""
    from vit.tracking.tracker import experiment_id

    uri = f"sqlite:///{out / 'mlflow.db'}"
    experiment_id(uri, EXPERIMENT)
    return uri


def demo(out: str | Path = "demo-output", *, size: str = "full", nproc: int = 2) -> dict:
    """Run the demo end to end into `out`; returns the pipeline's record plus 'tracking_uri' and 'seconds'."""
    from flows.pipeline import pipeline_flow

    if size not in SIZES:
        raise UserError(f"--size {size!r}: choose one of {', '.join(SIZES)}")
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be >= 1, e.g. --nproc 2")
    spec = SIZES[size]
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: the ranks fill the cores
    start = time.monotonic()
    pretrain_src, finetune_src = build_collections(out / "images", spec)
    uri = _prepare_tracking(out)
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as startup, temporary_settings

    # Prefect gives its temporary server 20 s to start; a busy laptop's first start (which creates
    # the server's database) can take longer. A value the user set stays.
    patience = {} if startup.name in os.environ else {startup: max(startup.value(), 120)}
    with temporary_settings(updates=patience):
        result = pipeline_flow(
            pretrain_src=str(pretrain_src), finetune_src=str(finetune_src), workdir=str(out),
            shard_overrides={"max_samples_per_shard": 1000},
            pretrain_config=recipe(spec.pretrain_recipe), finetune_config=recipe(spec.finetune_recipe),
            pretrain_overrides=training_overrides(spec, "pretrain"),
            finetune_overrides=training_overrides(spec, "finetune"),
            nproc=nproc, tracking_uri=uri, experiment=EXPERIMENT, run_name=f"demo-{size}",
        )
        ssl = self_supervised(out, spec, labelled_shards=result["datasets"]["finetune"]["path"], uri=uri,
                              nproc=nproc)
    return {**result, "self_supervised": ssl, "tracking_uri": uri, "seconds": time.monotonic() - start}


def format_summary(result: dict) -> str:
    """The table and next steps printed at the end of the demo."""
    from flows.tracking import ui_command

    rows = result["summary"]
    lines = [f"{'stage':<10} {'dataset':<14} {'top-1':>7} {'loss':>7}  MLflow run"]
    for r in rows:
        top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.1f}%"
        loss = "-" if r["loss"] is None else f"{r['loss']:.3f}"
        lines.append(f"{r['stage']:<10} {r['dataset']:<14} {top1:>7} {loss:>7}  {r['mlflow_run_id']}")
    reg = result["stages"]["finetune"].get("registered")
    if reg:
        lines.append(f"registered model {reg['name']} v{reg['version']}: {reg['reason']}")
    ssl = result.get("self_supervised")
    if ssl:
        knn = ssl["knn"]["metrics"].get("knn_top1_k20")
        knn_s = "-" if knn is None else f"{100 * knn:.1f}%"
        samples = ssl["dataset"]["totals"]["num_samples"]
        lines.append(f"self-supervised: MAE on {samples} unlabelled digits, frozen encoder k-NN top-1 {knn_s} "
                     f"(k=20)  MLflow run {ssl['pretrain']['mlflow_run_id']}")
    lines += ["", f"vitpipe demo: done in {result['seconds']:.0f}s. See the runs, metrics and plots with:",
              f"  {ui_command(result['tracking_uri'])}",
              f"  then open {result['url']}"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-output",
                        help="folder for the images, shards, runs and the MLflow store [default: demo-output]")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: the advertised run (~3 min on 2 cores, see docs/demo.md); small: a quick smoke test")
    parser.add_argument("--nproc", type=int, default=2, help="DeepSpeed ranks for training [default: 2]")


def run_cli(args: argparse.Namespace) -> int:
    result = demo(args.out, size=args.size, nproc=args.nproc)
    print(format_summary(result))
    return 0
