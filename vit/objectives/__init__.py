"""Training objectives: what a batch turns into a loss, and what module is trained for it.

An objective is built from the stage config (`build_objective(cfg)`) and tells the loop

- `needs_labels`: whether it reads the class labels (only supervised does; the others pretrain on
  unlabelled shard sets, and ignore the labels of labelled ones);
- `wrap(vit)`: the module to train around the ViT (the ViT itself, or ViT + MAE decoder, or ViT +
  mask embedding and colour head), and `export_prefix`, where the ViT sits inside it (the export
  is the ViT alone, heads and decoders dropped);
- `objective(model, images, targets, seed=...)` -> a dict with "loss" (a scalar tensor) and
  whatever else it computed (logits, predictions, masks) for evaluation to reuse. `seed` is drawn
  per micro-batch by the loop from (run seed, rank, step), so the masks a self-supervised
  objective draws are the same in a resumed run.

Add one by writing a module here and a name in `OBJECTIVES` (and `TrainSection.objective`).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from vit.objectives.mae import MAEObjective
from vit.objectives.mpp import MPPObjective
from vit.objectives.supervised import SupervisedClassification
from vitpipe.errors import UserError


class Objective(Protocol):
    name: str
    needs_labels: bool
    export_prefix: str

    def wrap(self, vit: nn.Module) -> nn.Module: ...

    def __call__(self, model, images: torch.Tensor, targets: torch.Tensor, *,
                 seed: int = 0) -> dict[str, torch.Tensor]: ...


OBJECTIVES: dict[str, type] = {"supervised": SupervisedClassification, "mae": MAEObjective, "mpp": MPPObjective}
SELF_SUPERVISED = tuple(name for name, cls in OBJECTIVES.items() if not cls.needs_labels)


def build_objective(cfg: Any) -> Objective:
    """The objective named in `cfg.train.objective`, with its options (cfg.mae, cfg.mpp) and data."""
    name = cfg.train.objective
    if name not in OBJECTIVES:
        raise UserError(f"train.objective={name!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name].from_config(cfg)


def micro_batch_seed(seed: int, rank: int, micro_step: int) -> int:
    """The seed of one micro-batch's random draws (masks): a function of where it is in the run only."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, rank, micro_step, 0x0B7]).generate_state(1)[0])


def objective_options_problem(objective: str, sections: dict[str, Any], augment: Any) -> str | None:
    """Why options of one objective were given to a run of another (one line), or None.

    `sections`: the objective-specific config sections by name (mae, mpp, probe) as set by the
    user; `augment`: data.augment, whose label mixing only the supervised objective uses. Values
    equal to their defaults pass: a resolved config written back (config.yaml) holds them all.
    """
    owners = {"mae": ("mae",), "mpp": ("mpp",), "probe": SELF_SUPERVISED}
    for section, values in sections.items():
        fields = type(values).model_fields
        given = sorted(k for k in values.model_fields_set if getattr(values, k) != fields[k].get_default(
            call_default_factory=True))
        if given and objective not in owners[section]:
            wanted = owners[section][0]
            return (f"{section}.{given[0]} is an option of --train.objective {'/'.join(owners[section])}, but this "
                    f"run's objective is {objective}; remove it, or pass --train.objective {wanted}")
    if objective in SELF_SUPERVISED:
        for key in ("mixup_alpha", "cutmix_alpha", "label_smoothing"):
            if getattr(augment, key):
                return (f"data.augment.{key}={getattr(augment, key)} mixes labels, which --train.objective "
                        f"{objective} does not read; set it to 0")
    return None
