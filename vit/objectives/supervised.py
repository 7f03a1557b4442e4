"""The supervised objective: cross-entropy on class labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SupervisedClassification:
    """Cross-entropy on class labels: the ViT paper's pretraining (and fine-tuning) objective.

    Targets are class ids (long[B]) or soft label distributions (float[B, K], from mixup/cutmix);
    label smoothing applies to class ids only, soft targets already carry their own.
    """

    name = "supervised"

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, model, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        # Loss in fp32 even when the model runs in bf16: log-softmax over classes loses digits otherwise.
        logits32 = logits.float()
        if targets.is_floating_point():
            loss = torch.sum(-targets * F.log_softmax(logits32, dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits32, targets, label_smoothing=self.label_smoothing)
        return loss, logits
