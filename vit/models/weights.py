"""Model weights on disk: our safetensors + config.json format, and timm checkpoints in and out.

Everything that touches a state dict is a pure `state_dict -> state_dict` function, so it is tested
without files and reused by pretraining export, fine-tuning and the MLflow model code:

    save_pretrained(model, "out/")                       # out/model.safetensors + out/config.json
    model = load_pretrained("out/", num_classes=10, image_size=384)
    sd = load_timm_checkpoint("vit_b16.pth", preset_config("b/16"))   # timm file -> our layout
    timm_sd = vitpipe_to_timm(model.state_dict(), model.cfg)           # ours -> timm.load_state_dict

Untrusted files are never unpickled: safetensors holds only tensors, and .pt/.pth files are read
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from vit.models.vit import (PRESETS, VisionTransformer, ViTConfig, preset_config,
                       resample_pos_embed)
from vitpipe.errors import UserError

__all__ = [
    "resample_pos_embed", "save_pretrained", "load_pretrained", "load_state_dict",
    "timm_to_vitpipe", "vitpipe_to_timm", "load_timm_checkpoint", "config_from_timm", "timm_model_kwargs",
]

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "vitpipe.vit"  # written into config.json so a stray JSON file is not mistaken for ours
_CONFIG_METADATA_KEY = "vitpipe_config"  # the config also rides in the safetensors header

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Our format: model.safetensors + config.json


def save_pretrained(model: VisionTransformer, out_dir: str | Path) -> Path:
    """Write the model as out_dir/model.safetensors + out_dir/config.json; call on rank 0 only.

    The config is also stored in the safetensors header, so the weights file alone is loadable.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, **model.cfg.to_dict()}
    names = getattr(model, "class_names", None)
    if names is not None:
        if len(names) != model.cfg.num_classes:
            raise UserError(f"model.class_names has {len(names)} names for a head of {model.cfg.num_classes} "
                            f"classes; set one name per output (or None)")
        config["class_names"] = [str(n) for n in names]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Write then rename, so a crash never leaves a truncated file that looks complete.
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", _CONFIG_METADATA_KEY: json.dumps(config)})
    tmp.replace(out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _read_values(weights: Path) -> dict[str, Any] | None:
    """The config.json beside a weights file, or the config in its safetensors header, as a dict."""
    config_file = weights.parent / CONFIG_NAME
    if config_file.is_file():
        try:
            return json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{config_file}: not valid JSON ({e}); re-export the model with save_pretrained") from e
    if weights.suffix != ".safetensors" or not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as f:
        text = (f.metadata() or {}).get(_CONFIG_METADATA_KEY)
    return None if text is None else json.loads(text)


def _read_config(weights: Path, values: dict[str, Any] | None) -> ViTConfig | None:
    """The architecture of a weights file, from its config values (`_read_values`).

    A timm / Hugging Face hub folder (model.safetensors + a config.json naming the "architecture")
    is read too, so a downloaded timm ViT loads without naming its architecture again.
    """
    config_file = weights.parent / CONFIG_NAME
    if values is None:
        return None
    if values.get("format") == FORMAT:
        return ViTConfig.from_dict({k: v for k, v in values.items() if k not in ("format", "class_names")})
    if isinstance(values.get("architecture"), str):
        extra = {k: values[k] for k in ("num_classes", "in_chans") if isinstance(values.get(k), int)}
        if values.get("global_pool") in ("token", "avg"):
            extra["global_pool"] = values["global_pool"]
        return config_from_timm(values["architecture"], **extra)
    raise UserError(f"{config_file} is neither a vitpipe model config (\"format\": \"{FORMAT}\") nor a timm "
                    f"one (\"architecture\"); remove it or pass config=")


def _read_tensors(path: Path) -> dict[str, Any]:
    """Tensors of a .safetensors or .pt/.pth/.bin file, without unpickling anything but tensors."""
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass a model directory or a "
                        f".safetensors/.pt/.pth file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for unsafe objects, RuntimeError for broken zips
            raise UserError(f"{path}: refused to load; only plain tensors and containers are read "
                            f"(torch.load weights_only=True), and this file holds something else or "
                            f"is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                            f"Re-save just the state dict, or convert it to .safetensors") from e
    if path.suffix == ".npz":
        raise UserError(f"{path}: original JAX .npz checkpoints are not read here; convert with "
                        f"timm (timm.create_model(name, pretrained_cfg_overlay=dict(file=...))) first")
    raise UserError(f"{path}: unknown checkpoint type {path.suffix!r}; use .safetensors, .pt or .pth")


def load_state_dict(model: VisionTransformer, state_dict: Mapping[str, torch.Tensor], *,
                    strict: bool = True, source: str = "checkpoint") -> None:
    """Copy a state dict into the model, failing with every bad key named (not just the first).

    Shapes must always match; strict=False tolerates missing and unexpected keys (and logs them).
    """
    own = model.state_dict()
    shapes = [f"{k}: {source} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    problems = []
    if shapes:
        problems.append("wrong shapes: " + "; ".join(shapes))
    if strict and missing:
        problems.append("missing keys: " + ", ".join(missing))
    if strict and unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if problems:
        raise UserError(f"{source} does not fit the model ({_describe(model.cfg)}): " + " | ".join(problems)
                        + ". Check that the model config matches the checkpoint (embed_dim, depth, "
                        "patch_size, representation_size, fc_norm), or pass strict=False to skip "
                        "missing/unexpected keys")
    if missing or unexpected:
        log.warning("%s: loaded with strict=False; missing %s, unexpected %s", source,
                    missing or "none", unexpected or "none")
    model.load_state_dict(state_dict, strict=False)


def _describe(cfg: ViTConfig) -> str:
    return (f"embed_dim={cfg.embed_dim} depth={cfg.depth} patch_size={cfg.patch_size} "
            f"image_size={cfg.image_size} num_classes={cfg.num_classes}")


def load_pretrained(path: str | Path, *, num_classes: int | None = None, image_size: int | None = None,
                    strict: bool = True, config: ViTConfig | str | None = None) -> VisionTransformer:
    """Load a model to fine-tune or evaluate: our export (dir or .safetensors) or a timm checkpoint.

    num_classes: a different count than the checkpoint's gets a fresh zero-initialized head (logged).
    image_size: a different resolution resamples the position embedding.
    config: needed only for checkpoints without our config.json (timm files): a ViTConfig, one of our
    preset names ('b/16') or a timm model name ('vit_base_patch16_224').
    """
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if path.is_dir() and not weights.is_file():
        raise UserError(f"{path} has no {WEIGHTS_NAME}; point at a directory written by save_pretrained "
                        f"or at a checkpoint file")
    if isinstance(config, str):
        config = _named_config(config)
    values = _read_values(weights) if config is None and weights.is_file() else None
    cfg = config or _read_config(weights, values)
    state_dict = _read_tensors(weights)
    if cfg is None:
        raise UserError(f"{weights} carries no vitpipe config; pass config= a preset name "
                        f"({', '.join(list(PRESETS)[:3])}, ...), a timm model name or a ViTConfig")
    if image_size is not None:
        cfg = dataclasses.replace(cfg, image_size=image_size)
    # Our layout passes through unchanged, except that the position embedding is resampled to cfg's grid.
    state_dict = timm_to_vitpipe(state_dict, cfg)
    head = state_dict.get("head.weight")
    if config is not None and cfg.num_classes and cfg.num_classes != (n := 0 if head is None else int(head.shape[0])):
        # A named architecture ('b/16', a timm name) says nothing about the file's label set (1000,
        # 21843, none): take the head the file has; `num_classes` below replaces it if asked.
        cfg = dataclasses.replace(cfg, num_classes=n)
    model = VisionTransformer(cfg)
    load_state_dict(model, state_dict, strict=strict, source=str(weights))
    if config is None:
        names = _class_names(values)
        model.class_names = names if names is not None and len(names) == model.cfg.num_classes else None
    if num_classes is not None and num_classes != model.cfg.num_classes:
        log.warning("%s: checkpoint head has %d classes; %s", weights, model.cfg.num_classes,
                    f"using a fresh zero-initialized head for {num_classes} classes" if num_classes
                    else "dropping it (num_classes=0: the model returns pooled features)")
        model.reset_classifier(num_classes)
    return model


def read_class_names(path: str | Path) -> list[str] | None:
    """The class names an export records for its head (None: not recorded, e.g. a timm file)."""
    path = Path(path)
    return _class_names(_read_values(path / WEIGHTS_NAME if path.is_dir() else path))


# Data options an export's training recorded (export/train_config.yaml) that evaluation and
# fine-tuning should repeat: a model scores, and goes on learning from, pixels prepared as the ones
# it learned from.
TRAINED_PREPROCESSING = ("mean", "std", "eval_crop_pct")


def trained_preprocessing(source: str | Path) -> dict[str, Any]:
    """TRAINED_PREPROCESSING options from the training config saved beside an export (empty if
    there is none: a timm file, a registry URI)."""
    from vitpipe.config import read_yaml

    path = Path(source)
    found = (path if path.is_dir() else path.parent) / "train_config.yaml"
    if not found.is_file():
        return {}
    data = read_yaml(found).get("data")
    return {k: data[k] for k in TRAINED_PREPROCESSING if k in data} if isinstance(data, dict) else {}


def data_for_model(data, model, source: str | Path, *, name: str):
    """`data` (a DataConfig) with the options the user left unset taken from `model` (as timm
    resolves a data config from a model): image size and channels from its architecture; mean,
    std and eval crop from the training config beside the export at `source`. `name` says which
    model in an error (e.g. "--model runs/x/export")."""
    from pipeline.loader import DataConfig

    chosen = data.model_fields_set
    update = {k: v for k, v in trained_preprocessing(source).items() if k not in chosen}
    arch = getattr(model, "cfg", None)
    for field, attr in (("channels", "in_chans"), ("image_size", "image_size")):
        value = getattr(arch, attr, None)
        if isinstance(value, int) and field not in chosen:
            update[field] = value
    try:
        return DataConfig.model_validate({**data.model_dump(), **update})
    except ValueError as e:  # e.g. three mean values for a 1-channel model
        raise UserError(f"{name} reads {update.get('channels', data.channels)}-channel images: {e}") from None


def _class_names(values: dict[str, Any] | None) -> list[str] | None:
    names = values.get("class_names") if values and values.get("format") == FORMAT else None
    return [str(n) for n in names] if isinstance(names, list) else None


def _named_config(name: str) -> ViTConfig:
    return preset_config(name) if not name.startswith("vit_") else config_from_timm(name)


# ---------------------------------------------------------------------------------------------
# timm's VisionTransformer <-> ours

# Both use timm's parameter names, so conversion is about what differs around them: wrappers and
# prefixes, old layouts, features we do not implement, and the position-embedding grid.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_ema")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_UNSUPPORTED = {  # timm parameter name pattern -> the timm option it comes from
    r"^reg_token$": "register tokens (reg_tokens)",
    r"^dist_token$|^head_dist\.": "distillation token (DeiT distilled)",
    r"^attn_pool\.": "attention pooling (global_pool='map')",
    r"^norm_pre\.": "pre-norm (CLIP-style norm_pre)",
    r"\.ls[12]\.": "layer scale (init_values)",
    r"\.(q_norm|k_norm)\.": "qk_norm",
    r"\.attn\.norm\.|\.mlp\.norm\.": "scale_attn_norm/scale_mlp_norm",
    r"^patch_embed\.norm\.": "patch-embedding norm",
    r"^mask_token$": "mask token (DINOv2/MAE pretraining)",
}


def _unwrap(sd: Mapping[str, Any]) -> dict[str, Any]:
    while True:
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    out = dict(sd)
    for prefix in _PREFIXES:  # DDP, torch.compile and Lightning-style wrappers
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def timm_to_vitpipe(sd: Mapping[str, Any], cfg: ViTConfig) -> StateDict:
    """A timm VisionTransformer state dict (or a checkpoint dict holding one) -> our model's layout.

    Unwraps {'state_dict': ...}, strips DDP/compile prefixes, reshapes old linear patch embeddings,
    resamples the position embedding to cfg's grid, drops the head when cfg.num_classes == 0, and
    refuses timm features this model does not implement, naming the keys.
    """
    sd = _unwrap(sd)
    bad = sorted(k for k in sd if any(re.search(p, k) for p in _UNSUPPORTED))
    if bad:
        features = sorted({why for k in bad for p, why in _UNSUPPORTED.items() if re.search(p, k)})
        raise UserError(f"timm checkpoint uses {', '.join(features)}, which vitpipe's ViT does not "
                        f"implement (keys: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}); "
                        f"use a plain ViT checkpoint")
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        missing = [k for k in ("pos_embed", "patch_embed.proj.weight") if k not in sd]
        raise UserError(f"not a ViT checkpoint: missing {', '.join(missing)} "
                        f"(first keys: {', '.join(list(sd)[:5])})")
    out: StateDict = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue  # optimizer steps, epochs and other bookkeeping stored next to the weights
        if k == "patch_embed.proj.weight" and v.ndim == 2:
            # early timm models patchified by reshape + Linear; same weights as a strided conv
            v = v.reshape(v.shape[0], cfg.in_chans, cfg.patch_size, cfg.patch_size)
        elif k == "pos_embed" and v.shape[1] != 1 + cfg.grid_size[0] * cfg.grid_size[1]:
            if v.shape[-1] == cfg.embed_dim:  # width mismatches are reported by load_state_dict
                log.info("resampling position embedding from %d to %s grid tokens", v.shape[1] - 1,
                         cfg.grid_size)
                v = resample_pos_embed(v, cfg.grid_size, num_prefix_tokens=1)
        elif k.startswith("head.") and cfg.num_classes == 0:
            continue
        out[k] = v
    return out


def vitpipe_to_timm(sd: Mapping[str, torch.Tensor], cfg: ViTConfig) -> StateDict:
    """Our state dict -> one that timm's VisionTransformer(**timm_model_kwargs(cfg)) loads strictly."""
    if cfg.representation_size:
        raise UserError(f"representation_size={cfg.representation_size}: timm's VisionTransformer has "
                        f"no hidden pre-logits layer; call model.reset_classifier(n) (drops it, as for "
                        f"fine-tuning) before exporting to timm")
    return {k: v for k, v in _unwrap(sd).items()}


def timm_model_kwargs(cfg: ViTConfig) -> dict[str, Any]:
    """Keyword arguments for timm.models.vision_transformer.VisionTransformer with the same architecture."""
    if cfg.representation_size:
        raise UserError(f"representation_size={cfg.representation_size} has no timm equivalent")
    return dict(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, global_pool=cfg.global_pool, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        fc_norm=cfg.fc_norm, drop_rate=cfg.head_drop_rate, pos_drop_rate=cfg.drop_rate,
        proj_drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
    )


_TIMM_SIZES = {"tiny": "ti", "small": "s", "base": "b", "large": "l", "huge": "h"}


def config_from_timm(model_or_name: Any, **overrides: Any) -> ViTConfig:
    """Our ViTConfig for a timm ViT: a model instance, or a name like 'vit_base_patch16_224'."""
    if isinstance(model_or_name, str):
        m = re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(?:[a-z0-9]+_)*?(\d+)(?:\.\w+)?",
                         model_or_name)
        if not m:
            raise UserError(f"cannot read a ViT architecture from timm name {model_or_name!r}; expected "
                            f"e.g. vit_base_patch16_224, or pass our preset name ('b/16') or a ViTConfig")
        size, patch, res = _TIMM_SIZES[m.group(1)], int(m.group(2)), int(m.group(3))
        if f"{size}/{patch}" not in PRESETS:
            raise UserError(f"timm model {model_or_name!r}: no preset {size}/{patch}; pass a ViTConfig")
        return preset_config(f"{size}/{patch}", **{"image_size": res, **overrides})
    m = model_or_name
    unsupported = [what for what, present in [
        ("no class token", not getattr(m, "has_class_token", True)),
        ("register tokens", getattr(m, "num_reg_tokens", 0)),
        ("no_embed_class", getattr(m, "no_embed_class", False)),
        ("attention pooling", getattr(m, "attn_pool", None) is not None),
        (f"global_pool={getattr(m, 'global_pool', '')!r}", getattr(m, "global_pool", "") not in ("token", "avg")),
    ] if present]
    if unsupported:
        raise UserError(f"timm model uses {', '.join(unsupported)}, which vitpipe's ViT does not implement")
    block = m.blocks[0]
    img = m.patch_embed.img_size
    patch = m.patch_embed.patch_size
    values = dict(
        image_size=img[0] if isinstance(img, (tuple, list)) else img,
        patch_size=patch[0] if isinstance(patch, (tuple, list)) else patch,
        in_chans=m.patch_embed.proj.in_channels, num_classes=m.num_classes,
        embed_dim=m.embed_dim, depth=len(m.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / m.embed_dim, qkv_bias=block.attn.qkv.bias is not None,
        global_pool=m.global_pool, fc_norm=not isinstance(m.fc_norm, torch.nn.Identity),
        layer_norm_eps=block.norm1.eps,
    )
    return ViTConfig(**{**values, **overrides})


def load_timm_checkpoint(path: str | Path, cfg: ViTConfig) -> StateDict:
    """Read a timm ViT checkpoint (.safetensors, or .pt/.pth with weights_only=True) in our layout.

    The result goes straight into VisionTransformer(cfg).load_state_dict, or load_state_dict(model, sd).
    """
    return timm_to_vitpipe(_read_tensors(Path(path)), cfg)
