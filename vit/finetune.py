"""`vitpipe finetune`: adapt a pretrained ViT to a new labelled dataset, on the pretraining engine.

    vitpipe finetune recipe.yaml --init runs/pretrain/export               # our export
    vitpipe finetune recipe.yaml --init vit_s16.safetensors --model.preset s/16   # a timm checkpoint
    vitpipe finetune recipe.yaml --init models:/vit-digits@champion --mode linear_probe
    vitpipe finetune recipe.yaml --init runs:/RUN_ID/model --data.image-size 48   # higher resolution

The head is replaced for the new dataset's class count; a higher data.image_size resamples the
position embedding (the paper fine-tunes at higher resolution). `full` trains everything with
layer-wise lr decay; `linear_probe` freezes the backbone and runs it without autograd. Data options
left unset follow the starting model: its image size and input channels, and the mean, std and
eval crop its training recorded beside an export.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit.train.config import FinetuneConfig, add_stage_arguments, stage_config_from_args
from vit.train.engine import param_groups
from vit.tracking.tracker import is_mlflow_uri
from vit.train.loop import Model, run_training
from vitpipe.errors import UserError


class LinearProbe(nn.Module):
    """A frozen ViT whose head alone trains: features are computed without autograd (no backward)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        vit.requires_grad_(False)
        vit.head.requires_grad_(True)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.vit.eval()  # dropout and drop-path stay off in a frozen backbone
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
        return self.vit.head(features)


# What a fine-tune may change about the pretrained model: regularisation and pooling (MAE's
# recipe fine-tunes a self-supervised encoder with mean pooling and a norm after it, fc_norm).
_FINETUNE_OVERRIDES = {"attn_drop_rate", "head_drop_rate", "global_pool", "fc_norm"}


_WEIGHT_FILES = (".safetensors", ".pt", ".pth")  # what vit.models.weights.load_pretrained reads
_INIT_KINDS = ("an export directory (model.safetensors + config.json), a timm checkpoint file, or "
               "runs:/RUN_ID/model / models:/NAME@ALIAS")


def _check_init(init: str) -> None:
    if not init.strip():
        raise UserError(f"init is empty; pass --init with {_INIT_KINDS}")
    if is_mlflow_uri(init):
        return
    path = Path(init)
    if path.is_file() and path.suffix not in _WEIGHT_FILES:
        hint = f"; pass its folder, {str(path.parent)!r}" if path.name == "config.json" else ""
        raise UserError(f"init={init!r} is not a weights file ({', '.join(_WEIGHT_FILES)}) nor an export "
                        f"directory{hint}")
    if not path.exists():
        raise UserError(f"init={init!r} does not exist; pass {_INIT_KINDS}")


def preflight(cfg: FinetuneConfig) -> None:
    """What a launch of N processes checks once first (else every rank prints the same error)."""
    from pipeline.index import load_index

    load_index(cfg.data.shards)
    _check_init(cfg.init)


def load_init(cfg: FinetuneConfig, *, num_classes: int) -> nn.Module:
    """The starting model: weights from `cfg.init`, new head for `num_classes`, resized to
    data.image_size if that is set (else at its own size; a timm file at its preset's)."""
    from vit.models.vit import VisionTransformer
    from vit.models.weights import load_pretrained

    init = cfg.init
    image_size = cfg.data.image_size if "image_size" in cfg.data.model_fields_set else None
    if cfg.model.image_size and image_size and cfg.model.image_size != image_size:
        raise UserError(f"model.image_size={cfg.model.image_size} and data.image_size={image_size} differ; the "
                        f"model sees what the loader crops: set one of them")
    image_size = cfg.model.image_size or image_size  # either one resizes the position embedding
    preset = cfg.model.preset or None
    if is_mlflow_uri(init):
        model = _load_mlflow(init, cfg, num_classes=num_classes, image_size=image_size)
    else:
        _check_init(init)
        path = Path(init)
        model = load_pretrained(path, num_classes=num_classes, image_size=image_size,
                                config=_timm_config(path, preset, image_size))
    if not isinstance(model, VisionTransformer):
        raise UserError(f"init={init!r} holds a {type(model).__name__}, not a vitpipe VisionTransformer")
    if preset:  # the user named an architecture: the checkpoint must be that architecture
        from vit.models.weights import architecture_differences, named_config

        diff = [f"checkpoint {d}" for d in architecture_differences(model.cfg, named_config(preset))]
        if diff:
            raise UserError(f"init={init!r} is another architecture than model.preset={preset!r} ("
                            + "; ".join(diff) + "); leave model.preset empty to use the checkpoint's own")
    # Always a fresh zero head, as in the paper: even with the same class count the classes differ.
    model.reset_classifier(num_classes)
    overrides = dict(cfg.model.overrides)
    for key in sorted(set(overrides) - _FINETUNE_OVERRIDES):
        raise UserError(f"model.overrides.{key}: fine-tuning keeps the checkpoint's architecture, and the class "
                        f"count comes from the dataset; only {', '.join(sorted(_FINETUNE_OVERRIDES))} can be set")
    global_pool = overrides.pop("global_pool", None)
    if global_pool and global_pool != model.cfg.global_pool:
        model.reset_classifier(num_classes, global_pool=global_pool)
    wanted = {"drop_path_rate": cfg.model.drop_path_rate, "drop_rate": cfg.model.drop_rate, **overrides}
    if any(getattr(model.cfg, k) != v for k, v in wanted.items()):
        # Drop rates are fixed at construction (per-block schedule); rebuild and copy the weights.
        rebuilt = VisionTransformer(dataclasses.replace(model.cfg, **wanted))
        rebuilt.load_state_dict(_move_final_norm(model.state_dict(), to_fc_norm=rebuilt.cfg.fc_norm))
        model = rebuilt
    return model


def _move_final_norm(state: dict[str, torch.Tensor], *, to_fc_norm: bool) -> dict[str, torch.Tensor]:
    """The final LayerNorm's weights where a model with (or without) fc_norm keeps them: `fc_norm.*`
    normalises the pooled features, `norm.*` every token before pooling. Starting fc_norm from the
    pretrained norm keeps the scale the encoder's features were trained at."""
    src, dst = ("norm.", "fc_norm.") if to_fc_norm else ("fc_norm.", "norm.")
    if not any(k.startswith(src) for k in state):
        return state
    return {(dst + k[len(src):] if k.startswith(src) else k): v for k, v in state.items()}


def _timm_config(path: Path, preset: str | None, image_size: int | None):
    """None for our exports (they carry their config); for a timm file, the named preset's
    architecture (load_pretrained takes the head size the file has, then the new head replaces it)."""
    if path.is_dir() or (path.suffix == ".safetensors" and _has_vitpipe_config(path)):
        return None
    if not preset:
        raise UserError(f"init={str(path)!r} is not a vitpipe export, so its architecture is unknown; "
                        f"name it with --model.preset (e.g. s/16, b/16, vit_small_patch16_224)")
    # The name itself: load_pretrained builds it (our preset or a timm name) and reads channels,
    # class token, fc_norm and qkv biases off the file; image_size is passed to it separately.
    return preset


def _has_vitpipe_config(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return False
    return any("config" in k for k in meta)


def _load_mlflow(uri: str, cfg: FinetuneConfig, *, num_classes: int, image_size: int | None) -> nn.Module:
    """A model from the MLflow registry or a run: a registered version or an export logged as artifacts."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from vit.tracking.registry import load_logged_model
    from vit.tracking.tracker import resolve_uri

    tracking_uri = resolve_uri(cfg.tracking)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = load_logged_model(uri)
    except MlflowException as e:
        raise UserError(f"init={uri!r}: cannot fetch it from MLflow at {tracking_uri} ({e.message}); check the "
                        f"run id or model name/alias, and tracking.uri") from None
    model = getattr(model, "vit", model)
    if image_size and image_size != model.cfg.image_size:
        model.set_image_size(image_size)
    if num_classes != model.cfg.num_classes:
        model.reset_classifier(num_classes)
    return model


def fit_data_to_init(cfg: FinetuneConfig, model: nn.Module) -> FinetuneConfig:
    """`cfg` with the data options the user left unset taken from the starting model (as timm
    resolves a data config from a pretrained model): image size and input channels from its
    architecture; mean, std and eval crop from the training config beside an export, so it goes on
    learning from pixels prepared as before. A channel count given explicitly must match."""
    from vit.models.weights import data_for_model

    arch = model.cfg
    data = data_for_model(cfg.data, model, cfg.init, name=f"init={cfg.init!r}")
    if data.channels != arch.in_chans:
        raise UserError(f"init={cfg.init!r} takes {arch.in_chans}-channel images but data.channels="
                        f"{data.channels}; set data.channels={arch.in_chans} or leave it out (it follows the init)")
    return cfg.model_copy(update={"data": data})


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (or linear-probe) as configured and export; returns metrics, export dir, run id."""
    from pipeline.index import load_index

    _check_init(cfg.init)
    # The starting model is loaded before the data loaders, as data options left unset follow it;
    # seeded, so every rank builds the same one.
    torch.manual_seed(cfg.train.seed)
    model = load_init(cfg, num_classes=len(load_index(cfg.data.shards)["classes"]))
    cfg = fit_data_to_init(cfg, model)

    def build(train_loader) -> Model:
        probe = cfg.mode == "linear_probe"
        module = LinearProbe(model) if probe else model
        groups = param_groups(module, cfg.optim, layer_decay=1.0 if probe else cfg.layer_decay,
                              depth=len(model.blocks))
        flops = model.flops_per_image(training=not probe)
        if probe:  # forward of the backbone, forward+backward of the head only
            flops = model.flops_per_image(training=False) + 4 * model.cfg.embed_dim * model.cfg.num_classes
        return Model(module=module, param_groups=groups, model_config=model.cfg.to_dict(), flops_per_image=flops,
                     export_prefix="vit." if probe else "", params={"init.source": cfg.init})

    return run_training(cfg, stage="finetune", build=build)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, FinetuneConfig)


def cli_config(args: argparse.Namespace) -> FinetuneConfig:
    return stage_config_from_args(FinetuneConfig, args)


def run_cli(args: argparse.Namespace) -> int:
    from vit.train.loop import launch_ranks

    cfg = cli_config(args)
    launch_ranks(args, cfg, preflight)
    finetune(cfg)
    return 0
