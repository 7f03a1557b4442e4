"""bench/gpu_pretrain.sh, the prepared GPU run of issue 18, in its --cpu-dry-run mode: every stage (data
generation and sharding, the loaders alone, `vitpipe pretrain` end to end with data.decode gpu and cpu,
the plain and DeepSpeed steps) runs for real on the CPU at tiny sizes, so the script is known to work
before GPU time is spent on it. The numbers mean nothing here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_gpu_pretrain_script_runs_every_stage_in_its_cpu_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_pretrain.sh"), "--cpu-dry-run", "--work",
                           str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["data"]["images"] > 30 and result["env"]["device_decode"] == "ok"
    loaders = result["loaders"]
    assert loaders["vitpipe decode cpu"]["kind"] == "TrainLoader"
    assert loaders["vitpipe decode gpu"]["kind"] == "DeviceTrainLoader"
    assert all(loaders[k]["images_per_s"] > 0 for k in ("vitpipe decode cpu", "vitpipe decode gpu"))
    assert "images_per_s" in loaders["dali"] or "DALI not installed" in loaders["dali"]["skipped"]
    for decode in ("gpu", "cpu"):
        e2e = result["e2e"][decode]
        assert "error" not in e2e, e2e
        assert e2e["images_per_s"] > 0 and all(math.isfinite(v) for v in e2e["loss"]) and 0 <= e2e["data_wait_frac"] <= 1
    eager = result["steps"]["eager"]
    assert set(eager) == {"plain", "deepspeed-zero0", "plain-channels-last"} and eager["plain"]["ratio_vs_plain"] == 1.0
    assert "(a) end to end, decode gpu" in proc.stdout and "gpu loader / step" in proc.stdout
