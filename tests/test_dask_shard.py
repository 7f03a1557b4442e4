"""cluster.dask_shard: the shard stage fanned out over real Dask clusters: a LocalCluster of 2 worker
processes, and a scheduler and 2 workers started as separate `dask` commands, as on a real cluster.

Listing, planning and writing run on the workers; the output must be byte-identical to a local
run (same tars, same index), also when a worker dies mid-shard.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.dask_shard import main, shard_on_dask
from pipeline.shard import ShardConfig, shard
from vitpipe.errors import UserError

pytestmark = [pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def dask_cluster():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, worker_dashboard_address=None) as cluster:
        yield cluster


def _shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _index_without_paths(out: Path) -> dict:
    index = json.loads((out / "index.json").read_text())
    index["config"].pop("out")
    index["config"].pop("workers")
    return index


def test_dask_output_is_byte_identical_to_local(digits_dir, tmp_path, dask_cluster):
    from dask.distributed import Client, get_task_stream

    cfg = dict(src=str(digits_dir), val_ratio=0.1, max_samples_per_shard=300)
    local = tmp_path / "local"
    shard(ShardConfig(out=str(local), workers=1, **cfg))

    on_dask = tmp_path / "dask"
    with Client(dask_cluster.scheduler_address) as client, get_task_stream(client) as tasks:
        stats = shard_on_dask(ShardConfig(out=str(on_dask), **cfg), dask_cluster.scheduler_address)

    local_files, dask_files = _shard_files(local), _shard_files(on_dask)
    assert len(local_files) >= 6  # ~1620 train / 300 + val: several shards per worker
    assert dask_files.keys() == local_files.keys()
    for name in local_files:
        assert dask_files[name] == local_files[name], f"{name} differs between Dask and local runs"
    assert _index_without_paths(on_dask) == _index_without_paths(local)
    assert stats["num_shards"] == len(local_files) and stats["num_samples"] == 1797

    # The parts were listed, the plan made and the shards written by the Dask workers.
    workers = set(dask_cluster.scheduler_info["workers"])
    # (listing: the loose files of SRC, then its 10 class folders in one task)
    for name, count in (("list_task", 2), ("plan_bucket", 1), ("write_shard", len(local_files))):
        ran = [t for t in tasks.data if t["key"].startswith(name)]
        assert len(ran) == count and {t["worker"] for t in ran} <= workers, (name, len(ran))


def test_cli_resumes_on_dask(digits_dir, tmp_path, dask_cluster, capsys):
    """`python -m cluster.dask_shard` takes the shard options; a re-run resumes every shard."""
    out = tmp_path / "shards"
    argv = ["--scheduler", dask_cluster.scheduler_address, str(digits_dir), str(out),
            "--max-samples-per-shard", "600"]
    assert main(argv) == 0
    first = _shard_files(out)
    assert main(argv) == 0
    assert "0 written" in capsys.readouterr().out.splitlines()[-1]
    assert _shard_files(out) == first


def test_unreachable_scheduler_is_a_user_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=f"127.0.0.1:{port}.*dask scheduler"):
        shard_on_dask(ShardConfig(src=str(tmp_path), out=str(tmp_path / "o")), f"tcp://127.0.0.1:{port}",
                      connect_timeout=2)


REPO = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).parent / "dask"


def _photo_copies(root: Path, n: int) -> Path:
    """n copies of a 512x512 photo in 2 classes: slow enough to re-encode to PNG to kill a worker mid-shard."""
    from pipeline.packaged_data import write_photos

    write_photos(root / "orig", names=("astronaut",))
    data = (root / "orig" / "astronaut.jpg").read_bytes()
    for i in range(n):
        folder = root / "src" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.jpg").write_bytes(data)
    return root / "src"


@pytest.fixture(scope="module")
def dask_commands(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes started as separate commands on 127.0.0.1,
    the way a cluster is started by hand; yields (scheduler address, the worker commands' processes)."""
    folder = tmp_path_factory.mktemp("dask-commands")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    scheduler_file = folder / "scheduler.json"
    procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], env=env, cwd=folder,
                              stdout=subprocess.DEVNULL, stderr=open(folder / "scheduler.log", "w"))]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(2):
            procs.append(subprocess.Popen([str(DASK), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                           "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"],
                                          env=env, cwd=folder, stdout=subprocess.DEVNULL,
                                          stderr=open(folder / f"worker{i}.log", "w")))
        from dask.distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address, procs
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_scheduler_and_workers_started_as_commands_give_local_bytes(digits_dir, tmp_path, dask_commands):
    address, _ = dask_commands
    opts = ["--max-samples-per-shard", "300", "--val-ratio", "0.1"]
    local = tmp_path / "local"
    shard(ShardConfig(src=str(digits_dir), out=str(local), max_samples_per_shard=300, val_ratio=0.1))
    out = tmp_path / "dask"
    proc = subprocess.run([sys.executable, "-m", "cluster.dask_shard", "--scheduler", address, str(digits_dir),
                           str(out), *opts], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dask: sharding on 2 worker(s)" in proc.stderr and "sharded 1797 images" in proc.stdout
    assert _shard_files(out) == _shard_files(local) and len(_shard_files(out)) >= 7
    assert _index_without_paths(out) == _index_without_paths(local)


def _kill_a_worker_mid_shard(out: Path, proc: subprocess.Popen) -> tuple[int, str]:
    """SIGKILL the Dask worker process writing a shard (its pid ends the temporary name); returns
    (pid, shard)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        for p in out.glob("*.tar.tmp-*"):
            pid = int(p.name.rsplit("-", 1)[1])
            if len(list(out.glob("*.tar"))) >= 1:  # one shard written first: resuming has something to keep
                os.kill(pid, signal.SIGKILL)
                return pid, p.name.split(".tmp-")[0]
        time.sleep(0.01)
    raise AssertionError("no shard was being written to kill its worker; give the run more work")


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_replaced_and_nothing_changes(tmp_path, dask_commands):
    """Dask's nanny restarts the killed worker and the scheduler runs its shard again elsewhere: the
    run ends well, with the local bytes, and the half-written shard the dead worker left is gone."""
    address, _ = dask_commands
    src = _photo_copies(tmp_path, 60)
    opts = ["--encode", "png", "--max-samples-per-shard", "4", "--val-ratio", "0.2"]
    local = tmp_path / "local"
    subprocess.run([sys.executable, "-m", "vitpipe.cli", "shard", str(src), str(local), *opts], check=True,
                   capture_output=True, cwd=REPO)
    out = tmp_path / "dask"
    proc = subprocess.Popen([sys.executable, "-m", "cluster.dask_shard", "--scheduler", address, str(src), str(out),
                             *opts], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    _kill_a_worker_mid_shard(out, proc)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert _shard_files(out) == _shard_files(local) and len(_shard_files(local)) >= 12
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    from pipeline.verify import verify

    assert verify(str(out)) == []


@pytest.mark.slow
def test_when_dask_gives_up_on_a_shard_it_is_named_and_the_rerun_finishes(tmp_path):
    """With no retries allowed (distributed.scheduler.allowed-failures 0), a worker killed mid-shard
    makes Dask give up: the command says which shard, in one line, and the same command run again
    resumes from the finished shards to the local bytes."""
    import dask
    from dask.distributed import LocalCluster

    src = _photo_copies(tmp_path, 40)
    opts = ["--encode", "png", "--max-samples-per-shard", "4", "--val-ratio", "0.2"]
    local = tmp_path / "local"
    subprocess.run([sys.executable, "-m", "vitpipe.cli", "shard", str(src), str(local), *opts], check=True,
                   capture_output=True, cwd=REPO)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None, worker_dashboard_address=None) as cluster:
        out = tmp_path / "dask"
        argv = [sys.executable, "-m", "cluster.dask_shard", "--scheduler", cluster.scheduler_address, str(src),
                str(out), *opts]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        _kill_a_worker_mid_shard(out, proc)
        _, stderr = proc.communicate(timeout=300)
        last = stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
        # Dask gives up on every task the dead worker held (the shard it was writing, one queued
        # behind it, or one it had just finished before the scheduler heard), so the first reported
        # may be any of them: a shard of the plan, not written, or written whole.
        named = re.match(r"python -m cluster.dask_shard: error: Dask gave up on shard ((train|val)-\d{6}\.tar): "
                         r"the workers running it died", last)
        assert named and (local / named[1]).exists(), last
        assert not (out / named[1]).exists() or (out / named[1]).read_bytes() == (local / named[1]).read_bytes()
        assert not (out / "index.json").exists()
        cluster.wait_for_workers(2, timeout=60)  # the nanny has started a new worker
        subprocess.run(argv, check=True, capture_output=True, cwd=REPO, env=env, timeout=300)
    assert _shard_files(out) == _shard_files(local)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_the_prefect_shard_flow_shards_on_dask(digits_dir, tmp_path, dask_cluster, mlflow_uri):
    """`shard_flow(..., dask_scheduler=ADDRESS)`: one Prefect task whose listing, planning and writing
    fan out to the Dask workers (thousands of shards as Prefect task runs would only load its API)."""
    from dask.distributed import Client, get_task_stream
    from prefect.testing.utilities import prefect_test_harness

    from flows.stages import shard_flow

    local = tmp_path / "local"
    shard(ShardConfig(src=str(digits_dir), out=str(local), max_samples_per_shard=300))
    out = tmp_path / "flow"
    with prefect_test_harness(server_startup_timeout=120), Client(dask_cluster.scheduler_address) as client, \
            get_task_stream(client) as tasks:
        result = shard_flow(src=str(digits_dir), out=str(out), overrides={"max_samples_per_shard": 300},
                            tracking_uri=mlflow_uri, dask_scheduler=dask_cluster.scheduler_address)
    assert result["totals"]["num_samples"] == 1797 and not result["skipped"]
    assert _shard_files(out) == _shard_files(local)
    assert len([t for t in tasks.data if t["key"].startswith("write_shard")]) == len(_shard_files(local))
