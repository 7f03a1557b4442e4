"""The MLflow model registry: a fine-tuned model becomes `candidate`, the better one `champion`.

Call `register_model` at the end of fine-tuning (rank 0) with the model and its evaluation; call
`promote_if_better` to move `champion` to it when it beats the current champion *on the same
split*. Deployments load `models:/NAME@champion` with `load_registered`.

Each registered version carries its evaluation as tags (`vitpipe.eval.split`, `vitpipe.eval.top1`,
...), so a promotion decision needs no access to the data and is visible in the MLflow UI. Two
evaluations are comparable only when their `split` fingerprints (shard names and checksums) are
equal: a score on another split, or on a re-sharded one, says nothing about which model is better.

Uses the process-wide MLflow tracking/registry URI (`mlflow.set_tracking_uri`), which the calling
stage sets from its config.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

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


def register_model(model: torch.nn.Module, name: str, *, alias: str = CANDIDATE,
                   results: dict[str, Any] | None = None, input_example: torch.Tensor | None = None,
                   artifact_name: str = "model"):
    """Log `model` with MLflow's pytorch flavor in the active run, register it as `name`, set `alias`.

    `results` (from `evaluate_model`) are attached to the version as tags for `promote_if_better`.
    Returns the `ModelVersion`. Without an active run, one is started for the logging.
    """
    import mlflow
    from mlflow import MlflowClient

    if not name or "/" in name or "@" in name:
        raise ValueError(f"registered model name {name!r}: use a plain name such as 'digits-vit'")
    # A CPU copy in eval mode: loading needs no GPU, and the training model keeps its device.
    bare = copy.deepcopy(_unwrap(model)).float().cpu().eval()
    example = None if input_example is None else input_example.detach().float().cpu().numpy()
    # "pickle" keeps a real nn.Module on load (pt2 export, chosen when an example is given, would
    # return an ExportedProgram without .eval() or methods such as forward_features).
    kwargs = dict(name=artifact_name, pip_requirements=_pip_requirements(), input_example=example,
                  serialization_format="pickle")
    if mlflow.active_run() is None:
        with mlflow.start_run(run_name=f"register-{name}"):
            info = mlflow.pytorch.log_model(bare, **kwargs)
    else:
        info = mlflow.pytorch.log_model(bare, **kwargs)
    version = mlflow.register_model(info.model_uri, name, tags=eval_tags(results or {}))
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def load_registered(name: str, alias: str = CANDIDATE, *, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The model registered as `name` under `alias` (`models:/NAME@ALIAS`), in eval mode."""
    import mlflow

    model = mlflow.pytorch.load_model(f"models:/{name}@{alias}", map_location=map_location)
    return model.eval()


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
                      higher_is_better: bool = True, min_delta: float = 0.0) -> Promotion:
    """Point `champion` at `version` (default: the `candidate`) if it beats the champion on the same split.

    With no champion yet, the candidate becomes champion. A champion evaluated on another split
    is not compared against: the decision is "not promoted" with the reason, and the fix is to
    evaluate both models on one split.
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
    result.update(champion_version=str(champ.version), champion_score=champ_score)
    if str(champ.version) == str(cand.version):
        return Promotion(False, f"version {cand.version} is already the champion", **result)
    cand_split, champ_split = cand.tags.get(SPLIT_TAG), champ.tags.get(SPLIT_TAG)
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
