"""Per-sample augmentation and batch mixing for the loaders, built on torchvision transforms v2.

The loaders (`pipeline/loader.py`) call these; a training script never does. The split of work:

- `decode_image(data, mode=..., min_side=...)`: bytes -> upright 8-bit PIL image in RGB or L, any
  source mode converted by `pipeline.images.to_model_mode` (16-bit, float, alpha, CMYK...: the
  table in docs/formats.md). JPEGs are decoded at a reduced scale when the image is much larger
  than what the crop needs (`Image.draft`).
- `train_transform(aug, image_size)` / `eval_transform(image_size, crop_pct)`: PIL image -> uint8
  tensor [C, H, W] (RandomResizedCrop, flip, optional RandAugment / resize + center crop).
- `normalize_batch(images, mean, std, out=batch_buffer(...))`: uint8 crops -> one normalised
  float32 batch, once per batch rather than once per sample (fewer small ops on the worker's
  single core), written straight into shared memory in a worker.
- `BatchMixer(aug, num_classes)`: Mixup / CutMix with label smoothing on a normalised batch,
  giving soft targets float [B, K].

All randomness comes from torch's global RNG, which the loader seeds per batch, so a batch is a
pure function of (seed, epoch, rank, worker, batch index).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import torch
from PIL import Image
from torch.utils.data import get_worker_info
from pydantic import Field, model_validator
from torchvision.transforms import v2

from pipeline.images import to_model_mode
from vitpipe.config import StageConfig
from vitpipe.errors import UserError


class AugmentConfig(StageConfig):
    """Training-time augmentation (evaluation only resizes and center-crops)."""

    crop_scale: tuple[float, float] = Field(
        (0.35, 1.0), description="RandomResizedCrop area range as fractions of the image; raise the "
        "lower bound for small or low-resolution images (digits), lower it for stronger augmentation")
    crop_ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="RandomResizedCrop aspect-ratio range (width/height)")
    hflip: float = Field(
        0.5, ge=0.0, le=1.0, description="probability of a horizontal flip; set 0 where left/right "
        "carries meaning (text, digits)")
    rand_augment: bool = Field(
        False, description="apply RandAugment after the crop (helps ViTs trained from scratch on small data)")
    rand_augment_n: int = Field(2, ge=1, description="RandAugment: number of ops per image")
    rand_augment_m: int = Field(9, ge=0, le=30, description="RandAugment: magnitude of each op (0-30)")
    mixup_alpha: float = Field(
        0.0, ge=0.0, description="Mixup Beta(alpha, alpha) parameter; 0 disables (0.8 is DeiT's recipe)")
    cutmix_alpha: float = Field(
        0.0, ge=0.0, description="CutMix Beta(alpha, alpha) parameter; 0 disables (1.0 is DeiT's recipe); "
        "with both on, each batch picks one of the two at random")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="mass spread uniformly over all classes in the soft targets "
        "(0.1 is common); turns the targets into float [B, K]")

    @model_validator(mode="after")
    def _check_ranges(self) -> "AugmentConfig":
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale {self.crop_scale}: need 0 < low <= high <= 1, e.g. [0.35, 1.0]")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio {self.crop_ratio}: need 0 < low <= high, e.g. [0.75, 1.333]")
        return self

    @property
    def soft_targets(self) -> bool:
        """Whether training targets are float [B, K] (mixing or smoothing on) instead of long [B]."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.label_smoothing > 0


def decode_image(data: bytes, *, mode: str, min_side: int | None = None) -> Image.Image:
    """Decode one sample's image bytes to upright 8-bit `mode` ("RGB" or "L"); raises on corrupt
    data, and BadImage("unsupported_mode") for an image with no faithful 8-bit form (a float
    image outside [0, 1]...).

    `min_side`: the smallest side the transforms need. JPEGs larger than twice that are decoded
    at 1/2, 1/4 or 1/8 scale by libjpeg itself, which is several times cheaper than decoding at
    full size and then resizing (the result still has both sides >= `min_side`).
    """
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG":
        img.draft(mode, (min_side, min_side))
    img.load()  # decode now, so corrupt data fails here and not inside a transform
    return to_model_mode(img, mode)


def train_min_side(aug: AugmentConfig, image_size: int) -> int:
    """The smallest source side at which the smallest random crop still has `image_size` pixels."""
    # a crop of area a and aspect r has shorter side sqrt(a * min(r, 1/r))
    squarest = min(aug.crop_ratio[0], 1.0 / aug.crop_ratio[1], 1.0)
    return math.ceil(image_size / math.sqrt(aug.crop_scale[0] * squarest))


def train_transform(aug: AugmentConfig, image_size: int) -> v2.Compose:
    """PIL image -> augmented uint8 tensor [C, image_size, image_size]."""
    # Tensor first: torchvision's uint8 antialiased resize measured ~2x faster than PIL's crop +
    # resize for 160-400 px sources on one thread, and about equal at 32 px.
    steps: list = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True),
    ]
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=aug.hflip))
    if aug.rand_augment:
        steps.append(v2.RandAugment(num_ops=aug.rand_augment_n, magnitude=aug.rand_augment_m))
    return v2.Compose(steps)


def eval_transform(image_size: int, crop_pct: float = 1.0) -> v2.Compose:
    """PIL image -> uint8 tensor: shorter side resized to image_size / crop_pct, center crop."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(math.floor(image_size / crop_pct + 1e-6), antialias=True),
        v2.CenterCrop(image_size),
    ])


def batch_buffer(n: int, shape: Sequence[int]) -> torch.Tensor:
    """An empty float32 [n, *shape] batch for `normalize_batch(out=...)`. In a DataLoader worker
    it is allocated in shared memory, so handing it to the training process copies nothing
    (what torch's default_collate does for the batches it stacks)."""
    if get_worker_info() is None:
        return torch.empty((n, *shape), dtype=torch.float32)
    # the same (private) call torch's default_collate makes to stack a batch in a worker
    storage = torch.empty(0)._typed_storage()._new_shared(n * math.prod(shape), device="cpu")
    return torch.empty(0).new(storage).view(n, *shape)


def normalize_batch(images: torch.Tensor | Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float],
                    *, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, C, H, W] (or a list of [C, H, W]) -> float32 scaled to [0, 1] and normalised per
    channel, written into `out` when given (the loader passes a shared-memory buffer)."""
    if out is None:
        out = torch.empty((len(images), *images[0].shape), dtype=torch.float32)
    if isinstance(images, torch.Tensor):
        out.copy_(images)
    else:
        for dst, img in zip(out, images):
            dst.copy_(img)  # converts uint8 -> float32 on the way, no stacked uint8 copy
    # (x / 255 - mean) / std as one multiply and one subtract over the batch, in place
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(-1, 1, 1)
    return out.mul_(scale).sub_(shift)


class BatchMixer:
    """Mixup / CutMix / label smoothing on a whole batch; call it in the loader's worker.

    Label smoothing is affine in the one-hot targets and mixing takes convex combinations, so
    smoothing the mixed targets equals mixing smoothed ones: torchvision's MixUp/CutMix do the
    mixing and the smoothing is applied after.
    """

    def __init__(self, aug: AugmentConfig, num_classes: int):
        if aug.soft_targets and num_classes < 2:
            raise UserError(
                f"mixup/cutmix/label smoothing need a labelled dataset with >= 2 classes, this one has "
                f"{num_classes}; set data.augment.mixup_alpha, cutmix_alpha and label_smoothing to 0")
        self.num_classes = num_classes
        self.smoothing = aug.label_smoothing
        mixers = []
        if aug.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
        if aug.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
        self.mix = None if not mixers else mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
        self.enabled = aug.soft_targets

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float [B, C, H, W], long [B]) -> (mixed images, soft targets float [B, K])."""
        if not self.enabled:
            return images, targets
        if self.mix is not None and len(targets) > 1:
            images, soft = self.mix(images, targets)
        else:
            soft = torch.nn.functional.one_hot(targets, self.num_classes).to(images.dtype)
        if self.smoothing > 0:
            soft = soft * (1.0 - self.smoothing) + self.smoothing / self.num_classes
        return images, soft
