"""A real server started as a command for a test, on 127.0.0.1, stopped (its whole process group)
at the end: `with local_server([...], ready_url, log) as proc: ...`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def venv_command(name: str) -> str:
    """A console script of this environment (`mlflow`, ...), also when it is not activated."""
    return str(Path(sys.executable).with_name(name))


def venv_path_env(**extra: str) -> dict[str, str]:
    """os.environ with this environment's bin folder first on PATH (servers that start `uvicorn`)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


@contextlib.contextmanager
def local_server(args: list[str], ready_url: str, log: Path, *, timeout: float = 120.0, **popen):
    """Run `args`, wait until `ready_url` answers (failing the test with the log's tail if the
    server exits or `timeout` passes), yield the process, then stop it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{' '.join(args[:3])} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
