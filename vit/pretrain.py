"""`vitpipe pretrain`: supervised pretraining of a ViT on a sharded, labelled collection.

    vitpipe pretrain run.yaml                         # one process (CPU or one GPU)
    vitpipe pretrain run.yaml --nproc 8               # all GPUs of this node
    vitpipe pretrain run.yaml --deepspeed.zero-stage 2 --optim.lr 5e-4 --train.steps 20000

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


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain as configured and export; returns final metrics, export dir, MLflow run id, checkpoint dir."""
    from vit.models.vit import create_model, preset_config

    preset_config(cfg.model.preset)  # an unknown preset fails before any process group or data

    def build(train_loader) -> Model:
        model = create_model(cfg.model.preset, **model_overrides(cfg, train_loader.num_classes))
        return Model(module=model, param_groups=param_groups(model, cfg.optim),
                     model_config=model.cfg.to_dict(), flops_per_image=model.flops_per_image(training=True),
                     params={"model.num_params": model.num_params()})

    return run_training(cfg, stage="pretrain", build=build)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, PretrainConfig)


def cli_config(args: argparse.Namespace) -> PretrainConfig:
    return stage_config_from_args(PretrainConfig, args)  # bad config fails before launching N processes


def preflight(cfg: PretrainConfig) -> None:
    """What a launch of N processes checks once first (else every rank prints the same error)."""
    from pipeline.index import load_index

    load_index(cfg.data.shards)


def run_cli(args: argparse.Namespace) -> int:
    from vit.train.loop import launch_ranks

    cfg = cli_config(args)
    launch_ranks(args, cfg, preflight)
    pretrain(cfg)
    return 0
