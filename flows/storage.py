"""Where flow runs write: durable, absolute places, never a folder that vanishes after the run.

A Prefect process worker runs each flow run in a fresh temporary working directory and deletes it
when the run ends. Anything a deployed run writes to a relative path (`./mlflow.db`,
`runs/finetune`, a Slurm job log `vitpipe-%j.out`) is written there and lost, and compute nodes
never see it. So:

- the tracking URI of a flow run is the one passed to it (the deployment's), else the worker's
  `MLFLOW_TRACKING_URI`, else `sqlite:///$VITPIPE_HOME/mlflow.db` (`VITPIPE_HOME` defaults to
  `~/.vitpipe`), with the artifacts in `mlartifacts/` beside the database;
- outputs go under an absolute output root (the deployment's `--output-root`, else next to a
  local dataset, else `$VITPIPE_HOME/runs`);
- a deployed run refuses to start, naming the path and the fix, where a path is relative or
  inside the temporary directory (`TMPDIR`, /tmp by default, where the worker's working
  directories live); `vitpipe deploy` refuses such paths before registering anything.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vitpipe.errors import UserError

HOME_ENV = "VITPIPE_HOME"


def vitpipe_home() -> Path:
    """The durable folder of a machine's (or worker's) default tracking store and outputs."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".vitpipe").expanduser().absolute()


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the SQLite store in $VITPIPE_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{vitpipe_home() / 'mlflow.db'}"


def default_output_root() -> Path:
    return vitpipe_home() / "runs"


def in_deployed_run() -> bool:
    """True inside a flow run that a worker or runner started (its working directory is theirs)."""
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        return True
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)


def temporary_root() -> Path:
    return Path(os.path.realpath(tempfile.gettempdir()))


def local_store_path(uri: str) -> str | None:
    """The filesystem path a tracking URI writes to (SQLite database, file store), else None (a server)."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        return None if path in ("", ":memory:") else path
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri or uri.startswith(("databricks", "uc:")):
        return None
    return uri  # a plain path: MLflow's file store


def why_not_durable(path: str | Path) -> str | None:
    """Why `path` would not outlive a flow run (relative, or in the temporary directory), or None."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        return None  # object storage, a server
    text = text.removeprefix("file://")
    if not os.path.isabs(os.path.expanduser(text)):
        return "is relative, so it would land in the flow run's working directory, a temporary folder " \
               "that Prefect deletes when the run ends"
    real = Path(os.path.realpath(os.path.expanduser(text)))
    tmp = temporary_root()
    if real == tmp or tmp in real.parents:
        return f"is inside the temporary directory {tmp} (where workers run flows and which is cleaned)"
    return None


def check_durable(path: str | Path, what: str, fix: str) -> None:
    """Raise a UserError naming `what` and `fix` if `path` is relative or temporary."""
    why = why_not_durable(path)
    if why:
        raise UserError(f"{what} {str(path)!r} {why}; {fix}")


def check_tracking_uri(uri: str, fix: str) -> None:
    path = local_store_path(uri)
    if path is not None:
        check_durable(path, f"tracking URI {uri!r}: its store", fix)


TRACKING_FIX = ("pass an absolute tracking URI (vitpipe deploy --tracking-uri sqlite:////shared/mlflow.db or "
                "http://mlflow.internal:5000), set MLFLOW_TRACKING_URI in the worker's environment, or set "
                f"{HOME_ENV} to a durable folder")
OUTPUT_FIX = "pass an absolute path outside the temporary directory (vitpipe deploy --output-root /shared/runs)"


def require_durable(*, uri: str | None = None, paths: dict[str, str | Path | None] | None = None) -> None:
    """In a deployed run: refuse to start where the tracking store or an output would vanish."""
    if not in_deployed_run():
        return
    if uri:
        check_tracking_uri(uri, TRACKING_FIX)
    for what, path in (paths or {}).items():
        if path is not None:
            check_durable(path, what, OUTPUT_FIX)


def absolute(path: str | Path) -> str:
    """An output path made absolute (URLs as they are)."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        return text
    return str(Path(text.removeprefix("file://")).expanduser().absolute())
