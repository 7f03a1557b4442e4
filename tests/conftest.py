"""Fixtures shared by several test files: real image collections and shard sets built from them.

Fixtures used by one test file live in that file.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

# Quiet, offline, deterministic defaults for every test process (and the processes they start).
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("TQDM_MININTERVAL", "5")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _prefect_logs_to_a_live_stream():
    """Prefect (re)builds its console log handlers on the sys.stderr of that moment: inside a test
    that captures output (capsys, capfd), that test's stream, closed once it ends; every later
    flow's log line would then fail (a RecursionError through log_prints). Such handlers are
    pointed back at the process's stderr after each test."""
    yield
    if "prefect.logging.handlers" not in sys.modules:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    for handler in {h for x in loggers for h in x.handlers if isinstance(h, PrefectConsoleHandler)}:
        if getattr(handler.stream, "closed", False):
            handler.stream = handler.console.file = sys.__stderr__  # not setStream: it flushes the old one


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's 1797 real digits as 32x32 PNGs in class folders `0`..`9`."""
    from pipeline.packaged_data import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "images", size=32)


@pytest.fixture(scope="session")
def digits_shards(digits_dir, tmp_path_factory) -> Path:
    """The digits sharded by the real shard stage: train (~90%, >= 3 shards) and val (~10%)."""
    from pipeline.shard import ShardConfig, shard

    out = tmp_path_factory.mktemp("digits_shards") / "shards"
    shard(ShardConfig(src=str(digits_dir), out=str(out), val_ratio=0.1,
                      max_samples_per_shard=500, workers=1))
    return out


@pytest.fixture(scope="session")
def mode_dir(tmp_path_factory) -> tuple[Path, dict]:
    """A flat folder of real images in every mode the pipeline converts or refuses (16-bit, 32-bit,
    float, alpha, palette, CMYK, EXIF-rotated...), and file name -> `image_modes.ModeCase`."""
    from image_modes import write_mode_files

    root = tmp_path_factory.mktemp("modes") / "images"
    return root, write_mode_files(root)


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A fresh SQLite-backed MLflow tracking store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> dict:
    """`vitpipe demo --size small` run once as a real command (Prefect's temporary server, SQLite MLflow)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo") / "demo-output"
    home = out.parent / "prefect_home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), OMP_NUM_THREADS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "-m", "vitpipe.cli", "demo", "--size", "small", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"out": out, "prefect_home": home, "stdout": proc.stdout, "stderr": proc.stderr,
            "tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}
