"""The MLflow model registry: a fine-tuned model becomes `candidate`, the better one `champion`.

Call `register_model` at the end of fine-tuning (rank 0) with the model and its evaluation; call
`promote_if_better` to move `champion` to it when it beats the current champion *on the same
split*. Deployments load `models:/NAME@champion` with `load_registered`.

Each registered version carries its evaluation as tags (`vitpipe.eval.split`, `vitpipe.eval.top1`,
...), so a promotion decision needs no access to the data and is visible in the MLflow UI. Two
evaluations are comparable only when their `split` fingerprints (shard names and checksums) are
equal: a score on another split, or on a re-sharded one, says nothing about which model is better.

A version is stored without pickle: the export's safetensors and config as an artifact, and
`vit/tracking/mlflow_model.py` as MLflow model code (so `mlflow.pyfunc.load_model` and `mlflow models serve`
work). `load_logged_model` reads the weights only and runs nothing from the artifact store.
Versions registered with the pytorch flavor before this format still load, with a warning,
through MLflow's pickle loader.

Uses the process-wide MLflow tracking/registry URI (`mlflow.set_tracking_uri`), which the calling
stage sets from its config.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitpipe.errors import UserError

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
TAG_PREFIX = "vitpipe.eval."
SPLIT_TAG = TAG_PREFIX + "split"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model from a DeepSpeed engine or DDP wrapper (both keep it in `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _pip_requirements() -> list[str]:
    import vitpipe

    # Given explicitly: MLflow's inference would load the model in a subprocess (slow) and
    # cannot see that the model class lives in vitpipe.
    return [f"torch=={torch.__version__.split('+')[0]}", f"vitpipe=={vitpipe.__version__}"]


def eval_tags(results: dict[str, Any]) -> dict[str, str]:
    """Model-version tags from `evaluate_model` results: the split fingerprint and scalar metrics."""
    tags = {}
    if results.get("split_id"):
        tags[SPLIT_TAG] = str(results["split_id"])
    for key, value in results.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            tags[TAG_PREFIX + key] = repr(float(value))
    return tags


def _signature(model) -> Any:
    """Images N x C x H x W in, one row of outputs per image out (float32 tensors)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    c = model.cfg
    shape = (1, c.in_chans, c.image_size, c.image_size)
    param, training = next(model.parameters()), model.training
    with torch.no_grad():
        width = model.eval()(torch.zeros(shape, dtype=param.dtype, device=param.device)).shape[-1]
    model.train(training)
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape[1:]))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, width))]))


def register_model(model: torch.nn.Module, name: str, *, alias: str = CANDIDATE,
                   results: dict[str, Any] | None = None, input_example: torch.Tensor | None = None,
                   artifact_name: str = "model"):
    """Log `model` (a vitpipe VisionTransformer, bare or wrapped) in the active run, register it
    as `name`, set `alias`. Stored as safetensors + MLflow model code, never pickled.

    `results` (from `evaluate_model`) are attached to the version as tags for `promote_if_better`.
    `input_example` (a batch of images) gives the version a signature. Returns the `ModelVersion`.
    Without an active run, one is started for the logging.
    """
    import mlflow
    from mlflow import MlflowClient

    from vit.models.vit import VisionTransformer
    from vit.models.weights import save_pretrained

    if not name or "/" in name or "@" in name:
        raise ValueError(f"registered model name {name!r}: use a plain name such as 'digits-vit'")
    bare = _unwrap(model)
    if not isinstance(bare, VisionTransformer):
        raise TypeError(f"register_model takes a vitpipe VisionTransformer, not a {type(bare).__name__}")
    example = None if input_example is None else input_example.detach().float().cpu().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        export = save_pretrained(bare, Path(tmp) / "export")  # CPU copies; the caller's model is untouched
        kwargs = dict(name=artifact_name, python_model=str(Path(__file__).with_name("mlflow_model.py")),
                      artifacts={"export": str(export)}, pip_requirements=_pip_requirements(),
                      signature=_signature(bare), input_example=example)
        with warnings.catch_warnings():
            # The signature is given, so MLflow's advice to add an example for it does not apply.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            if mlflow.active_run() is None:
                with mlflow.start_run(run_name=f"register-{name}"):
                    info = mlflow.pyfunc.log_model(**kwargs)
            else:
                info = mlflow.pyfunc.log_model(**kwargs)
    version = mlflow.register_model(info.model_uri, name, tags=eval_tags(results or {}))
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def load_registered(name: str, alias: str = CANDIDATE, *, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The model registered as `name` under `alias` (`models:/NAME@ALIAS`), in eval mode."""
    return load_logged_model(f"models:/{name}@{alias}", map_location=map_location).eval()


def load_logged_model(uri: str, *, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """A model from MLflow (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/PATH`):
    a vitpipe export found in its artifacts (what `register_model` and the training stages log)
    is read from its safetensors; a version logged with MLflow's pytorch flavor (registered
    before vitpipe stopped pickling) goes through MLflow's pickle loader, with a warning.
    Download errors raise MlflowException; artifacts that hold neither raise UserError."""
    import mlflow

    from vit.models.weights import WEIGHTS_NAME, load_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        weights = local if local.is_file() else next(iter(sorted(local.rglob(WEIGHTS_NAME))), None)
        if weights is not None:  # config.json beside it, else the config in its header
            return load_pretrained(weights).to(map_location)
        mlmodel = local / "MLmodel"
        if mlmodel.is_file() and "pytorch" in (mlflow.models.Model.load(str(mlmodel)).flavors or {}):
            log.warning("%s was logged with MLflow's pytorch flavor, which unpickles it on load (it can run "
                        "code); re-register it with vit.tracking.registry.register_model to store it as safetensors", uri)
            return mlflow.pytorch.load_model(str(local), map_location=map_location)
    raise UserError(f"{uri} holds neither a vitpipe export ({WEIGHTS_NAME}) nor a PyTorch MLflow model; "
                    f"log models with vit.tracking.registry.register_model")


def version_by_alias(name: str, alias: str):
    """The `ModelVersion` behind `name@alias`, or None when the alias (or the model) does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@dataclass(frozen=True)
class Promotion:
    """What `promote_if_better` decided and why (log `reason` so a person can follow it)."""

    promoted: bool
    reason: str
    metric: str
    candidate_version: str
    candidate_score: float | None
    champion_version: str | None = None
    champion_score: float | None = None


def _score(version, metric: str) -> float | None:
    value = version.tags.get(TAG_PREFIX + metric)
    return None if value is None else float(value)


def promote_if_better(name: str, version: str | int | None = None, *, metric: str = "top1",
                      higher_is_better: bool = True, min_delta: float = 0.0,
                      champion_results: dict[str, Any] | None = None) -> Promotion:
    """Point `champion` at `version` (default: the `candidate`) if it beats the champion on the same split.

    With no champion yet, the candidate becomes champion. A champion evaluated on another split
    is not compared against: the decision is "not promoted" with the reason, and the fix is to
    evaluate both models on one split: `champion_results` are the champion's results (with its
    `split_id`) on the candidate's split, used instead of the champion's tags.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    cand = client.get_model_version(name, str(version)) if version is not None else version_by_alias(name, CANDIDATE)
    if cand is None:
        raise ValueError(f"model {name!r} has no '{CANDIDATE}' alias; register one with register_model or pass version=")
    cand_score = _score(cand, metric)
    result = dict(metric=metric, candidate_version=str(cand.version), candidate_score=cand_score)
    if cand_score is None:
        return Promotion(False, f"version {cand.version} has no '{metric}' evaluation tag; evaluate it first", **result)
    champ = version_by_alias(name, CHAMPION)
    if champ is None:
        client.set_registered_model_alias(name, CHAMPION, cand.version)
        return Promotion(True, f"no champion yet; version {cand.version} ({metric}={cand_score:.4f}) becomes champion", **result)
    champ_score = _score(champ, metric)
    champ_split = champ.tags.get(SPLIT_TAG)
    if champion_results is not None:
        champ_score, champ_split = champion_results.get(metric), champion_results.get("split_id")
    result.update(champion_version=str(champ.version), champion_score=champ_score)
    if str(champ.version) == str(cand.version):
        return Promotion(False, f"version {cand.version} is already the champion", **result)
    cand_split = cand.tags.get(SPLIT_TAG)
    if champ_score is None or not cand_split or cand_split != champ_split:
        return Promotion(False, (f"not comparable: candidate v{cand.version} was evaluated on split {cand_split!r}, "
                                 f"champion v{champ.version} on {champ_split!r}; evaluate both on the same split"),
                         **result)
    delta = (cand_score - champ_score) if higher_is_better else (champ_score - cand_score)
    if delta > min_delta:
        client.set_registered_model_alias(name, CHAMPION, cand.version)
        return Promotion(True, (f"v{cand.version} {metric}={cand_score:.4f} beats champion v{champ.version} "
                                f"({champ_score:.4f}); v{cand.version} is now champion"), **result)
    return Promotion(False, (f"v{cand.version} {metric}={cand_score:.4f} does not beat champion v{champ.version} "
                             f"({champ_score:.4f}) by more than {min_delta}"), **result)
