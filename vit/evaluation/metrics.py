"""Classification metrics as pure functions, plus an accumulator that is exact across ranks.

Call `ClassificationMetrics.update` once per batch (logits, targets), `reduce()` once after the
last batch (sums are all-reduced, so a sample counted on one rank is counted once overall), then
`compute()` for the numbers. Everything is a sum until `compute`: means of means would weight a
rank's last, smaller batch wrongly.

Conventions: a confusion matrix `cm[t, p]` counts samples of true class `t` predicted as `p`;
targets `< 0` are unlabelled samples and never enter any metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the top-k logits, for each k (k > classes is skipped)."""
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    num_classes = logits.shape[1]
    valid = [k for k in ks if k <= num_classes]
    if not valid or logits.shape[0] == 0:
        return {k: 0 for k in valid}
    top = logits.topk(max(valid), dim=1).indices  # (N, kmax), best first
    hit = top.eq(targets[:, None])
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in valid}


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    if num_classes <= 0:
        raise ValueError(f"num_classes={num_classes}: must be >= 1")
    preds, targets = preds.reshape(-1).long(), targets.reshape(-1).long()
    bad = (targets < 0) | (targets >= num_classes) | (preds < 0) | (preds >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"class ids outside [0, {num_classes}): targets {targets[bad].tolist()[:5]}, "
                         f"predictions {preds[bad].tolist()[:5]}")
    flat = targets * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(cm: torch.Tensor) -> dict[str, list[float]]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    cm = cm.double()
    tp = cm.diag()
    predicted = cm.sum(dim=0)
    support = cm.sum(dim=1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": [int(s) for s in support.tolist()],
    }


def macro_average(values: list[float], support: list[int]) -> float:
    """Mean over the classes present in the split (a class with no samples has no recall to average)."""
    present = [v for v, s in zip(values, support) if s > 0]
    return sum(present) / len(present) if present else 0.0


@dataclass
class ClassificationMetrics:
    """Running sums over batches for one split; exact over any number of ranks after `reduce()`."""

    num_classes: int
    ks: tuple[int, ...] = (1, 5)
    loss_sum: float = 0.0
    count: int = 0          # labelled samples that entered the metrics
    unlabelled: int = 0     # samples with target < 0, seen but not scored
    correct: dict[int, int] = field(default_factory=dict)
    cm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.num_classes <= 0:
            raise ValueError(f"num_classes={self.num_classes}: a classifier needs >= 1 class")
        self.ks = tuple(k for k in self.ks if k <= self.num_classes) or (1,)
        self.correct = {k: 0 for k in self.ks}
        self.cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch; `logits` (N, C) of any float dtype, `targets` (N,) with -1 for unlabelled."""
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"the model outputs {logits.shape[-1]} classes but the split has "
                             f"{self.num_classes}; evaluate a model fine-tuned for this dataset")
        logits, targets = logits.detach().float().cpu(), targets.detach().long().cpu()
        labelled = targets >= 0
        self.unlabelled += int((~labelled).sum())
        logits, targets = logits[labelled], targets[labelled]
        if targets.numel() == 0:
            return
        self.loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        self.count += int(targets.numel())
        for k, n in topk_correct(logits, targets, self.ks).items():
            self.correct[k] += n
        self.cm += confusion_matrix(logits.argmax(dim=1), targets, self.num_classes)

    def reduce(self) -> None:
        """Sum the counts of all ranks in place (no-op without an initialised process group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        # float64 keeps integer counts exact up to 2**53 and the loss sum precise; one collective.
        head = [self.loss_sum, float(self.count), float(self.unlabelled)] + [float(self.correct[k]) for k in self.ks]
        flat = torch.cat([torch.tensor(head, dtype=torch.float64), self.cm.double().reshape(-1)])
        if dist.get_backend() == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()
        self.loss_sum, self.count, self.unlabelled = float(flat[0]), int(flat[1]), int(flat[2])
        n = len(head)
        for i, k in enumerate(self.ks):
            self.correct[k] = int(flat[3 + i])
        self.cm = flat[n:].round().long().reshape(self.num_classes, self.num_classes)

    def compute(self, class_names: list[str] | None = None) -> dict:
        """The metrics as plain Python numbers (JSON-ready); call after `reduce()`."""
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        pc = per_class_metrics(self.cm)
        n = max(self.count, 1)
        out: dict = {
            "num_samples": self.count,
            "num_unlabelled": self.unlabelled,
            "loss": self.loss_sum / n if self.count else float("nan"),
        }
        for k in self.ks:
            out[f"top{k}"] = self.correct[k] / n if self.count else float("nan")
        out["macro_precision"] = macro_average(pc["precision"], pc["support"])
        out["macro_recall"] = macro_average(pc["recall"], pc["support"])
        out["macro_f1"] = macro_average(pc["f1"], pc["support"])
        out["per_class"] = {
            name: {"precision": pc["precision"][i], "recall": pc["recall"][i], "f1": pc["f1"][i],
                   "support": pc["support"][i]}
            for i, name in enumerate(names)
        }
        out["confusion_matrix"] = {"classes": names, "rows": "true", "columns": "predicted",
                                   "counts": self.cm.tolist()}
        return out
