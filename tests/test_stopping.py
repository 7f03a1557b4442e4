"""Stopping on a signal: ranks agree on the step (a real SIGTERM to one of two gloo ranks), and the
time bound (a run that never reaches a step boundary still exits, its run closed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

# Rank 1 alone gets SIGTERM during step 3; both ranks must stop after the same step.
_TWO_RANKS = textwrap.dedent("""
    import os, signal, sys, time, torch
    from vit.train.distributed import World, init_process_group
    from vit.tracking.tracker import Stopped
    from vit.train.stopping import StopOnSignal
    world = World.from_env()
    init_process_group(world, torch.device("cpu"))
    step = 0
    try:
        with StopOnSignal(timeout_s=30) as stop, stop.deferred():
            while step < 1000:
                step += 1
                t = torch.ones(1)
                torch.distributed.all_reduce(t)  # the step's own collective
                if step == 3 and world.rank == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01 * (1 + world.rank))  # the ranks run at different speeds
                if stop.poll():
                    raise Stopped(stop.signum or signal.SIGTERM)
    except Stopped as e:
        print(f"STOPPED rank {world.rank} step {step} code {e.code}", flush=True)
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ranks_stop_after_the_same_step_when_one_of_them_is_signalled(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(_TWO_RANKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = sorted(line.split() for line in proc.stdout.splitlines() if line.startswith("STOPPED"))
    assert [x[2] for x in lines] == ["0", "1"], proc.stdout
    assert lines[0][4] == lines[1][4] and int(lines[0][4]) in (4, 5), lines  # one step after the vote began
    assert lines[0][6] == lines[1][6] == str(128 + signal.SIGTERM)


_STUCK = textwrap.dedent("""
    import sys, time
    from mlflow import MlflowClient
    from vit.train.config import TrackingSection
    from vit.tracking.tracker import Tracker
    from vit.train.stopping import StopOnSignal
    t = Tracker.open(TrackingSection(uri=sys.argv[1], experiment="t", system_metrics=False), is_main=True,
                     params={}, tags={})
    with StopOnSignal(timeout_s=2, on_expire=lambda: t.end("KILLED", timeout_s=5)) as stop, stop.deferred():
        print(t.run_id, flush=True)  # the handlers are in place: the test may signal now
        while True:
            time.sleep(0.1)  # a step that never ends (a hung collective, a slow save): no poll() comes
""")


@pytest.mark.slow
def test_a_run_that_cannot_reach_a_step_boundary_still_exits_in_time_with_its_run_killed(tmp_path, mlflow_uri):
    import time

    from mlflow import MlflowClient

    script = tmp_path / "stuck.py"
    script.write_text(_STUCK)
    proc = subprocess.Popen([sys.executable, str(script), mlflow_uri], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - started < 15, err
    assert "did not stop within checkpoint.stop_timeout_s=2 s of SIGTERM" in err
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "KILLED"
