"""Export: write a vitpipe model in a format other tools load as it is.

    vitpipe export runs/finetune/export runs/timm-vit                     # a timm / Hugging Face hub folder
    vitpipe export models:/digits-vit@champion runs/timm-vit              # a registered model
    vitpipe export vit_s16.safetensors runs/timm-vit --model-preset s/16  # a bare weights file

`--format timm-hub` (the default) writes OUT/model.safetensors (timm's parameter names) and
OUT/config.json in the layout timm's `save_for_hf` writes (`architecture`, `model_args`,
`pretrained_cfg` with the training's mean/std/crop, `label_names`), plus a README.md model card.
timm then builds the same network with the same weights:

    timm.create_model("local-dir:OUT", pretrained=True)                            # everything from config.json
    timm.create_model(ARCH, pretrained=True, num_classes=N, **model_args,
                      pretrained_cfg_overlay=dict(file="OUT/model.safetensors", num_classes=N))

and `huggingface-cli upload NAME OUT` publishes it for `timm.create_model("hf-hub:NAME")`. The
folder loads back into vitpipe too (`--init OUT`, `--model OUT`). When timm is installed the
export is checked: timm's model must give the same logits as vitpipe's on a random batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from vitpipe.config import StageConfig, add_config_arguments, config_from_args
from vitpipe.errors import UserError

# Files an earlier export into OUT may have left; anything else in OUT is someone else's.
_OWN_FILES = {"model.safetensors", "config.json", "README.md"}


class ExportConfig(StageConfig):
    """Options of `vitpipe export MODEL OUT`."""

    model: str = Field(description="what to export: an export folder (model.safetensors + config.json), a weights "
                                   "file, or an MLflow URI (runs:/ID/model, models:/NAME@ALIAS)")
    out: str = Field(description="folder to write (created; an earlier export there is replaced)")
    format: Literal["timm-hub"] = Field("timm-hub", description="'timm-hub': model.safetensors + timm's "
                                                                "config.json, as timm's save_for_hf writes them")
    model_preset: str = Field("", description="architecture of a bare weights file (our preset such as s/16, or a "
                                              "timm name); set for an export, it must match")
    check: bool = Field(True, description="rebuild the export with timm (when installed) and compare its logits "
                                          "with vitpipe's on a random batch")


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Write `cfg.model` as `cfg.format` into `cfg.out`; returns what was written (and checked)."""
    from vit.evaluate import load_model
    from vit.models.vit import VisionTransformer
    from vit.models.weights import save_timm_hub, trained_preprocessing
    from vit.tracking.tracker import is_mlflow_uri

    out = Path(cfg.out)
    _check_out(out)
    model = load_model(cfg.model, preset=cfg.model_preset)
    if not isinstance(model, VisionTransformer):
        raise UserError(f"--model {cfg.model} holds a {type(model).__name__}, not a vitpipe VisionTransformer")
    preprocessing = {} if is_mlflow_uri(cfg.model) else trained_preprocessing(cfg.model)
    save_timm_hub(model, out, preprocessing=preprocessing)
    config = json.loads((out / "config.json").read_text())
    (out / "README.md").write_text(model_card(config, source=cfg.model))
    result: dict[str, Any] = {"out": str(out), "architecture": config["architecture"],
                              "model_args": config["model_args"]}
    if cfg.check:
        result["check"] = check_with_timm(model, out)
    return result


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {str(out)!r} is a file; pass a folder to write the export into")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_FILES)
        if foreign:
            raise UserError(f"OUT {str(out)!r} holds other files ({', '.join(foreign[:5])}); choose an empty or "
                            f"new folder")


def timm_calls(config: dict[str, Any], folder: str) -> tuple[str, str]:
    """The two timm.create_model calls that load a folder written by export, as Python source."""
    args = config["model_args"]
    n = config["num_classes"]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in args.items() if k != "num_classes")
    return (f'timm.create_model("local-dir:{folder}", pretrained=True)',
            f'timm.create_model("{config["architecture"]}", pretrained=True, num_classes={n}, {kwargs}, '
            f'pretrained_cfg_overlay=dict(file="{folder}/model.safetensors", num_classes={n}))')


def model_card(config: dict[str, Any], *, source: str) -> str:
    """README.md for the folder: Hugging Face hub metadata and how to load it."""
    local, by_file = timm_calls(config, ".")
    pre = config["pretrained_cfg"]
    labels = config.get("label_names")
    return "\n".join([
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, vitpipe]",
        "---",
        f"# {config['architecture']} (exported by vitpipe)",
        "",
        f"A Vision Transformer trained with vitpipe, exported from `{source}`: {config['num_classes']} classes, "
        f"{pre['input_size'][1]} px, {pre['input_size'][0]} channel(s), global_pool={config['global_pool']!r}.",
        f"Preprocessing: resize the shorter side to image size / {pre['crop_pct']} (bilinear), center crop, "
        f"scale to [0, 1], normalize with mean {pre['mean']} and std {pre['std']}.",
        "",
        "```python",
        "import timm",
        f"model = {local}  # run in this folder",
        f"model = {by_file}",
        "```",
        "",
        "vitpipe reads the folder back as it is: `vitpipe evaluate --model FOLDER`, `vitpipe finetune --init FOLDER`.",
        *(["", f"Classes (head output order): {', '.join(map(str, labels))}"] if labels else []),
        "",
    ])


def check_with_timm(model: torch.nn.Module, folder: Path) -> dict[str, Any]:
    """Build the exported folder with timm (local-dir) and compare logits with `model`'s."""
    try:
        import timm
    except ImportError:
        return {"checked": False, "reason": "timm is not installed (pip install timm)"}
    theirs = timm.create_model(f"local-dir:{folder.absolute()}", pretrained=True).eval()
    cfg = model.cfg
    x = torch.randn(2, cfg.in_chans, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ours, other = model(x.to(model.pos_embed)), theirs(x)
    model.train(was_training)
    diff = float((ours.float().cpu() - other.float()).abs().max()) if ours.numel() else 0.0
    scale = float(ours.abs().max()) if ours.numel() else 0.0
    if diff > 1e-4 * max(1.0, scale):
        raise UserError(f"timm {timm.__version__} builds the export in {folder} but its logits differ from vitpipe's "
                        f"by up to {diff:.3g}; please report this, with the model's config.json")
    return {"checked": True, "timm": timm.__version__, "max_abs_diff": diff}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExportConfig, positional=("model", "out"))


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(ExportConfig, args)
    result = export(cfg)
    check = result.get("check") or {}
    checked = (f"timm {check['timm']} gives the same logits (max diff {check['max_abs_diff']:.2g})"
               if check.get("checked") else f"not checked: {check.get('reason', '--no-check')}")
    print(f"export: {cfg.model} -> {result['out']} ({cfg.format}, {result['architecture']}); {checked}")
    print("  " + timm_calls(json.loads((Path(result["out"]) / "config.json").read_text()), result["out"])[0])
    return 0
