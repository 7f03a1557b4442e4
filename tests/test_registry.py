"""Model registry against a real MLflow SQLite store: log, register, load back, promote."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vit.tracking.registry import (CANDIDATE, CHAMPION, SPLIT_TAG, load_registered, promote_if_better, register_model,
                          version_by_alias)


@pytest.fixture
def tracking(mlflow_uri):
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("registry")  # the fluent API keeps an active experiment id across stores
    yield mlflow_uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_experiment(experiment_id="0")  # every store has the Default experiment; "registry" is this one's
    mlflow.set_tracking_uri(previous)


def _model(seed: int = 0):
    from vit.models.vit import create_model

    torch.manual_seed(seed)
    model = create_model("micro/4", in_chans=1, num_classes=10)
    # The head starts at zero (paper init), which would make every model predict the same thing.
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def _images(n: int = 16) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 8.0 - 1.0
    return torch.nn.functional.interpolate(x, size=32, mode="nearest")


def test_registered_model_loads_back_with_the_same_predictions(tracking):
    import mlflow

    model, x = _model(), _images()
    with mlflow.start_run() as run:
        version = register_model(model, "digits-vit", results={"top1": 0.91, "loss": 0.3, "split_id": "val:abc",
                                                               "per_class": {"0": {}}}, input_example=x[:1])
    assert CANDIDATE in version.aliases and version.run_id == run.info.run_id
    assert version.tags[SPLIT_TAG] == "val:abc" and float(version.tags["vitpipe.eval.top1"]) == 0.91
    loaded = load_registered("digits-vit")  # models:/digits-vit@candidate
    served = mlflow.pyfunc.load_model("models:/digits-vit@candidate")  # what `mlflow models serve` runs
    assert type(loaded).__name__ == "VisionTransformer" and hasattr(loaded, "forward_features")
    expected = model(x)
    assert expected.std() > 0.1  # a real, non-constant prediction to compare
    assert torch.allclose(loaded(x), expected, atol=1e-6)
    assert torch.allclose(torch.from_numpy(served.predict(x.numpy())), expected, atol=1e-5)
    assert [tuple(s.shape) for s in (served.metadata.signature.inputs.inputs + served.metadata.signature.outputs.inputs)] \
        == [(-1, 1, 32, 32), (-1, 10)]
    assert not model.head.weight.is_inference()  # the caller's model was copied, not moved or altered


def test_versions_are_stored_without_pickle_and_old_pickled_ones_still_load(tracking, tmp_path, caplog):
    """A registered version holds safetensors, JSON and code, nothing unpickled on load; a version
    logged with MLflow's pytorch flavor (how vitpipe registered before) still loads, with a warning."""
    import mlflow
    from mlflow import MlflowClient

    model, x = _model(), _images(4)
    register_model(model, "safe")
    local = Path(mlflow.artifacts.download_artifacts("models:/safe@candidate", dst_path=str(tmp_path / "dl")))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert "artifacts/export/model.safetensors" in files and "mlflow_model.py" in files
    assert not [f for f in files if f.endswith((".pth", ".pt", ".pkl", ".pickle", ".cloudpickle"))], files
    assert "pytorch" not in mlflow.models.Model.load(str(local / "MLmodel")).flavors

    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle")
    version = mlflow.register_model(info.model_uri, "legacy")
    MlflowClient().set_registered_model_alias("legacy", CANDIDATE, version.version)
    with caplog.at_level("WARNING", logger="vit.tracking.registry"):
        old = load_registered("legacy")
    assert torch.allclose(old(x), model(x), atol=1e-6)
    assert "unpickles it on load" in caplog.text


def test_promotion_needs_a_better_score_on_the_same_split(tracking):
    model = _model()
    register_model(model, "m", results={"top1": 0.90, "split_id": "val:aaa"})
    first = promote_if_better("m")
    assert first.promoted and "no champion" in first.reason
    assert str(version_by_alias("m", CHAMPION).version) == "1"

    register_model(model, "m", results={"top1": 0.85, "split_id": "val:aaa"})
    worse = promote_if_better("m")
    assert not worse.promoted and worse.champion_score == 0.90 and worse.candidate_score == 0.85
    assert str(version_by_alias("m", CHAMPION).version) == "1"

    register_model(model, "m", results={"top1": 0.97, "split_id": "val:bbb"})  # other data
    other = promote_if_better("m")
    assert not other.promoted and "same split" in other.reason

    register_model(model, "m", results={"top1": 0.95, "split_id": "val:aaa"})
    better = promote_if_better("m")
    assert better.promoted and better.candidate_version == "4"
    assert str(version_by_alias("m", CHAMPION).version) == "4" == str(version_by_alias("m", CANDIDATE).version)
    assert not promote_if_better("m").promoted  # already champion

    # Explicit version and a lower-is-better metric.
    register_model(model, "m", results={"top1": 0.95, "loss": 0.1, "split_id": "val:aaa"})
    assert not promote_if_better("m", 5, metric="loss", higher_is_better=False).promoted  # champion has no loss tag


def test_unevaluated_candidate_is_not_promoted_and_bad_names_are_rejected(tracking):
    register_model(_model(), "bare")
    decision = promote_if_better("bare")
    assert not decision.promoted and "no 'top1' evaluation tag" in decision.reason
    assert version_by_alias("bare", CHAMPION) is None
    with pytest.raises(ValueError, match="plain name"):
        register_model(_model(), "models:/x@y")
    with pytest.raises(ValueError, match="no 'candidate' alias"):
        promote_if_better("does-not-exist")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_registered_model_is_served_over_http_by_mlflow(tracking, tmp_path):
    """`mlflow models serve -m models:/NAME@ALIAS` (a real scoring server on 127.0.0.1, in this
    environment) answers POST /invocations with the model's logits."""
    import json
    import urllib.request

    from local_server import local_server, venv_command, venv_path_env
    from vit.train.distributed import free_port

    model, x = _model(), _images(3)
    register_model(model, "served", alias=CHAMPION)
    url = f"http://127.0.0.1:{(port := free_port())}"
    with local_server([venv_command("mlflow"), "models", "serve", "-m", f"models:/served@{CHAMPION}",
                       "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                      f"{url}/ping", tmp_path / "serve.log", timeout=180,
                      env=venv_path_env(MLFLOW_TRACKING_URI=tracking), cwd=tmp_path):
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            predictions = torch.tensor(json.loads(r.read())["predictions"])
    with torch.no_grad():
        expected = model(x)
    assert predictions.shape == (3, 10)
    assert torch.allclose(predictions, expected, atol=1e-5)
