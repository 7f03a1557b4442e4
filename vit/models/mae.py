"""Masked Autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

The encoder is vitpipe's VisionTransformer, run on the visible patches only
(`VisionTransformer.forward_tokens(tokens, keep)`); a lightweight decoder sees the encoded visible
tokens plus a shared mask token at every masked position, each with its own (decoder) position
embedding, and predicts the pixels of every patch. Torch only, like vit.models.vit: which patches
are masked is decided outside (the objective draws the noise from the run's seeded generator) and
the loss is computed outside too (vit/objectives/mae.py).

    image (B, C, H, W) -> patch_embed -> keep the K = N (1 - mask_ratio) patches of lowest noise
      -> encoder blocks on 1 + K tokens                                   (B, 1 + K, D)
      -> decoder_embed, mask_token at the N - K others, unshuffle, + decoder_pos_embed
      -> decoder blocks -> decoder_norm -> decoder_pred                   (B, N, P*P*C)

Parameter names follow facebookresearch/mae (`decoder_embed`, `mask_token`, `decoder_pos_embed`,
`decoder_blocks`, `decoder_norm`, `decoder_pred`), the encoder sits under `vit.`; exporting the
encoder is taking the `vit.` keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from vit.models.vit import Block, VisionTransformer, ViTConfig, block_macs
from vitpipe.errors import UserError


@dataclass
class DecoderConfig:
    """The MAE decoder; it only exists during pretraining, so it can be narrow and shallow."""

    embed_dim: int = 512     # decoder width; the paper's 512 is ~9% of ViT-L's FLOPs per token
    depth: int = 8           # decoder blocks; 1 fine-tunes as well (paper Table 1a), 8 gives better linear probes
    num_heads: int = 16      # attention heads of the decoder blocks
    mlp_ratio: float = 4.0   # MLP hidden width / embed_dim


# Decoder defaults by encoder preset: the paper's 512 x 8 for the ImageNet-sized models, tiny ones
# for the 32-pixel CPU presets (a 512-wide decoder would be 8x the micro encoder's width).
DECODER_PRESETS: dict[str, DecoderConfig] = {
    "micro/4": DecoderConfig(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0),
    "ti/4": DecoderConfig(embed_dim=128, depth=2, num_heads=4),
    "s/4": DecoderConfig(embed_dim=128, depth=4, num_heads=4),
}


def decoder_for(preset: str, **overrides) -> DecoderConfig:
    """The default decoder of an encoder preset ('b/16' -> 512 x 8), with fields overridden."""
    key = preset.strip().lower().removeprefix("vit-").removeprefix("vit_")
    base = DECODER_PRESETS.get(key, DecoderConfig())
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees at `mask_ratio` (the paper's int(N * (1 - ratio)))."""
    return int(num_patches * (1 - mask_ratio))


def sincos_pos_embed(grid: tuple[int, int], dim: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + h*w, dim) fixed 2-D sine-cosine position embedding (MAE, MoCo v3); prefix rows 0.

    Half the channels encode the row, half the column, each as sin/cos at dim/4 frequencies.
    """
    if dim % 4:
        raise UserError(f"a 2-D sine-cosine position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for pos in (cols.flatten(), rows.flatten()):  # MAE's order: width coordinate first
        angles = pos[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    grid_embed = torch.cat(parts, dim=1).float()
    return torch.cat([torch.zeros(num_prefix_tokens, dim), grid_embed]).unsqueeze(0)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), patches in row-major order, pixels (row, col, channel) inside."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of patchify for a square grid: (B, N, P*P*C) -> (B, C, H, W)."""
    b, n, _ = patches.shape
    p, side = patch_size, int(round(n ** 0.5))
    x = patches.reshape(b, side, side, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, side * p, side * p)


class MaskedAutoencoder(nn.Module):
    """A ViT encoder (`.vit`) with an MAE decoder; `forward(images, noise)` -> (pred, mask).

    `noise` (B, N): per patch, lowest first are kept (the objective draws it uniform from the run's
    generator, so masks are per sample, reproducible and the same after a resume). `pred` (B, N,
    P*P*C) are the predicted pixels of every patch; `mask` (B, N) is 1 where the patch was hidden.
    """

    def __init__(self, vit: VisionTransformer, decoder: DecoderConfig, *, mask_ratio: float = 0.75) -> None:
        super().__init__()
        cfg = vit.cfg
        self.vit = vit
        self.mask_ratio = mask_ratio
        self.decoder_cfg = decoder
        self.num_patches = vit.patch_embed.num_patches
        self.num_keep = num_visible(self.num_patches, mask_ratio)
        if not 0 < self.num_keep < self.num_patches:
            raise UserError(f"mae.mask_ratio={mask_ratio} leaves {self.num_keep} of {self.num_patches} patches "
                            f"visible; it needs at least one visible and one masked patch, e.g. 0.75")
        d = decoder.embed_dim
        block_cfg = dataclasses.replace(cfg, embed_dim=d, depth=decoder.depth, num_heads=decoder.num_heads,
                                        mlp_ratio=decoder.mlp_ratio, drop_rate=0.0, attn_drop_rate=0.0,
                                        drop_path_rate=0.0, num_classes=0)
        self.decoder_embed = nn.Linear(cfg.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        # Learnable, started at MAE's fixed sine-cosine values: a fixed one as a frozen parameter
        # would be a special case for every ZeRO stage, and the learned one trains as well here.
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(cfg.grid_size, d, vit.num_prefix_tokens))
        self.decoder_blocks = nn.ModuleList(Block(block_cfg, drop_path_rate=0.0) for _ in range(decoder.depth))
        self.decoder_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.decoder_pred = nn.Linear(d, cfg.patch_size ** 2 * cfg.in_chans)
        self._init_decoder()
        with torch.no_grad():  # the encoder starts from the same sine-cosine grid (MAE keeps it fixed)
            vit.pos_embed.copy_(sincos_pos_embed(cfg.grid_size, cfg.embed_dim, vit.num_prefix_tokens))

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("vit"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)  # MAE's init of the decoder's linear layers
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = noise.shape
        ids_shuffle = torch.argsort(noise, dim=1)        # ascending: the first num_keep are visible
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        keep = ids_shuffle[:, :self.num_keep]
        latent = self.vit.forward_tokens(self.vit.patch_embed(images), keep=keep)  # (B, 1 + K, D)

        x = self.decoder_embed(latent)
        prefix = self.vit.num_prefix_tokens
        hidden = self.mask_token.expand(b, n - self.num_keep, -1).to(x.dtype)
        x_ = torch.cat([x[:, prefix:], hidden], dim=1)   # in shuffled order: visible, then masked
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # image order
        x = torch.cat([x[:, :prefix], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, prefix:]

        mask = torch.ones(b, n, device=images.device)
        mask[:, :self.num_keep] = 0
        return pred, torch.gather(mask, 1, ids_restore)

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{name}" for name in self.vit.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    def flops_per_image(self, training: bool = False) -> int:
        """Matmul FLOPs of one image: the encoder on the visible patches, then the decoder on all."""
        cfg, dec = self.vit.cfg, self.decoder_cfg
        encoder = self.vit.flops_per_image(encoded_patches=self.num_keep)
        n = self.num_patches + self.vit.num_prefix_tokens
        decoder = 2 * ((self.num_keep + self.vit.num_prefix_tokens) * cfg.embed_dim * dec.embed_dim
                       + dec.depth * block_macs(n, dec.embed_dim, int(dec.embed_dim * dec.mlp_ratio))
                       + self.num_patches * dec.embed_dim * cfg.patch_size ** 2 * cfg.in_chans)
        return 3 * (encoder + decoder) if training else encoder + decoder


def decoder_num_params(cfg: ViTConfig, decoder: DecoderConfig) -> int:
    """Parameter count of the decoder an encoder of `cfg` gets, without building it (memory checks)."""
    d, hidden = decoder.embed_dim, int(decoder.embed_dim * decoder.mlp_ratio)
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    n = cfg.grid_size[0] * cfg.grid_size[1] + 1
    return (cfg.embed_dim * d + d) + d + n * d + decoder.depth * block + 2 * d \
        + (d * cfg.patch_size ** 2 * cfg.in_chans + cfg.patch_size ** 2 * cfg.in_chans)
