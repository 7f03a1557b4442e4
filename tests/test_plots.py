"""The PNGs are real images that depend on the data, written without a display."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vit.evaluation.plots import plot_confusion_matrix, plot_curves, plot_run_curves


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("L"), dtype=np.float64)


def test_confusion_matrix_png_depends_on_the_counts(tmp_path):
    names = [str(i) for i in range(10)]
    diagonal = np.eye(10, dtype=int) * 17
    confused = np.roll(diagonal, 1, axis=1)
    a = _pixels(plot_confusion_matrix(diagonal, names, tmp_path / "a.png"))
    b = _pixels(plot_confusion_matrix(confused, names, tmp_path / "sub" / "b.png"))
    assert a.shape == b.shape and a.std() > 10  # not a blank canvas
    assert np.abs(a - b).mean() > 0.5           # different matrices draw differently


def test_confusion_matrix_rejects_wrong_class_count(tmp_path):
    with pytest.raises(ValueError, match="for 3 class names"):
        plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b", "c"], tmp_path / "x.png")


def test_curves_png_has_a_panel_per_kind(tmp_path):
    loss_only = plot_curves({"train/loss": [(s, 2.0 / (s + 1)) for s in range(30)]}, tmp_path / "l.png")
    both = plot_curves({"train/loss": [(s, 2.0 / (s + 1)) for s in range(30)],
                        "val/top1": [(10, 0.5), (20, 0.8), (30, 0.9)]}, tmp_path / "lv.png")
    assert _pixels(both).shape[1] > 1.5 * _pixels(loss_only).shape[1]  # a second panel beside the first
    with pytest.raises(ValueError, match="no series"):
        plot_curves({}, tmp_path / "none.png")


def test_run_curves_from_a_real_mlflow_run(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.create_run(client.create_experiment("plots"), run_name="curves")
    for step in range(5):
        client.log_metric(run.info.run_id, "train/loss", 1.0 / (step + 1), step=step)
    client.log_metric(run.info.run_id, "final_only", 3.0, step=0)
    out = plot_run_curves(run.info.run_id, tmp_path / "run.png", tracking_uri=mlflow_uri)
    assert _pixels(out).std() > 10
    single = client.create_run(run.info.experiment_id, run_name="one-point")
    client.log_metric(single.info.run_id, "top1", 0.9, step=0)
    with pytest.raises(ValueError, match="more than one step"):
        plot_run_curves(single.info.run_id, tmp_path / "x.png", tracking_uri=mlflow_uri)
