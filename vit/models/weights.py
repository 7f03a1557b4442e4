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
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from vit.models.vit import (GLOBAL_POOLS, PRESETS, VisionTransformer, ViTConfig, preset_config,
                            resample_pos_embed)
from vitpipe.errors import UserError

__all__ = [
    "resample_pos_embed", "save_pretrained", "load_pretrained", "load_state_dict",
    "timm_to_vitpipe", "vitpipe_to_timm", "load_timm_checkpoint", "config_from_timm", "config_from_timm_hub",
    "timm_model_kwargs", "timm_hub_config", "save_timm_hub", "has_config", "named_config", "architecture_differences",
    "mae_encoder",
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
            values = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{config_file}: not valid JSON ({e}); re-export the model with save_pretrained "
                            f"(or remove the file and name the architecture)") from None
        if not isinstance(values, dict):
            raise UserError(f"{config_file} holds a JSON {type(values).__name__}, not a model config object; "
                            f"re-export the model or remove the file and name the architecture")
        return values
    if weights.suffix != ".safetensors" or not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as f:
            text = (f.metadata() or {}).get(_CONFIG_METADATA_KEY)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
    if text is None:
        return None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{weights}: the vitpipe config in its header is not valid JSON ({e}); re-export the "
                        f"model with save_pretrained, or load it naming the architecture") from None
    return values if isinstance(values, dict) else None


def _read_config(weights: Path, values: dict[str, Any] | None) -> ViTConfig | None:
    """The architecture of a weights file, from its config values (`_read_values`).

    A timm / Hugging Face hub folder (model.safetensors + a config.json naming the "architecture",
    as timm's save_for_hf writes it) is read too, its `model_args` honoured as timm honours them,
    so a downloaded or exported timm ViT loads without naming its architecture again.
    """
    config_file = weights.parent / CONFIG_NAME
    where = config_file if config_file.is_file() else weights
    if values is None:
        return None
    if values.get("format") == FORMAT:
        try:
            return ViTConfig.from_dict({k: v for k, v in values.items() if k not in ("format", "class_names")})
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:  # a field of the wrong type
            raise UserError(f"{where}: not a valid vitpipe model config ({e}); re-export the model with "
                            f"save_pretrained") from None
    if isinstance(values.get("architecture"), str):
        return config_from_timm_hub(values, source=str(where))
    raise UserError(f"{where} is neither a vitpipe model config (\"format\": \"{FORMAT}\") nor a timm "
                    f"one (\"architecture\"); remove it or name the architecture (config=, --model-preset)")


def has_config(path: str | Path) -> bool:
    """Whether a model folder or weights file says its own architecture (our export, a timm hub
    folder); a bare timm checkpoint does not, and needs one named (a preset or timm name)."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if (weights.parent / CONFIG_NAME).is_file():
        return True
    if weights.suffix != ".safetensors" or not weights.is_file():
        return False
    try:
        with safe_open(str(weights), framework="pt") as f:
            return _CONFIG_METADATA_KEY in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False  # _read_tensors says what is wrong with it


def architecture_differences(have: ViTConfig, want: ViTConfig) -> list[str]:
    """'field: have X vs want Y' for each field that makes two configs different architectures
    (the head size, resolution and regularisation may differ)."""
    fields = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")
    return [f"{f} {getattr(have, f)} vs {getattr(want, f)}" for f in fields if getattr(have, f) != getattr(want, f)]


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
    """Load a model to fine-tune or evaluate: our export (dir or .safetensors), a timm hub folder
    (config.json with `architecture` + `model_args`), or a bare timm checkpoint.

    num_classes: a different count than the checkpoint's gets a fresh zero-initialized head (logged).
    image_size: a different resolution resamples the position embedding. A file made at another
    resolution than `config` says is resampled too, with a warning naming both.
    config: needed only for checkpoints without a config (bare timm files): a ViTConfig, one of our
    preset names ('b/16') or a timm model name ('vit_base_patch16_224', 'deit_tiny_patch16_224').
    A name fixes the size of the network; what the file itself shows (input channels, class token,
    fc_norm, qkv biases) is taken from the file. A ViTConfig is used exactly as given.
    """
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if path.is_dir() and not weights.is_file():
        raise UserError(f"{path} has no {WEIGHTS_NAME}; point at a directory written by save_pretrained "
                        f"(or timm's save_for_hf) or at a checkpoint file")
    named = config if isinstance(config, str) else None
    if named is not None:
        config = named_config(named)
    values = _read_values(weights) if config is None and weights.is_file() else None
    cfg = config or _read_config(weights, values)
    state_dict = mae_encoder(_unwrap(_read_tensors(weights)))  # an MAE pretraining file: its encoder
    if cfg is None:
        raise UserError(f"{weights} carries no vitpipe config; pass config= a preset name "
                        f"({', '.join(list(PRESETS)[:3])}, ...), a timm model name or a ViTConfig")
    _refuse_unsupported(state_dict, source=str(weights))
    if named is not None:
        cfg = _fit_to_file(cfg, state_dict, source=f"{weights} (as {named})")
    file_grid = _file_grid(state_dict, cfg, source=str(weights))
    if image_size is not None:
        cfg = dataclasses.replace(cfg, image_size=image_size)
    if file_grid is not None and file_grid != cfg.grid_size:
        p = cfg.patch_size
        what = (f"{weights}: its position embedding is for a {file_grid[0]}x{file_grid[1]} patch grid "
                f"({file_grid[0] * p} px at patch {p}); resampled to the model's {cfg.grid_size[0]}x"
                f"{cfg.grid_size[1]} ({cfg.image_size} px)")
        if image_size is None:  # nobody asked for another resolution: the config and the file disagree
            log.warning("%s. To use it at the resolution it was trained at, ask for image size %d "
                        "(e.g. --data.image-size %d, or a config at that size)", what, file_grid[0] * p,
                        file_grid[0] * p)
        else:
            log.info("%s, as asked", what)
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


def _fit_to_file(cfg: ViTConfig, sd: Mapping[str, Any], *, source: str) -> ViTConfig:
    """`cfg` (from a name, which fixes only the size of the network) with what the file shows:
    input channels, class token, fc_norm, qkv biases, and the pooling these imply."""
    facts: dict[str, Any] = {"class_token": "cls_token" in sd, "fc_norm": "fc_norm.weight" in sd}
    w = sd.get("patch_embed.proj.weight")
    if isinstance(w, torch.Tensor) and w.ndim == 4:
        facts["in_chans"] = int(w.shape[1])
    if "blocks.0.attn.qkv.weight" in sd:
        facts["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    guessed = False
    if cfg.global_pool == "token" and not facts["class_token"]:
        facts["global_pool"] = "avg"  # the only pooling without a class token that vitpipe implements
    elif cfg.global_pool == "token" and facts["fc_norm"]:
        facts["global_pool"], guessed = "avg", True  # timm puts fc_norm after pooling only for 'avg' by default
    changed = {k: v for k, v in facts.items() if getattr(cfg, k) != v}
    if not changed:
        return cfg
    said = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    if guessed:
        log.warning("%s: the file has fc_norm weights, which timm uses with global_pool='avg'; loading it "
                    "with %s. Pass a ViTConfig (or a timm hub folder with model_args) if it pooled the "
                    "class token", source, said)
    else:
        log.info("%s: taken from the file: %s", source, said)
    return dataclasses.replace(cfg, **changed)


def read_class_names(path: str | Path) -> list[str] | None:
    """The class names an export records for its head (None: not recorded, e.g. a timm file)."""
    path = Path(path)
    return _class_names(_read_values(path / WEIGHTS_NAME if path.is_dir() else path))


# Data options an export's training recorded (export/train_config.yaml) that evaluation and
# fine-tuning should repeat: a model scores, and goes on learning from, pixels prepared as the ones
# it learned from.
TRAINED_PREPROCESSING = ("mean", "std", "eval_crop_pct")


def trained_preprocessing(source: str | Path) -> dict[str, Any]:
    """TRAINED_PREPROCESSING options from the training config saved beside an export, or from a
    timm hub folder's `pretrained_cfg` (mean, std, crop_pct); empty if there is neither (a bare
    timm file, a registry URI)."""
    from vitpipe.config import read_yaml

    path = Path(source)
    folder = path if path.is_dir() else path.parent
    found = folder / "train_config.yaml"
    if found.is_file():
        data = read_yaml(found).get("data")
        return {k: data[k] for k in TRAINED_PREPROCESSING if k in data} if isinstance(data, dict) else {}
    try:
        values = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}
    pretrained = values.get("pretrained_cfg") if isinstance(values, dict) and "architecture" in values else None
    if not isinstance(pretrained, dict):
        return {}
    out: dict[str, Any] = {}
    for ours, theirs in (("mean", "mean"), ("std", "std"), ("eval_crop_pct", "crop_pct")):
        value = pretrained.get(theirs)
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            out[ours] = [float(v) for v in value]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[ours] = float(value)
    return out


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
    """Names of the head's outputs: our export's `class_names`, or a timm hub config's `label_names`."""
    if not values:
        return None
    names = values.get("class_names") if values.get("format") == FORMAT else values.get("label_names")
    return [str(n) for n in names] if isinstance(names, list) else None


def named_config(name: str) -> ViTConfig:
    """The architecture a name stands for: one of our presets ('s/16') or a timm model name."""
    key = name.strip()
    return preset_config(key) if "/" in key else config_from_timm(key)  # every preset has a '/'


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
    sd = mae_encoder(_unwrap(sd))
    _refuse_unsupported(sd)
    old_grid = _file_grid(sd, cfg)
    prefix = 1 if cfg.class_token else 0
    out: StateDict = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue  # optimizer steps, epochs and other bookkeeping stored next to the weights
        if k == "patch_embed.proj.weight" and v.ndim == 2 and v.shape[1] == cfg.in_chans * cfg.patch_size ** 2:
            # early timm models patchified by reshape + Linear; same weights as a strided conv
            v = v.reshape(v.shape[0], cfg.in_chans, cfg.patch_size, cfg.patch_size)
        elif k == "pos_embed" and old_grid != cfg.grid_size and v.shape[-1] == cfg.embed_dim:
            # (a width mismatch is reported by load_state_dict, with every other wrong shape)
            v = resample_pos_embed(v, cfg.grid_size, num_prefix_tokens=prefix, old_grid=old_grid)
        elif k.startswith("head.") and cfg.num_classes == 0:
            continue
        out[k] = v
    return out


def _refuse_unsupported(sd: Mapping[str, Any], source: str = "timm checkpoint") -> None:
    bad = sorted(k for k in sd if any(re.search(p, k) for p in _UNSUPPORTED))
    if bad:
        features = sorted({why for k in bad for p, why in _UNSUPPORTED.items() if re.search(p, k)})
        raise UserError(f"{source} uses {', '.join(features)}, which vitpipe's ViT does not "
                        f"implement (keys: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}); "
                        f"use a plain ViT checkpoint")


def _file_grid(sd: Mapping[str, Any], cfg: ViTConfig, source: str = "checkpoint") -> tuple[int, int]:
    """The patch grid a state dict's position embedding is for, after checking that its prefix
    tokens are the ones `cfg` has; a layout vitpipe cannot read is a UserError naming it."""
    missing = [k for k in ("pos_embed", "patch_embed.proj.weight") if not isinstance(sd.get(k), torch.Tensor)]
    if missing:
        raise UserError(f"{source}: not a ViT checkpoint: missing {', '.join(missing)} "
                        f"(first keys: {', '.join(list(sd)[:5]) or 'none'})")
    pe = sd["pos_embed"]
    if pe.ndim != 3 or pe.shape[0] != 1:
        raise UserError(f"{source}: pos_embed is {tuple(pe.shape)}, not (1, tokens, width): not a ViT "
                        f"position embedding vitpipe reads")
    tokens, has_cls = int(pe.shape[1]), "cls_token" in sd
    if has_cls and not cfg.class_token:
        raise UserError(f"{source} has a class token (cls_token) but the model config has class_token=False; "
                        f"load it with class_token=True")
    if not has_cls and cfg.class_token:
        raise UserError(f"{source} has no class token (no cls_token; pos_embed holds {tokens} patch positions), "
                        f"as timm's class_token=False models; load it with class_token=False and "
                        f"global_pool='avg' (a timm hub folder's model_args, or a timm model name, do)")
    n = tokens - (1 if has_cls else 0)
    side = math.isqrt(max(n, 0))
    if side * side == n and n > 0:
        return side, side
    if has_cls and math.isqrt(tokens) ** 2 == tokens:
        raise UserError(f"{source}: pos_embed has {tokens} positions for the patches only, the class token has "
                        f"none (timm's no_embed_class=True, e.g. DeiT III); vitpipe's ViT adds a position "
                        f"to the class token: use a plain ViT checkpoint")
    raise UserError(f"{source}: pos_embed has {n} patch positions after {tokens - n} class token(s), not a "
                    f"square patch grid; vitpipe's ViT reads square grids (img_size h = w)")


_MAE_PRETRAINING = re.compile(r"^(decoder_|mask_token$)")


def mae_encoder(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder of an MAE pretraining checkpoint (facebookresearch/mae's layout, after unwrapping
    its {"model": ...}: the encoder under timm's names, plus `decoder_*` and `mask_token`); any
    other state dict is returned as it is. The decoder only served pretraining: dropped, said once."""
    if not any(k.startswith("decoder_") for k in sd):
        return dict(sd)
    dropped = sorted(k for k in sd if _MAE_PRETRAINING.match(k))
    log.warning("MAE pretraining checkpoint: taking its encoder, ignoring its decoder (%d tensors: "
                "decoder_*, mask_token)", len(dropped))
    return {k: v for k, v in sd.items() if not _MAE_PRETRAINING.match(k)}


def vitpipe_to_timm(sd: Mapping[str, torch.Tensor], cfg: ViTConfig) -> StateDict:
    """Our state dict -> one that timm's VisionTransformer(**timm_model_kwargs(cfg)) loads strictly."""
    if cfg.representation_size:
        raise UserError(f"representation_size={cfg.representation_size}: timm's VisionTransformer has "
                        f"no hidden pre-logits layer; call model.reset_classifier(n) (drops it, as for "
                        f"fine-tuning) before exporting to timm")
    return {k: v for k, v in _unwrap(sd).items()}


def timm_model_kwargs(cfg: ViTConfig) -> dict[str, Any]:
    """Keyword arguments for timm's VisionTransformer (or timm.create_model) with the same architecture.

    Use this rather than spelling the options by hand: `fc_norm` is always passed, because timm's
    default for it follows the pooling (fc_norm=None means True with global_pool='avg') while
    vitpipe's ViTConfig.fc_norm is False unless set.
    """
    if cfg.representation_size:
        raise UserError(f"representation_size={cfg.representation_size} has no timm equivalent; call "
                        f"model.reset_classifier(n) first (drops the pre-logits layer)")
    if cfg.layer_norm_eps != 1e-6:
        raise UserError(f"layer_norm_eps={cfg.layer_norm_eps}: timm's VisionTransformer uses 1e-6")
    return dict(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, global_pool=cfg.global_pool, class_token=cfg.class_token,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias, fc_norm=cfg.fc_norm, drop_rate=cfg.head_drop_rate, pos_drop_rate=cfg.drop_rate,
        proj_drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
    )


# timm architecture names whose network vitpipe builds: the plain ViTs and DeiT (same network,
# other weights), e.g. vit_base_patch16_384.augreg_in21k_ft_in1k or deit_tiny_patch16_224.
# Other names (clip, siglip, gap, reg4, dinov2, deit3, distilled...) differ in ways a name alone
# does not say, so they are refused rather than guessed.
_TIMM_NAME = re.compile(r"(vit|deit)_(tiny|small|base|large|huge)_patch(\d+)_(\d+)(?:\.[\w-]+)?")
_TIMM_SIZES = {"tiny": "ti", "small": "s", "base": "b", "large": "l", "huge": "h"}

# timm VisionTransformer options -> the value that leaves them off; vitpipe's ViT has none of them.
_TIMM_OFF = {
    "qk_norm": False, "scale_attn_norm": False, "scale_mlp_norm": False, "proj_bias": True,
    "init_values": None, "pos_embed": "learn", "no_embed_class": False, "reg_tokens": 0,
    "pre_norm": False, "final_norm": True, "pool_include_prefix": False, "dynamic_img_pad": False,
    "embed_norm_layer": None, "patch_drop_rate": 0.0,
}
# Options that change neither the weights nor the function at the trained input size.
_TIMM_NEUTRAL = {"weight_init", "fix_init", "dynamic_img_size", "pretrained_strict", "device", "dtype"}
_TIMM_LAYERS = {"norm_layer": (None, "layernorm"), "act_layer": (None, "gelu")}
# ViTConfig fields with no timm option of the same name, accepted as overrides too.
_OWN_ONLY = {"image_size", "head_drop_rate", "layer_norm_eps", "representation_size"}


def _timm_architecture_args(name: str) -> dict[str, Any]:
    """timm's own arguments for architecture `name` (what its registered entry point passes)."""
    m = _TIMM_NAME.fullmatch(name.strip())
    if not m:
        why = ("distilled DeiTs carry a distillation token" if "distilled" in name else
               "DeiT III uses layer scale and no class position" if name.startswith("deit3") else
               "expected a plain ViT or DeiT name such as vit_base_patch16_224 or deit_small_patch16_224")
        raise UserError(f"cannot build timm model {name!r} as a vitpipe ViT ({why}); or pass one of our preset "
                        f"names ({', '.join(list(PRESETS)[:4])}, ...) or a ViTConfig")
    family, size, patch, res = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    if family == "deit" and size not in ("tiny", "small", "base"):
        raise UserError(f"timm has no DeiT {size!r} ({name!r}); DeiT sizes are tiny, small and base")
    dims = PRESETS[f"{_TIMM_SIZES[size]}/16"]
    return dict(img_size=res, patch_size=patch, embed_dim=dims["embed_dim"], depth=dims["depth"],
                num_heads=dims["num_heads"])


def _square(value: Any, what: str, source: str) -> int:
    """An int, or an (h, w) pair with h == w, as timm accepts for img_size / patch_size."""
    if isinstance(value, bool):
        raise UserError(f"{source}: {what}={value!r} is not a size")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        if value[0] != value[1]:
            raise UserError(f"{source}: {what}={list(value)} is not square; vitpipe's ViT takes square inputs "
                            f"and patches only")
        return value[0]
    raise UserError(f"{source}: {what}={value!r} is not a size (an int or [h, w])")


def _config_from_timm_args(args: Mapping[str, Any], source: str) -> ViTConfig:
    """A ViTConfig from timm VisionTransformer keyword arguments, with timm's defaults and meaning
    (fc_norm=None means True for global_pool='avg', drop_rate is the head's dropout)."""
    args = dict(args)
    off = [f"{k}={args[k]!r}" for k, default in _TIMM_OFF.items() if k in args and args[k] != default]
    for k, allowed in _TIMM_LAYERS.items():
        v = args.get(k)
        if not (v is None or (isinstance(v, str) and v.lower() in [a for a in allowed if a])):
            off.append(f"{k}={v!r}")
    known = {"img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth",
             "num_heads", "mlp_ratio", "qkv_bias", "class_token", "fc_norm", "drop_rate", "pos_drop_rate",
             "proj_drop_rate", "attn_drop_rate", "drop_path_rate", *_TIMM_OFF, *_TIMM_NEUTRAL, *_TIMM_LAYERS,
             *_OWN_ONLY}
    off += [f"{k}={args[k]!r} (unknown option)" for k in sorted(set(args) - known)]
    if off:
        raise UserError(f"{source}: timm model options {', '.join(off)} have no equivalent in vitpipe's ViT; "
                        f"use a plain ViT (these options at their defaults)")
    pool = args.get("global_pool", "token")
    if pool not in GLOBAL_POOLS:
        raise UserError(f"{source}: global_pool={pool!r} (timm) is not implemented; vitpipe pools with "
                        f"{' or '.join(map(repr, GLOBAL_POOLS))}")
    fc_norm = args.get("fc_norm")
    values: dict[str, Any] = dict(
        image_size=_square(args.get("img_size", 224), "img_size", source),
        patch_size=_square(args.get("patch_size", 16), "patch_size", source),
        global_pool=pool, fc_norm=pool == "avg" if fc_norm is None else bool(fc_norm),  # timm's default
        head_drop_rate=args.get("drop_rate", 0.0),
        drop_rate=max(args.get("pos_drop_rate", 0.0), args.get("proj_drop_rate", 0.0)),
    )
    for k in ("in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
              "class_token", "attn_drop_rate", "drop_path_rate", *_OWN_ONLY):
        if k in args:
            values[k] = args[k]
    try:
        return ViTConfig(**values)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    except TypeError as e:  # a value of the wrong type, e.g. depth "12"
        raise UserError(f"{source}: timm model options do not form a ViT ({e})") from None


def config_from_timm(model_or_name: Any, **timm_kwargs: Any) -> ViTConfig:
    """Our ViTConfig for a timm ViT: a model instance, or an architecture name like
    'vit_base_patch16_224' / 'deit_tiny_patch16_224' with timm.create_model's keyword arguments
    (timm's meaning: global_pool='avg' implies fc_norm=True unless fc_norm=False is given)."""
    if isinstance(model_or_name, str):
        args = {**_timm_architecture_args(model_or_name), **timm_kwargs}
        if "image_size" in timm_kwargs:  # our name for img_size, accepted for older callers
            args["img_size"] = args.pop("image_size")
        return _config_from_timm_args(args, source=f"timm model {model_or_name!r}")
    m = model_or_name
    unsupported = [what for what, present in [
        ("register tokens", getattr(m, "num_reg_tokens", 0)),
        ("no_embed_class", getattr(m, "no_embed_class", False)),
        ("attention pooling", getattr(m, "attn_pool", None) is not None),
        (f"global_pool={getattr(m, 'global_pool', '')!r}", getattr(m, "global_pool", "") not in GLOBAL_POOLS),
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
        layer_norm_eps=block.norm1.eps, class_token=bool(getattr(m, "has_class_token", True)),
    )
    return ViTConfig(**{**values, **timm_kwargs})


def config_from_timm_hub(values: Mapping[str, Any], source: str = "config.json") -> ViTConfig:
    """Our ViTConfig for a timm hub config.json (as timm's save_for_hf writes it): the
    `architecture` with its `model_args` applied as timm.create_model applies them. Configs from
    before timm recorded model_args keep num_classes / global_pool / in_chans at the top level."""
    arch = values.get("architecture")
    args = values.get("model_args") or {}
    if not isinstance(arch, str) or not isinstance(args, Mapping):
        raise UserError(f"{source}: a timm config needs \"architecture\" (a name) and \"model_args\" (an object, "
                        f"or none); re-save it with timm's save_for_hf")
    args = dict(args)
    for key in ("num_classes", "global_pool", "in_chans"):
        if key not in args and key in values and not isinstance(values[key], bool):
            args[key] = values[key]
    try:
        return config_from_timm(arch, **args)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def load_timm_checkpoint(path: str | Path, cfg: ViTConfig) -> StateDict:
    """Read a timm ViT checkpoint (.safetensors, or .pt/.pth with weights_only=True) in our layout.

    The result goes straight into VisionTransformer(cfg).load_state_dict, or load_state_dict(model, sd).
    """
    return timm_to_vitpipe(_read_tensors(Path(path)), cfg)


# ---------------------------------------------------------------------------------------------
# Ours -> a timm hub folder (what `vitpipe export --format timm-hub` writes)

# timm architectures whose names we write when a model is one of them; any other model is written
# under the architecture of its size (model_args carry every field, and override the name's).
_TIMM_REGISTERED = {
    "vit_tiny_patch16_224", "vit_tiny_patch16_384", "vit_small_patch32_224", "vit_small_patch32_384",
    "vit_small_patch16_224", "vit_small_patch16_384", "vit_small_patch8_224", "vit_base_patch32_224",
    "vit_base_patch32_384", "vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch8_224",
    "vit_large_patch32_224", "vit_large_patch32_384", "vit_large_patch16_224", "vit_large_patch16_384",
    "vit_large_patch14_224", "vit_huge_patch14_224",
}


def timm_architecture(cfg: ViTConfig) -> str:
    """The timm architecture name to record for `cfg`: its own (vit_small_patch16_384) when timm
    registers one, else the entry point of its size, else vit_base_patch16_224; the recorded
    model_args override every dimension either way."""
    dims = (cfg.embed_dim, cfg.depth, cfg.num_heads)
    size = next((name for name, short in _TIMM_SIZES.items()
                 if tuple(PRESETS[f"{short}/16"][k] for k in ("embed_dim", "depth", "num_heads")) == dims), None)
    exact = f"vit_{size}_patch{cfg.patch_size}_{cfg.image_size}"
    if exact in _TIMM_REGISTERED:
        return exact
    return {"huge": "vit_huge_patch14_224", None: "vit_base_patch16_224"}.get(size, f"vit_{size}_patch16_224")


def timm_hub_config(cfg: ViTConfig, *, class_names: list[str] | None = None,
                    preprocessing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of a timm hub folder for a model of `cfg`, in the layout timm's save_for_hf
    writes: `timm.create_model("local-dir:FOLDER", pretrained=True)` rebuilds exactly this model.
    `preprocessing`: mean, std and eval_crop_pct the model was trained with (pretrained_cfg)."""
    kwargs = timm_model_kwargs(cfg)
    args = {k: v for k, v in kwargs.items() if "drop" not in k or v}  # regularisers only where set
    args["img_size"] = [cfg.image_size, cfg.image_size]
    prep = dict(preprocessing or {})
    chans = cfg.in_chans
    mean = list(prep.get("mean") or (0.5,))
    std = list(prep.get("std") or (0.5,))
    pretrained_cfg = {
        "tag": "vitpipe",
        "custom_load": False,
        "input_size": [chans, cfg.image_size, cfg.image_size],
        "fixed_input_size": True,
        "interpolation": "bilinear",  # vitpipe's eval resize (torchvision's default)
        "crop_pct": float(prep.get("eval_crop_pct", 1.0)),
        "crop_mode": "center",
        "mean": mean * chans if len(mean) == 1 else mean,
        "std": std * chans if len(std) == 1 else std,
        "num_classes": cfg.num_classes,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    config: dict[str, Any] = {
        "architecture": timm_architecture(cfg),
        "num_classes": cfg.num_classes,
        "num_features": cfg.embed_dim,
        "global_pool": cfg.global_pool,
    }
    if class_names is not None and len(class_names) == cfg.num_classes:
        config["label_names"] = [str(n) for n in class_names]
    config["model_args"] = args
    config["pretrained_cfg"] = pretrained_cfg
    return config


def save_timm_hub(model: VisionTransformer, out_dir: str | Path, *,
                  preprocessing: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as a timm hub folder: out_dir/model.safetensors (timm's state dict) +
    out_dir/config.json (`timm_hub_config`). timm loads it with
    `timm.create_model("local-dir:out_dir", pretrained=True)`, vitpipe with load_pretrained(out_dir)."""
    config = timm_hub_config(model.cfg, class_names=getattr(model, "class_names", None),
                             preprocessing=preprocessing)
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in vitpipe_to_timm(model.state_dict(), model.cfg).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out
