"""Training objectives: what a batch turns into a loss.

The loop calls `objective(model, images, targets) -> (loss, logits)` and never looks inside, so a
self-supervised objective (masked patches, DINO-style views) plugs in by adding a module here and a
name to `OBJECTIVES`; evaluation (top-1, loss) uses the logits when the objective has them.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from vit.objectives.supervised import SupervisedClassification


class Objective(Protocol):
    name: str

    def __call__(self, model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


OBJECTIVES: dict[str, type] = {"supervised": SupervisedClassification}


def build_objective(name: str, *, label_smoothing: float = 0.0) -> Objective:
    """The objective named in `train.objective`."""
    if name not in OBJECTIVES:
        from vitpipe.errors import UserError

        raise UserError(f"train.objective={name!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](label_smoothing=label_smoothing)
