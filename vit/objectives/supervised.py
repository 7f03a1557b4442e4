"""The supervised objective: cross-entropy on class labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SupervisedClassification:
    """Cross-entropy on class labels: the ViT paper's pretraining (and fine-tuning) objective.

    Targets are class ids (long[B]) or soft label distributions (float[B, K], from mixup/cutmix);
    label smoothing applies to class ids only, soft targets already carry their own.
    """

    name = "supervised"
    needs_labels = True
    export_prefix = ""

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg) -> SupervisedClassification:
        return cls(label_smoothing=cfg.data.augment.label_smoothing)

    def wrap(self, vit: nn.Module) -> nn.Module:
        return vit

    def __call__(self, model, images: torch.Tensor, targets: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
        logits = model(images)
        # Loss in fp32 even when the model runs in bf16: log-softmax over classes loses digits otherwise.
        logits32 = logits.float()
        if targets.is_floating_point():
            loss = torch.sum(-targets * F.log_softmax(logits32, dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits32, targets, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits}
