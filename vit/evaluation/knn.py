"""k-NN accuracy on frozen features: how good a pretrained backbone is without training a head.

Call `knn_evaluate(model, train_loader, val_loader, ...)` after pretraining. The train split's
features are the memory, each val image votes with its k nearest neighbours by cosine similarity,
weighted by exp(sim / T) as in DINO (Caron et al., 2021; k=20, T=0.07 are theirs). Features are the
model's pre-logits (`forward_head(forward_features(x), pre_logits=True)`), so the classifier head,
if any, plays no part.

Distributed: every rank extracts the features of its own part of both splits; the memory is
all-gathered so each rank scores its queries against the whole train split, and the correct
counts are summed, so each query counts once.
"""

from __future__ import annotations

import sys

from contextlib import nullcontext
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: Iterable, *, device: torch.device | str = "cpu",
                     progress: bool = False, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) L2-normalised float32 features and (N,) targets of every labelled sample in `loader`."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    feats, labels = [], []
    try:
        for images, targets, *_ in tqdm(loader, desc=desc, disable=not progress, leave=False):
            keep = targets >= 0
            if not bool(keep.any()):
                continue
            images = images[keep].to(device, dtype=dtype, non_blocking=True)
            autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
            with autocast:
                z = model.forward_head(model.forward_features(images), pre_logits=True)
            feats.append(F.normalize(z.float(), dim=-1).cpu())
            labels.append(targets[keep].long().cpu())
    finally:
        model.train(was_training)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor, *,
                num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk_size: int = 1024) -> torch.Tensor:
    """(Q,) predicted classes by a similarity-weighted vote of the k nearest memory items.

    `memory` and `queries` must already be L2-normalised (so a dot product is the cosine).
    """
    if k <= 0:
        raise ValueError(f"k={k}: must be >= 1, e.g. 20")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0, e.g. 0.07")
    if memory.shape[0] == 0:
        raise ValueError("the memory (train split) has no labelled samples; k-NN needs labels to vote")
    k = min(k, memory.shape[0])
    preds = []
    # Chunks bound the (chunk, N_memory) similarity matrix, which is the only large allocation.
    for start in range(0, queries.shape[0], chunk_size):
        sim = queries[start:start + chunk_size] @ memory.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, memory_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from all ranks (ranks may hold different row counts)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([t.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    # all_gather wants equal shapes: pad to the longest, cut back after.
    padded = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()


def knn_evaluate(model: torch.nn.Module, train_loader: Iterable, val_loader: Iterable, *, num_classes: int,
                 ks: Sequence[int] = (10, 20), temperature: float = 0.07,
                 device: torch.device | str = "cpu", progress: bool = False) -> dict[str, float]:
    """k-NN top-1 on the val split for each k, e.g. {"knn_top1_k20": 0.93, "knn_num_queries": 180, ...}."""
    if num_classes <= 0:
        raise ValueError(f"num_classes={num_classes}: k-NN needs a labelled train split")
    memory, memory_labels = extract_features(model, train_loader, device=device, progress=progress, desc="k-NN memory")
    queries, query_labels = extract_features(model, val_loader, device=device, progress=progress, desc="k-NN queries")
    memory_labels = _all_gather_rows(memory_labels)
    memory = _all_gather_rows(memory)
    if memory.shape[0] == 0:
        raise ValueError("the train split has no labelled samples; k-NN needs labels in the memory")
    capped = [k for k in ks if k > memory.shape[0]]
    if capped and progress:  # progress: the rank that talks
        print(f"k-NN: k={', '.join(map(str, capped))} is more than the {memory.shape[0]} memory samples; "
              f"the vote uses all of them", file=sys.stderr)
    correct = []
    for k in ks:
        if queries.shape[0]:
            preds = knn_predict(memory, memory_labels, queries, num_classes=num_classes, k=k, temperature=temperature)
            correct.append(float((preds == query_labels).sum()))
        else:
            correct.append(0.0)
    from vit.train.distributed import all_reduce_sum

    totals = all_reduce_sum(correct + [float(queries.shape[0])], torch.device(device))
    n = int(totals[-1])
    out: dict[str, float] = {f"knn_top1_k{k}": (totals[i] / n if n else float("nan")) for i, k in enumerate(ks)}
    out["knn_num_queries"] = n
    out["knn_memory_size"] = int(memory.shape[0])
    return out
