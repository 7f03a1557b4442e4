"""The MAE objective (He et al. 2022): hide most patches, reconstruct their pixels.

    vitpipe pretrain vit/recipes/digits_mae_pretrain.yaml          # unlabelled images are enough
    vitpipe pretrain run.yaml --train.objective mae --mae.mask-ratio 0.75 --mae.decoder-depth 8

Per sample, a uniform noise over the patches (drawn from the micro-batch's seed, so a resumed run
draws the same masks) decides the visible `1 - mask_ratio` of them; the model is
vit.models.mae.MaskedAutoencoder. The loss is the mean squared error on the masked patches only,
against each patch's pixels normalised by its own mean and variance (`norm_pix_loss`, the paper's
default: sharper reconstructions, better representations).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field

from vitpipe.config import StageConfig
from vitpipe.errors import UserError


def open_fraction(key: str, what: str, example: float):
    """A float option that must lie in (0, 1); the error names the key, what it is and an example."""

    def check(value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"{key}={value} must be in (0, 1), {what}; e.g. {example}")
        return value

    return Annotated[float, AfterValidator(check)]


MAEMaskRatio = open_fraction("mae.mask_ratio", "the fraction of patches hidden", 0.75)


class MAESection(StageConfig):
    """Options of --train.objective mae; the decoder defaults follow model.preset (512 x 8 for b/16)."""

    mask_ratio: MAEMaskRatio = Field(
        0.75, description="fraction of patches hidden from the encoder, per sample; 0.75 in the paper (the "
                          "encoder then costs ~1/4 of a full step)")
    norm_pix_loss: bool = Field(True, description="reconstruct each patch's pixels normalised by its own mean "
                                                  "and variance (the paper's default; better features)")
    decoder_dim: int | None = Field(None, gt=0, description="decoder width; empty = the preset's (512 for the "
                                                            "ImageNet presets, 64-128 for the /4 CPU presets)")
    decoder_depth: int | None = Field(None, gt=0, description="decoder blocks; empty = the preset's (8 for the "
                                                              "ImageNet presets); 1-2 cost less, fine-tune as well")
    decoder_heads: int | None = Field(None, gt=0, description="decoder attention heads; empty = the preset's")
    reconstructions: int = Field(8, ge=0, le=64, description="fixed val images shown as original / masked / "
                                                             "reconstruction in MLflow at each evaluation; 0 = none")



def patch_targets(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """What the decoder predicts for each patch: its pixels (B, N, P*P*C), per-patch normalised if asked."""
    from vit.models.mae import patchify

    target = patchify(images.float(), patch_size)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches only (mask 1 = hidden), each patch weighted equally."""
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAEObjective:
    name = "mae"
    needs_labels = False
    export_prefix = "vit."

    def __init__(self, section: MAESection, *, preset: str) -> None:
        self.section, self.preset = section, preset
        self._generators: dict[torch.device, torch.Generator] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> MAEObjective:
        return cls(getattr(cfg, "mae", None) or MAESection(), preset=cfg.model.preset)

    def decoder(self):
        from vit.models.mae import decoder_for

        s = self.section
        return decoder_for(self.preset, embed_dim=s.decoder_dim, depth=s.decoder_depth, num_heads=s.decoder_heads)

    def check(self, vit_cfg, *, batch_size: int, memory_bytes: int | None) -> None:
        """Refuse, before anything is built, a decoder that cannot be built or would not fit in memory."""
        from vit.models.mae import decoder_num_params, num_visible

        dec = self.decoder()
        if dec.embed_dim % dec.num_heads:
            raise UserError(f"mae.decoder_dim={dec.embed_dim} must be divisible by mae.decoder_heads="
                            f"{dec.num_heads}; e.g. --mae.decoder-heads {max(1, dec.embed_dim // 64)}")
        if dec.embed_dim % 4:
            raise UserError(f"mae.decoder_dim={dec.embed_dim}: its sine-cosine position embedding needs a "
                            f"multiple of 4, e.g. {max(4, dec.embed_dim // 4 * 4)}")
        n = vit_cfg.grid_size[0] * vit_cfg.grid_size[1]
        keep = num_visible(n, self.section.mask_ratio)
        if not 0 < keep < n:
            raise UserError(f"mae.mask_ratio={self.section.mask_ratio} leaves {keep} of the {n} patches of a "
                            f"{vit_cfg.image_size}px image visible; it needs at least one visible and one "
                            f"masked patch, e.g. 0.75")
        if memory_bytes:
            # fp32 weights, gradients and two Adam moments, plus ~16 saved activations per token and block.
            params = decoder_num_params(vit_cfg, dec)
            need = 16 * params + 4 * 16 * batch_size * (n + 1) * dec.embed_dim * dec.depth
            if need > memory_bytes:
                raise UserError(f"mae.decoder_dim={dec.embed_dim} x mae.decoder_depth={dec.depth}: the decoder "
                                f"alone needs ~{need / 2**30:.0f} GiB ({params / 1e9:.1f} B parameters with their "
                                f"optimizer state, and activations at batch {batch_size}), more than the "
                                f"{memory_bytes / 2**30:.0f} GiB of this device; use a narrower one, e.g. "
                                f"--mae.decoder-dim 512 --mae.decoder-depth 8")

    def wrap(self, vit):
        from vit.models.mae import MaskedAutoencoder

        return MaskedAutoencoder(vit, self.decoder(), mask_ratio=self.section.mask_ratio)

    def noise(self, batch: int, num_patches: int, device: torch.device, seed: int) -> torch.Tensor:
        """(B, N) uniform noise from `seed` alone: the lowest 1 - mask_ratio of each row stay visible."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(seed)
        return torch.rand(batch, num_patches, generator=gen, device=device)

    def __call__(self, model, images: torch.Tensor, targets: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
        cfg = _vit(model).cfg
        noise = self.noise(images.shape[0], cfg.grid_size[0] * cfg.grid_size[1], images.device, seed)
        pred, mask = model(images, noise)
        target = patch_targets(images, cfg.patch_size, self.section.norm_pix_loss)
        return {"loss": masked_mse(pred, target, mask), "pred": pred, "mask": mask}


def _vit(model):
    """The encoder inside a DeepSpeed engine or a bare MaskedAutoencoder/MaskedPatchPredictor."""
    return getattr(model, "module", model).vit


def reconstructions(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, *, patch_size: int,
                    norm_pix: bool, mean, std) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original, masked, reconstruction) images in [0, 1], (B, C, H, W) each, for a person to look at.

    The masked patches are shown grey; the reconstruction pastes the predicted patches (brought back
    from per-patch normalised values with the original patch's statistics, as the MAE paper's
    figures do) between the visible ones.
    """
    from vit.models.mae import patchify, unpatchify

    c = images.shape[1]
    images = images.detach().float().cpu()
    pred, mask = pred.detach().float().cpu(), mask.detach().float().cpu().unsqueeze(-1)
    patches = patchify(images, patch_size)
    if norm_pix:
        mu, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    to_pixels = lambda x: (x * std + mean).clamp(0, 1)  # noqa: E731
    grey = (0.5 - mean) / std  # mid-grey in the normalised space, per channel
    grey_patches = patchify(grey.expand_as(images), patch_size)
    masked = unpatchify(patches * (1 - mask) + grey_patches * mask, patch_size, c)
    recon = unpatchify(patches * (1 - mask) + pred * mask, patch_size, c)
    return to_pixels(images), to_pixels(masked), to_pixels(recon)
