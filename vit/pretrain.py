"""`vitpipe pretrain`: pretrain a ViT on a sharded collection, with or without labels.

    vitpipe pretrain run.yaml                         # one process (CPU or one GPU)
    vitpipe pretrain run.yaml --nproc 8               # all GPUs of this node
    vitpipe pretrain run.yaml --deepspeed.zero-stage 2 --optim.lr 5e-4 --train.steps 20000
    vitpipe pretrain run.yaml --train.objective mae   # unlabelled images: masked autoencoder

Relaunching the same command resumes from the latest complete checkpoint; --no-resume starts over.
From Python (one process, e.g. a Prefect task): `pretrain(PretrainConfig(...))`.
"""

from __future__ import annotations

import argparse
from typing import Any

from vit.train.config import PretrainConfig, add_stage_arguments, stage_config_from_args
from vit.train.engine import param_groups
from vit.train.loop import Model, run_training
from vitpipe.errors import UserError


def model_overrides(cfg, num_classes: int) -> dict[str, Any]:
    """ViTConfig fields the run fixes on top of the preset: classes and input from the data."""
    overrides = dict(cfg.model.overrides)
    owned = {"num_classes": "the dataset's index", "image_size": "model.image_size / data.image_size",
             "in_chans": "data.channels"}
    for key in owned.keys() & overrides.keys():
        raise UserError(f"model.overrides.{key}: comes from {owned[key]}; remove it from the overrides")
    if cfg.model.image_size and cfg.model.image_size != cfg.data.image_size:
        raise UserError(f"model.image_size={cfg.model.image_size} differs from data.image_size="
                        f"{cfg.data.image_size}; the model sees the loader's images, so set data.image_size")
    overrides.update(num_classes=num_classes, image_size=cfg.data.image_size, in_chans=cfg.data.channels,
                     drop_path_rate=cfg.model.drop_path_rate, drop_rate=cfg.model.drop_rate)
    return overrides


def encoder_overrides(cfg: PretrainConfig, num_classes: int, *, needs_labels: bool) -> dict[str, Any]:
    """model_overrides for the objective: a self-supervised run trains a head-less encoder, whose
    features are the mean of its patch tokens unless model.overrides says otherwise, with MAE's
    final LayerNorm on every token (what the decoder reads), not fc_norm after pooling."""
    overrides = model_overrides(cfg, num_classes if needs_labels else 0)
    if not needs_labels:
        overrides.setdefault("global_pool", "avg")
        overrides.setdefault("fc_norm", False)
    return overrides


def check_objective(cfg: PretrainConfig, objective, classes: list | None = None) -> None:
    """What can be refused before any process group, data or model exists: the architecture at this
    image size, the objective's options against it (mask ratio, decoder size), and labels."""
    from vit.models.vit import preset_config

    vit_cfg = preset_config(cfg.model.preset, **encoder_overrides(cfg, 0, needs_labels=False))
    if hasattr(objective, "check"):
        objective.check(vit_cfg, batch_size=cfg.data.batch_size, memory_bytes=_device_memory())
    if classes is not None and not classes and objective.needs_labels:
        raise UserError(f"data.shards={cfg.data.shards!r} has no class labels (an unlabelled collection); "
                        f"train.objective={cfg.train.objective} needs them. Pretrain on unlabelled images with "
                        f"--train.objective mae (or mpp)")


def _device_memory() -> int | None:
    """Bytes of memory one rank can use at most: its GPU's, else the machine's."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        import psutil

        return psutil.virtual_memory().total
    except ImportError:
        return None


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain as configured and export; returns final metrics, export dir, MLflow run id, checkpoint dir."""
    from pipeline.index import load_index
    from vit.models.vit import create_model
    from vit.objectives import build_objective

    objective = build_objective(cfg)
    # An unknown preset, a bad option or data without the labels it needs fail before any process group.
    check_objective(cfg, objective, load_index(cfg.data.shards)["classes"] if cfg.data.shards else None)

    def build(train_loader) -> Model:
        overrides = encoder_overrides(cfg, train_loader.num_classes, needs_labels=objective.needs_labels)
        model = create_model(cfg.model.preset, **overrides)
        module = objective.wrap(model)
        return Model(module=module, param_groups=param_groups(module, cfg.optim),
                     model_config=model.cfg.to_dict(), flops_per_image=module.flops_per_image(training=True),
                     export_prefix=objective.export_prefix,
                     params={"model.num_params": model.num_params(),
                             "model.trained_params": sum(p.numel() for p in module.parameters())})

    return run_training(cfg, stage="pretrain", build=build)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, PretrainConfig)


def cli_config(args: argparse.Namespace) -> PretrainConfig:
    return stage_config_from_args(PretrainConfig, args)  # bad config fails before launching N processes


def preflight(cfg: PretrainConfig) -> None:
    """What a launch of N processes checks once first (else every rank prints the same error)."""
    from pipeline.index import load_index
    from vit.objectives import build_objective

    check_objective(cfg, build_objective(cfg), load_index(cfg.data.shards)["classes"])


def run_cli(args: argparse.Namespace) -> int:
    from vit.train.loop import launch_ranks

    cfg = cli_config(args)
    launch_ranks(args, cfg, preflight)
    pretrain(cfg)
    return 0
