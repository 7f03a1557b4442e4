"""PNG plots a person reads after a run: the confusion matrix and the training curves.

Call these on rank 0 only; they write one file each and return its path. Matplotlib runs on the
non-interactive Agg backend through its object API (no pyplot state), so plotting is safe in
worker threads and on machines without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_confusion_matrix(counts: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, *,
                          title: str = "Confusion matrix", normalize: bool = True) -> Path:
    """Write the confusion matrix as a PNG: colour by row-normalised rate, the raw count in each cell."""
    cm = np.asarray(counts, dtype=np.int64)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {n} class names")
    rows = cm.sum(axis=1, keepdims=True)
    rate = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0) if normalize else cm
    side = min(4.0 + 0.45 * n, 30.0)
    fig = _figure(side + 1.5, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class" if normalize else "count")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} ({int(cm.sum())} samples)")
    if n <= 30:  # beyond that the numbers are unreadable; the colours still are
        top = float(np.max(rate)) if rate.size else 0.0
        for t in range(n):
            for p in range(n):
                if cm[t, p]:
                    ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=8,
                            color="white" if rate[t, p] > 0.5 * (top or 1) else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_curves(series: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, *,
                title: str = "Training curves", x_label: str = "step") -> Path:
    """Write loss and accuracy curves as a PNG: one panel per kind, a line per series.

    `series` maps a metric name (e.g. "train/loss", "val/top1") to (step, value) pairs, as
    `MlflowClient.get_metric_history` or a training loop's history gives them. Names containing
    "loss" go to the left panel, the rest (accuracies, lr...) to the right one.
    """
    if not series:
        raise ValueError("no series to plot; pass e.g. {'train/loss': [(step, value), ...]}")
    losses = {k: v for k, v in series.items() if "loss" in k}
    others = {k: v for k, v in series.items() if "loss" not in k}
    panels = [(p, label) for p, label in ((losses, "loss"), (others, "value")) if p]
    fig = _figure(6.0 * len(panels), 4.0)
    for i, (panel, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, points in sorted(panel.items()):
            if not points:
                continue
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 20 else None, markersize=3)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_run_curves(run_id: str, path: str | Path, *, keys: Sequence[str] | None = None,
                    tracking_uri: str | None = None) -> Path:
    """Plot the curves of a finished MLflow run (all its metrics logged at > 1 step, or `keys`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    names = list(keys) if keys else sorted(run.data.metrics)
    series = {}
    for name in names:
        history = client.get_metric_history(run_id, name)
        if keys or len(history) > 1:
            series[name] = [(m.step, m.value) for m in history]
    if not series:
        raise ValueError(f"run {run_id} has no metric logged at more than one step; nothing to plot")
    return plot_curves(series, path, title=run.info.run_name or run_id)


def plot_reconstructions(columns: Mapping[str, np.ndarray], path: str | Path, *,
                         title: str = "Reconstructions") -> Path:
    """Write image columns side by side as a PNG, one row per image: e.g. original / masked /
    reconstruction of an MAE. Each array is (B, C, H, W) in [0, 1] with C = 1 or 3."""
    names = list(columns)
    if not names:
        raise ValueError("no columns to plot; pass e.g. {'original': images, ...}")
    rows = int(np.asarray(columns[names[0]]).shape[0])
    fig = _figure(1.6 * len(names) + 0.4, 1.6 * rows + 0.6)
    for c, name in enumerate(names):
        batch = np.asarray(columns[name], dtype=np.float32)
        for r in range(rows):
            ax = fig.add_subplot(rows, len(names), r * len(names) + c + 1)
            img = batch[r].transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
