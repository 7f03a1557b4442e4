"""Masked patch prediction, the ViT paper's self-supervised objective (section 4.6, appendix B.1.2).

    vitpipe pretrain vit/recipes/digits_mpp_pretrain.yaml
    vitpipe pretrain run.yaml --train.objective mpp --mpp.mask-ratio 0.5

Per sample, `mask_ratio` of the patch embeddings are corrupted (by the micro-batch's seed, so a
resumed run corrupts the same ones): 80% replaced by a learned mask embedding, 10% by a random
other patch's embedding, 10% kept as they are. A linear head on each corrupted patch's output
token predicts that patch's mean colour at `bits` per channel (3 bits of RGB: 512 classes; of a
grayscale image: 8), by cross-entropy. The model is vit.models.mpp.MaskedPatchPredictor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from vit.objectives.mae import open_fraction
from vitpipe.config import StageConfig


MPPMaskRatio = open_fraction("mpp.mask_ratio", "the fraction of patches corrupted", 0.5)


class MPPSection(StageConfig):
    """Options of --train.objective mpp; the defaults are the paper's."""

    mask_ratio: MPPMaskRatio = Field(
        0.5, description="fraction of patches corrupted per sample (the paper: 50%)")
    replace_mask: float = Field(0.8, ge=0, le=1, description="of the corrupted, the fraction replaced by the "
                                                             "learned mask embedding")
    replace_random: float = Field(0.1, ge=0, le=1, description="of the corrupted, the fraction replaced by a random "
                                                               "other patch's embedding; the rest stay unchanged")
    bits: int = Field(3, ge=1, le=4, description="bits per channel of the predicted mean colour (3: 512 RGB "
                                                 "colours, 8 grey levels)")

    @model_validator(mode="after")
    def _shares(self) -> MPPSection:
        if self.replace_mask + self.replace_random > 1 + 1e-9:
            raise ValueError(f"mpp.replace_mask={self.replace_mask} + mpp.replace_random={self.replace_random} "
                             f"exceed 1; they split the corrupted patches, e.g. 0.8 and 0.1")
        return self


def mean_colour_classes(images: torch.Tensor, patch_size: int, bits: int, mean, std) -> torch.Tensor:
    """(B, N) class of each patch's mean colour: per channel, the mean in [0, 1] cut into 2^bits levels."""
    from vit.models.mae import patchify

    b, c = images.shape[:2]
    mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
    pixels = images.float() * std + mean  # back to [0, 1]
    per_channel = patchify(pixels, patch_size).reshape(b, -1, patch_size * patch_size, c).mean(dim=2)
    levels = 2 ** bits
    q = (per_channel * levels).floor().clamp(0, levels - 1).long()        # (B, N, C)
    weights = levels ** torch.arange(c, device=images.device)
    return (q * weights).sum(dim=-1)


class MPPObjective:
    name = "mpp"
    needs_labels = False
    export_prefix = "vit."

    def __init__(self, section: MPPSection, *, mean, std, channels: int) -> None:
        self.section, self.mean, self.std, self.channels = section, mean, std, channels
        self._generators: dict[torch.device, torch.Generator] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> MPPObjective:
        mean, std = cfg.data.channel_stats()
        return cls(getattr(cfg, "mpp", None) or MPPSection(), mean=mean, std=std, channels=cfg.data.channels)

    def check(self, vit_cfg, *, batch_size: int, memory_bytes: int | None) -> None:
        from vitpipe.errors import UserError

        n = vit_cfg.grid_size[0] * vit_cfg.grid_size[1]
        if round(n * self.section.mask_ratio) < 1:
            raise UserError(f"mpp.mask_ratio={self.section.mask_ratio} corrupts none of the {n} patches; "
                            f"raise it, e.g. 0.5")

    def wrap(self, vit):
        from vit.models.mpp import MaskedPatchPredictor, colour_classes

        return MaskedPatchPredictor(vit, num_classes=colour_classes(self.section.bits, vit.cfg.in_chans))

    def corruption(self, batch: int, num_patches: int, device: torch.device, seed: int):
        """(corrupted, source, masked) for a batch, from `seed` alone; see MaskedPatchPredictor."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(seed)
        s = self.section
        count = max(1, round(num_patches * s.mask_ratio))  # the same number in every sample
        order = torch.rand(batch, num_patches, generator=gen, device=device).argsort(dim=1)
        corrupted = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
        corrupted.scatter_(1, order[:, :count], True)
        how = torch.rand(batch, num_patches, generator=gen, device=device)
        masked = corrupted & (how < s.replace_mask)
        swapped = corrupted & (how >= s.replace_mask) & (how < s.replace_mask + s.replace_random)
        source = torch.arange(batch * num_patches, device=device).view(batch, num_patches)
        others = torch.randint(0, max(1, batch * num_patches), (batch, num_patches), generator=gen, device=device)
        return corrupted, torch.where(swapped, others, source), masked

    def __call__(self, model, images: torch.Tensor, targets: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
        from vit.objectives.mae import _vit

        cfg = _vit(model).cfg
        n = cfg.grid_size[0] * cfg.grid_size[1]
        corrupted, source, masked = self.corruption(images.shape[0], n, images.device, seed)
        logits = model(images, source, masked)
        colours = mean_colour_classes(images, cfg.patch_size, self.section.bits, self.mean, self.std)
        picked, wanted = logits[corrupted].float(), colours[corrupted]
        loss = F.cross_entropy(picked, wanted)
        correct = (picked.argmax(dim=-1) == wanted).float().sum()
        return {"loss": loss, "correct": correct, "predicted": torch.tensor(float(wanted.numel()))}
