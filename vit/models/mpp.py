"""Masked patch prediction: the self-supervised pretraining of the ViT paper (Dosovitskiy et al.
2021, section 4.6 and appendix B.1.2), a BERT-style objective on patch embeddings.

Some patch embeddings are corrupted before the encoder (replaced by a learned mask embedding, or by
another patch's embedding, or kept), and a linear head on each corrupted patch's output token
predicts that patch's mean colour, quantised to `bits` per channel (3 bits of RGB: 512 classes).
Which patches, and how, is drawn outside (vit/objectives/mpp.py); this module only applies it.
"""

from __future__ import annotations

import torch
from torch import nn

from vit.models.vit import VisionTransformer


def colour_classes(bits: int, channels: int) -> int:
    """How many mean colours a patch can have at `bits` per channel: (2^bits)^channels."""
    return (2 ** bits) ** channels


class MaskedPatchPredictor(nn.Module):
    """A ViT encoder (`.vit`) with a mask embedding and a colour head; `forward(images, source, masked)`.

    `source` (B, N) long: for each patch, the index (into the batch's B*N patches, flattened) of the
    embedding that goes in its place (its own index where it stays). `masked` (B, N) bool: replace
    it by the mask embedding instead. Returns the colour logits of every patch token, (B, N, classes).
    """

    def __init__(self, vit: VisionTransformer, *, num_classes: int) -> None:
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.cfg.embed_dim))
        self.mpp_head = nn.Linear(vit.cfg.embed_dim, num_classes)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.mpp_head.weight, std=0.02)
        nn.init.zeros_(self.mpp_head.bias)

    def forward(self, images: torch.Tensor, source: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.patch_embed(images)
        b, n, d = tokens.shape
        tokens = tokens.reshape(b * n, d)[source.reshape(-1)].reshape(b, n, d)
        tokens = torch.where(masked.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        out = self.vit.forward_tokens(tokens)
        return self.mpp_head(out[:, self.vit.num_prefix_tokens:])

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{name}" for name in self.vit.no_weight_decay()} | {"mask_token"}

    def flops_per_image(self, training: bool = False) -> int:
        cfg = self.vit.cfg
        head = 2 * self.vit.patch_embed.num_patches * cfg.embed_dim * self.mpp_head.out_features
        return self.vit.flops_per_image(training) + (3 * head if training else head)
