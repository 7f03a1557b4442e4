"""Training objectives: what a batch turns into a loss.

The loop calls `objective(model, images, targets) -> (loss, logits)` and never looks inside, so a
self-supervised objective (masked patches, DINO-style views) plugs in by adding a class here and a
name to `OBJECTIVES`; evaluation (top-1, loss) uses the logits when the objective has them.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F


class Objective(Protocol):
    name: str

    def __call__(self, model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


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


OBJECTIVES: dict[str, type] = {"supervised": SupervisedClassification}


def build_objective(name: str, *, label_smoothing: float = 0.0) -> Objective:
    """The objective named in `train.objective`."""
    if name not in OBJECTIVES:
        from vitpipe.errors import UserError

        raise UserError(f"train.objective={name!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](label_smoothing=label_smoothing)
