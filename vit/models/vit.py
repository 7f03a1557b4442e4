"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., ICLR 2021).

One file, torch only, so it runs anywhere a tensor does: a tiny preset runs forward on a laptop CPU,
ViT-H/14 trains under DeepSpeed. Parallelism is applied from the outside (vit/pretrain), never here.

    image (B, C, H, W)
      -> patch_embed: P x P patches, linearly projected (a strided conv)   (B, N, D)
      -> prepend cls_token, add pos_embed (learned, 1-D over the patch grid) (B, 1+N, D)
         (class_token=False: no cls_token, patch tokens only, as timm's class_token=False)
      -> blocks: depth x [x + attn(norm1(x)); x + mlp(norm2(x))]           (pre-norm)
      -> norm                                                               = forward_features
      -> pool (class token or mean of patch tokens) -> pre_logits -> head   = forward_head

Parameter names follow timm's `VisionTransformer` (`blocks.0.attn.qkv.weight`, ...) so its checkpoints
map onto this model with a small, pure filter (vit/models/weights.py) and tools written for timm's layout keep
working.

    model = create_model("s/16", num_classes=10)
    logits = model(images)                       # (B, 10)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitpipe.errors import UserError

GLOBAL_POOLS = ("token", "avg")


@dataclass
class ViTConfig:
    """Everything that fixes the architecture; saved as config.json next to the weights."""

    image_size: int = 224          # input side in pixels; larger sees finer detail at O(N^2) attention cost
    patch_size: int = 16           # pixels per patch side; smaller = more tokens = more accurate and slower
    in_chans: int = 3              # 1 for grayscale scans, >3 for multispectral images
    num_classes: int = 1000        # size of the label set; 0 = no head, the model returns pooled features
    embed_dim: int = 768           # token width; the main knob of model size with depth
    depth: int = 12                # number of transformer blocks
    num_heads: int = 12            # attention heads; keep embed_dim / num_heads at 64 for fast kernels
    mlp_ratio: float = 4.0         # MLP hidden width / embed_dim; 4 in the paper
    qkv_bias: bool = True          # False only to match checkpoints trained without q/k/v biases
    global_pool: str = "token"     # 'token' = class token (paper); 'avg' = mean of patch tokens, often better when fine-tuning
    fc_norm: bool | None = None    # LayerNorm after pooling instead of before it; None = as timm: True for global_pool='avg' (MAE/BEiT fine-tunes), else False
    representation_size: int | None = None  # hidden tanh layer before the head: the paper's pretraining head; None = linear head
    drop_rate: float = 0.0         # dropout after the position embedding and in attention/MLP outputs; paper: 0.1 on ImageNet-1k
    attn_drop_rate: float = 0.0    # dropout on attention weights; rarely helps, kept for reproducing recipes that use it
    drop_path_rate: float = 0.0    # stochastic depth, rising linearly to this at the last block; ~0.1 (S) to 0.4 (L) for DeiT-style training
    head_drop_rate: float = 0.0    # dropout on the pooled features right before the classifier; fine-tuning regularizer
    layer_norm_eps: float = 1e-6   # LayerNorm epsilon; 1e-6 matches the paper's JAX code and timm
    class_token: bool = True       # False: no class token, only patch tokens (timm class_token=False); needs global_pool='avg'

    def __post_init__(self) -> None:
        checks = [
            (self.image_size > 0 and self.patch_size > 0 and self.image_size % self.patch_size == 0,
             f"image_size={self.image_size} must be a positive multiple of patch_size={self.patch_size}, "
             f"e.g. image_size={max(1, round(self.image_size / max(self.patch_size, 1))) * self.patch_size}"),
            (self.in_chans > 0, f"in_chans={self.in_chans} must be > 0, e.g. 3 for RGB"),
            (self.num_classes >= 0, f"num_classes={self.num_classes} must be >= 0 (0 = features only)"),
            (self.depth > 0, f"depth={self.depth} must be > 0"),
            (self.num_heads > 0 and self.embed_dim % self.num_heads == 0,
             f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}, "
             f"e.g. num_heads={max(1, self.embed_dim // 64)} for 64-wide heads"),
            (self.mlp_ratio > 0, f"mlp_ratio={self.mlp_ratio} must be > 0, e.g. 4.0"),
            (self.global_pool in GLOBAL_POOLS,
             f"global_pool={self.global_pool!r} must be one of {', '.join(map(repr, GLOBAL_POOLS))}"),
            (self.class_token or self.global_pool != "token",
             "global_pool='token' pools the class token, and class_token=False has none; set global_pool='avg'"),
        ]
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate", "head_drop_rate"):
            rate = getattr(self, name)
            checks.append((0.0 <= rate < 1.0, f"{name}={rate} must be in [0, 1), e.g. 0.1"))
        for ok, message in checks:
            if not ok:
                raise UserError(f"ViTConfig: {message}")
        if not self.representation_size:  # 0 and None both mean "no hidden pre-logits layer"
            self.representation_size = None
        if self.fc_norm is None:  # resolved once, so config.json and timm_model_kwargs say it outright
            self.fc_norm = self.global_pool == "avg"

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        """Build from a config.json dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"ViTConfig: unknown field(s) {', '.join(unknown)}; "
                            f"known fields are {', '.join(sorted(known))}")
        return cls(**values)


def _size(dim: int, depth: int, heads: int) -> dict[str, int]:
    return {"embed_dim": dim, "depth": depth, "num_heads": heads}


_SIZES = {  # Table 1 of the paper, plus DeiT's Ti and S
    "ti": _size(192, 12, 3),
    "s": _size(384, 12, 6),
    "b": _size(768, 12, 12),
    "l": _size(1024, 24, 16),
    "h": _size(1280, 32, 16),
}

# Named architectures: "b/16" = ViT-Base with 16x16 patches at 224x224. Override any field through
# create_model(name, **overrides). The /4 presets take 32x32 images (CIFAR, the packaged digits) so
# that a real model trains on a CPU; micro/4 is for tests and the CPU demo.
PRESETS: dict[str, dict[str, Any]] = {
    **{f"{size}/{patch}": {**dims, "patch_size": patch, "image_size": 224}
       for size, dims in _SIZES.items() for patch in (32, 16, 14)},
    "ti/4": {**_SIZES["ti"], "patch_size": 4, "image_size": 32, "num_classes": 10},
    "s/4": {**_SIZES["s"], "patch_size": 4, "image_size": 32, "num_classes": 10},
    "micro/4": {**_size(64, 4, 4), "mlp_ratio": 2.0, "patch_size": 4, "image_size": 32, "num_classes": 10},
}


def preset_config(name: str, **overrides: Any) -> ViTConfig:
    """The ViTConfig of a named preset ('b/16', 'ViT-B/16', 'micro/4'), with fields overridden."""
    key = name.strip().lower().removeprefix("vit-").removeprefix("vit_")
    if key not in PRESETS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"model {name!r}: unknown override(s) {', '.join(unknown)}; "
                        f"overridable fields are {', '.join(sorted(known))}")
    return ViTConfig(**{**PRESETS[key], **overrides})


def create_model(name: str, **overrides: Any) -> VisionTransformer:
    """Build a freshly initialized model from a preset name, e.g. create_model('s/16', num_classes=10)."""
    return VisionTransformer(preset_config(name, **overrides))


# ---------------------------------------------------------------------------------------------
# Building blocks


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and project each to a D-dim token (one strided conv)."""

    def __init__(self, *, image_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.image_size = image_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"input is {h}x{w} but the model expects {self.image_size}x{self.image_size}; "
                             f"resize the images or call model.set_image_size({h})")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention; the softmax(QK^T)V core is SDPA, so GPUs get flash attention."""

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # one fused matmul for q, k and v
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (b, n, 3*d) -> (3, b, heads, n, head_dim)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, d)  # (b, heads, n, head_dim) -> (b, n, d)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """The position-wise feed-forward layer: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, *, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ViTConfig, *, drop_path_rate: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias,
                              attn_drop=cfg.attn_drop_rate, proj_drop=cfg.drop_rate)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), drop=cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PreLogits(nn.Module):
    """The paper's pretraining head hidden layer: Linear -> tanh (dropped when fine-tuning)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


# ---------------------------------------------------------------------------------------------
# The model


class VisionTransformer(nn.Module):
    """ViT image classifier. Build with create_model(name) or VisionTransformer(ViTConfig(...))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg = dataclasses.replace(cfg)  # own copy: set_image_size/reset_classifier update it
        dim = cfg.embed_dim
        self.grad_checkpointing = False
        self.num_prefix_tokens = 1 if cfg.class_token else 0  # the class token, if any
        self.patch_embed = PatchEmbed(image_size=cfg.image_size, patch_size=cfg.patch_size,
                                      in_chans=cfg.in_chans, embed_dim=dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg, drop_path_rate=rate) for rate in rates)
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps) if cfg.fc_norm else nn.Identity()
        self.pre_logits: nn.Module = nn.Identity()
        self.head_drop = nn.Dropout(cfg.head_drop_rate)
        self.head: nn.Module = nn.Identity()
        self._build_head(cfg.num_classes, cfg.representation_size)
        # Names of the head's classes in output order, where known (set by training before export,
        # read back from an export): lets evaluation refuse data whose classes differ.
        self.class_names: list[str] | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """Re-initialize every parameter as timm does (truncated normal, zero head); for training from scratch."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.Conv2d)):
                module.reset_parameters()  # timm keeps PyTorch's defaults for these
        self._zero_head()

    def _zero_head(self) -> None:
        # A zero head starts every class at equal logits, so fine-tuning does not begin by undoing noise.
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _build_head(self, num_classes: int, representation_size: int | None) -> None:
        ref = self.pos_embed  # new layers go to the model's device and dtype
        dim = self.cfg.embed_dim
        if representation_size:
            self.pre_logits = PreLogits(dim, representation_size).to(ref)
            nn.init.trunc_normal_(self.pre_logits.fc.weight, std=0.02)
            nn.init.zeros_(self.pre_logits.fc.bias)
            dim = representation_size
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(dim, num_classes).to(ref) if num_classes > 0 else nn.Identity()
        self._zero_head()
        self.cfg.num_classes = num_classes
        self.cfg.representation_size = representation_size or None

    # -- forward --------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, (B, 1 + N, D) with the class token first ((B, N, D) with
        class_token=False); for probes and dense tasks."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        return self.norm(self._run_blocks(x))

    def forward_tokens(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder on patch embeddings instead of an image, for self-supervised pretraining.

        `tokens` (B, N, D) come from `patch_embed`, possibly edited (masked patch prediction swaps
        some for a mask embedding). With `keep` (B, K) patch indices only those K patches are
        encoded, each with its own position (MAE: the encoder never sees the masked ones, so a
        step costs about K/N of a full one). Returns (B, 1 + K, D) after the final norm, class token
        first ((B, K, D) with class_token=False); with keep=None the same as forward_features on the
        image the tokens came from.
        """
        x = tokens + self.pos_embed[:, self.num_prefix_tokens:]
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if self.cls_token is not None:
            prefix = self.cls_token + self.pos_embed[:, :self.num_prefix_tokens]
            x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm(self._run_blocks(self.pos_drop(x)))

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute each block in backward: activation memory O(1) in depth for ~30% more compute.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from forward_features -> logits, or the pooled features the head sees if pre_logits."""
        if self.cfg.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            x = x[:, 0]
        x = self.head_drop(self.pre_logits(self.fc_norm(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- adapting a model -----------------------------------------------------------------------

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, *,
                         keep_pre_logits: bool = False) -> None:
        """Put a fresh zero-initialized head on the model, e.g. before fine-tuning on a new label set.

        As in the paper, fine-tuning replaces the whole pretraining head, the hidden tanh layer
        included, by one linear layer; keep_pre_logits=True keeps that layer instead.
        """
        if num_classes < 0:
            raise UserError(f"num_classes={num_classes} must be >= 0 (0 = features only)")
        self.class_names = None  # a new head: its classes are whatever it is trained on next
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise UserError(f"global_pool={global_pool!r} must be one of "
                                f"{', '.join(map(repr, GLOBAL_POOLS))}")
            if global_pool == "token" and self.cls_token is None:
                raise UserError("global_pool='token' pools the class token, and this model has none "
                                "(class_token=False); keep global_pool='avg'")
            self.cfg.global_pool = global_pool
        if keep_pre_logits and self.cfg.representation_size:
            self.head = (nn.Linear(self.cfg.representation_size, num_classes).to(self.pos_embed)
                         if num_classes > 0 else nn.Identity())
            self._zero_head()
            self.cfg.num_classes = num_classes
        else:
            self._build_head(num_classes, None)

    @torch.no_grad()
    def set_image_size(self, image_size: int) -> None:
        """Change the input resolution, e.g. fine-tune at 384 after pretraining at 224.

        The position embedding is resampled in place by 2-D interpolation over the patch grid (the
        paper's recipe); the class token's embedding is kept as is. pos_embed becomes a new Parameter
        (its shape changes), so call this before building the optimizer.
        """
        from_grid = self.patch_embed.grid_size
        new_cfg = dataclasses.replace(self.cfg, image_size=image_size)  # validates the new size
        if new_cfg.grid_size != from_grid:
            pos_embed = resample_pos_embed(self.pos_embed, new_cfg.grid_size,
                                           num_prefix_tokens=self.num_prefix_tokens, old_grid=from_grid)
            self.pos_embed = nn.Parameter(pos_embed, requires_grad=self.pos_embed.requires_grad)
        self.patch_embed.image_size = image_size
        self.cfg.image_size = image_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory: recompute block activations in backward (for big models or batches)."""
        self.grad_checkpointing = enable

    # -- facts about the model ------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Parameter names an optimizer should not decay (the trainer also skips every 1-D param)."""
        return {"pos_embed", "cls_token"}

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the position embedding and class token (no FLOPs)."""
        skip = {"pos_embed", "cls_token"} if exclude_embeddings else set()
        return sum(p.numel() for name, p in self.named_parameters() if name not in skip)

    def flops_per_image(self, training: bool = False, *, encoded_patches: int | None = None) -> int:
        """Matmul FLOPs (2 per multiply-add) of one image's forward, or forward+backward (3x) if training.

        Counts every matmul/conv and attention's QK^T and AV; norms, softmax and GELU are left out,
        the usual convention for MFU. ViT-B/16 at 224: 35.1 GFLOP forward, 105 GFLOP training.
        `encoded_patches`: how many patches the blocks see (MAE's visible ones); default all.
        """
        cfg = self.cfg
        n_patches = self.patch_embed.num_patches
        n = (n_patches if encoded_patches is None else encoded_patches) + self.num_prefix_tokens
        d = cfg.embed_dim
        patch = n_patches * (cfg.in_chans * cfg.patch_size ** 2) * d
        block = block_macs(n, d, int(d * cfg.mlp_ratio))
        head_in = d
        head = 0
        if cfg.representation_size:
            head += d * cfg.representation_size
            head_in = cfg.representation_size
        head += head_in * cfg.num_classes
        forward = 2 * (patch + cfg.depth * block + head)
        return 3 * forward if training else forward


def block_macs(tokens: int, dim: int, hidden: int) -> int:
    """Multiply-adds of one transformer block over `tokens` tokens: qkv, QK^T, AV, proj, MLP."""
    n, d = tokens, dim
    return n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1, *,
                       old_grid: tuple[int, int] | None = None, interpolation: str = "bicubic",
                       antialias: bool = True) -> torch.Tensor:
    """Position embedding for a new patch grid: bicubic 2-D interpolation, prefix tokens kept.

    pos_embed is (1, prefix + h*w, D); old_grid defaults to a square grid. Same grid -> returned as is.
    Lives here so set_image_size needs no other module; vit.models.weights re-exports it.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, dim), got {tuple(pos_embed.shape)}")
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_grid)
        if side * side != n_grid:
            raise ValueError(f"pos_embed has {n_grid} grid tokens, not a square grid; pass old_grid=(h, w)")
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != n_grid:
        raise ValueError(f"old_grid={old_grid} has {old_grid[0] * old_grid[1]} tokens but pos_embed has "
                         f"{n_grid} after {num_prefix_tokens} prefix token(s)")
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    # interpolate wants (N, C, H, W) and float32 (bicubic is not implemented for half types on CPU)
    grid = grid.float().reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode=interpolation, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
