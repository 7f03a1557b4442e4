"""cluster.dask_shard: the shard stage fanned out over a real local Dask cluster (2 worker processes).

The output must be byte-identical to a local run: same tars, same index.
"""

from __future__ import annotations

import json
import socket
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

    # The shards really were written by the Dask workers, one task per shard.
    writes = [t for t in tasks.data if t["key"].startswith("write_shard")]
    assert len(writes) == len(local_files)
    assert {t["worker"] for t in writes} <= set(dask_cluster.scheduler_info["workers"])


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
