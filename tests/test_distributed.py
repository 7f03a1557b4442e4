"""Rank/world facts from launcher variables, launcher command lines, and two "nodes" on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from ssh_hosts import ssh_hosts  # noqa: F401  (pytest fixture)
from vit.train.distributed import World, backend_for, first_host
from vit.train.launch import add_launch_arguments, is_worker, launcher_argv, strip_launch_options
from vitpipe.errors import UserError


def test_single_process_without_launcher():
    w = World.from_env({})
    assert (w.rank, w.world_size, w.is_main, w.is_distributed, w.source) == (0, 1, True, False, "single")


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    w = World.from_env(env)
    assert (w.rank, w.world_size, w.local_rank, w.node_rank, w.num_nodes) == (5, 8, 1, 1, 2)
    assert (w.master_addr, w.master_port, w.is_main) == ("node0", 29400, False)


def test_deepspeed_launcher_variables():
    # The DeepSpeed launcher names the node index CROSS_RANK and ranks per node LOCAL_SIZE.
    w = World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
                        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (w.rank, w.local_world_size, w.node_rank, w.num_nodes) == (3, 2, 1, 2)


def test_slurm_variables():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "12345"}
    w = World.from_env(env)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.node_rank) == (6, 8, 2, 4, 1)
    assert w.master_addr == "gpu07" and w.master_port == 20000 + 12345 and w.source == "slurm"
    # torchrun inside a Slurm allocation: torchrun's variables describe the processes.
    w = World.from_env({**env, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert (w.rank, w.world_size, w.source) == (0, 2, "torchrun/deepspeed")
    assert World.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"  # a plain sbatch step


def test_bad_environment_is_named():
    with pytest.raises(RuntimeError, match="rank 4 outside world size 4"):
        World.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        World.from_env({"RANK": "0", "WORLD_SIZE": "two"})


@pytest.mark.parametrize("nodelist, host", [("gpu[03-05,9],cpu1", "gpu03"), ("node17", "node17"),
                                            ("a1,a2", "a1"), ("", "127.0.0.1")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_single_process_group_then_a_launch_from_the_same_process():
    import torch

    from vit.train.distributed import init_process_group

    init_process_group(World(), torch.device("cpu"))
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
    # Its RANK/WORLD_SIZE=1/MASTER_PORT stay in the environment (DeepSpeed reads them) and are
    # inherited by child processes: those must still see themselves as a fresh single process.
    assert not is_worker() and World.from_env().source == "single"


def test_torchrun_of_one_rank_keeps_its_store_port():
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29612"}
    assert World.from_env(env).source == "single"  # left over from an in-process run: a fresh port later
    w = World.from_env({**env, "TORCHELASTIC_RUN_ID": "job-7"})
    assert w.source == "torchrun/deepspeed" and w.master_port == 29612 and not w.is_distributed


_TORCHRUN_OF_ONE = """
import torch
from vit.train.distributed import World, init_process_group
world = World.from_env()
init_process_group(world, torch.device("cpu"), timeout_s=60)
t = torch.ones(1)
torch.distributed.all_reduce(t)
print("JOINED", world.source, torch.distributed.get_world_size(), float(t))
"""


@pytest.mark.multiprocess
def test_torchrun_with_one_rank_joins_its_agent_store(tmp_path):
    """torchrun --nproc-per-node 1 (a one-GPU Slurm job runs it so): the rank must rendezvous at
    torchrun's store; a fresh port of its own waited there for the whole timeout."""
    script = tmp_path / "one.py"
    script.write_text(_TORCHRUN_OF_ONE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           str(script)], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "JOINED torchrun/deepspeed 1 1.0" in proc.stdout


def test_backend_follows_device():
    import torch

    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"


def _launch_args(argv):
    p = argparse.ArgumentParser()
    add_launch_arguments(p)
    return p.parse_known_args(argv)[0]


def test_launcher_command_lines(tmp_path):
    worker = strip_launch_options(["pretrain", "run.yaml", "--nproc", "4", "--optim.lr", "1e-3",
                                   "--master-port=1234", "--nnodes", "2"])
    assert worker == ["pretrain", "run.yaml", "--optim.lr", "1e-3"]
    local = launcher_argv(_launch_args(["--nproc", "4"]), worker)
    assert local[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in local
    assert local[local.index("--nproc-per-node") + 1] == "4" and local[-6:] == ["-m", "vitpipe.cli", *worker]
    static = launcher_argv(_launch_args(["--nproc", "2", "--nnodes", "2", "--node-rank", "1",
                                         "--master-addr", "10.1.1.1", "--master-port", "29600"]), worker)
    for flag, value in [("--nnodes", "2"), ("--node-rank", "1"), ("--master-addr", "10.1.1.1"),
                        ("--master-port", "29600")]:
        assert static[static.index(flag) + 1] == value
    rdzv = launcher_argv(_launch_args(["--nnodes", "3", "--rdzv-endpoint", "head:29400"]), worker)
    assert rdzv[rdzv.index("--rdzv-backend") + 1] == "c10d" and "head:29400" in rdzv and "--node-rank" not in rdzv
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-1 slots=8\nworker-2 slots=8\n")
    ds = launcher_argv(_launch_args(["--hostfile", str(hostfile)]), worker)
    assert ds[1:3] == ["-m", "deepspeed.launcher.runner"] and "--no_local_rank" in ds
    assert ds[ds.index("--hostfile") + 1] == str(hostfile) and ds[-len(worker) - 2:] == ["--module", "vitpipe.cli",
                                                                                          *worker]
    local_ds = launcher_argv(_launch_args(["--launcher", "deepspeed", "--nproc", "3"]), worker)
    assert local_ds[local_ds.index("--num_gpus") + 1] == "3" and "--hostfile" not in local_ds
    # node 0 is the file's first host, not this machine: DeepSpeed's runner picks it when no address is given
    assert "--master_addr" not in ds
    pinned = launcher_argv(_launch_args(["--hostfile", str(hostfile), "--master-addr", "10.1.2.3"]), worker)
    assert pinned[pinned.index("--master_addr") + 1] == "10.1.2.3"
    with pytest.raises(UserError, match="--hostfile 'missing' does not exist"):
        launcher_argv(_launch_args(["--hostfile", "missing"]), worker)
    hostfile.write_text("worker-1 eight\n")  # DeepSpeed's runner would die on it with a traceback
    with pytest.raises(UserError, match="hosts:1: 'worker-1 eight' is not 'HOST slots=N'"):
        launcher_argv(_launch_args(["--hostfile", str(hostfile)]), worker)
    with pytest.raises(UserError, match="--hostfile .* is a folder"):
        launcher_argv(_launch_args(["--hostfile", str(tmp_path)]), worker)
    with pytest.raises(UserError, match="--node-rank 2"):
        launcher_argv(_launch_args(["--nnodes", "2", "--node-rank", "2"]), worker)
    assert is_worker({"RANK": "0", "WORLD_SIZE": "2"}) and not is_worker({}) and not is_worker(
        {"RANK": "0", "WORLD_SIZE": "1"}) and is_worker({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--data.shards", "NOWHERE"], "no shard index at"),
    (["finetune", "--data.shards", "SHARDS", "--init", "NOWHERE"], "init='NOWHERE' does not exist"),
    (["evaluate", "--data.shards", "SHARDS", "--model", "NOWHERE"], "--model NOWHERE: no such file"),
    (["evaluate", "--data.shards", "SHARDS", "--model", "SHARDS", "--split", "test"], "split 'test' is not in"),
])
def test_bad_inputs_fail_once_before_launching_ranks(argv, message, digits_shards, tmp_path, capsys):
    """With --nproc 2, missing shards / weights / splits are one error from the launching process
    (exit 2), not the same error from every rank under torchrun's report of failed children."""
    from vitpipe.cli import main as vitpipe

    argv = [{"SHARDS": str(digits_shards), "NOWHERE": "NOWHERE"}.get(a, a) for a in argv]
    assert vitpipe(argv + ["--nproc", "2", "--out", str(tmp_path / "o"), "--no-tracking.enabled"]) == 2
    err = capsys.readouterr().err
    assert message in err and "launching:" not in err and err.count("error:") == 1, err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_nodes_on_localhost(digits_shards, tmp_path):
    """Two launcher processes (node ranks 0 and 1, one rank each) rendezvous on 127.0.0.1 and train."""
    from vit.train.distributed import free_port

    port = str(free_port())
    common = [sys.executable, "-m", "vitpipe.cli", "pretrain", "--data.shards", str(digits_shards),
              "--data.image-size", "16", "--data.batch-size", "16", "--data.num-workers", "0",
              "--model.preset", "micro/4", "--train.steps", "6", "--train.eval-every", "0",
              "--train.log-every", "2", "--checkpoint.every-steps", "3", "--deepspeed.zero-stage", "1",
              "--no-tracking.enabled", "--out", str(tmp_path / "run"),
              "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    nodes = [subprocess.Popen(common + ["--node-rank", str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [n.communicate(timeout=540)[0] for n in nodes]
    for r, (n, out) in enumerate(zip(nodes, outs)):
        assert n.returncode == 0, f"node {r}:\n{out[-3000:]}"
    import json

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["step"] == 6
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_hostfile_launch_over_ssh_to_two_hosts(digits_shards, tmp_path, ssh_hosts):
    """`--hostfile`: DeepSpeed's multi-node runner checks ssh, then starts one launcher per host with
    pdsh over ssh (a real sshd on 127.0.0.1; the hosts '127.0.0.1' and 'localhost' are two nodes of
    one slot each), and the two ranks train together; the MLflow URI reaches the remote ranks."""
    import json

    from mlflow import MlflowClient

    from vit.train.distributed import free_port

    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = ssh_hosts.env({**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri})
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "vitpipe.cli", "pretrain", "--data.shards", str(digits_shards),
                           "--data.image-size", "16", "--data.batch-size", "16", "--data.num-workers", "0",
                           "--model.preset", "micro/4", "--train.steps", "4", "--train.eval-every", "0",
                           "--train.log-every", "2", "--checkpoint.every-steps", "0", "--deepspeed.zero-stage", "1",
                           "--out", str(tmp_path / "run"), "--hostfile", str(hostfile),
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "deepspeed.launcher.runner" in proc.stderr
    assert "pdsh" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["step"] == 4
    run = MlflowClient(uri).get_run(results["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["vitpipe.world_size"] == "2"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_launcher_on_this_machine(digits_shards, tmp_path):
    """`--launcher deepspeed --nproc 2`: DeepSpeed's own launcher and its environment variables
    (with --hostfile, over ssh: test_hostfile_launch_over_ssh_to_two_hosts)."""
    import json

    from vit.train.distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vitpipe.cli", "pretrain", "--data.shards", str(digits_shards),
                           "--data.image-size", "16", "--data.batch-size", "16", "--data.num-workers", "0",
                           "--model.preset", "micro/4", "--train.steps", "4", "--train.eval-every", "0",
                           "--checkpoint.every-steps", "0", "--deepspeed.zero-stage", "2", "--no-tracking.enabled",
                           "--out", str(tmp_path / "run"), "--launcher", "deepspeed", "--nproc", "2",
                           "--master-port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "deepspeed.launcher.runner" in proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["step"] == 4


def test_engine_builds_again_after_the_process_group_is_recreated():
    """Stages run one after another in one process (flows, notebooks): the second engine must not
    reuse DeepSpeed's cached sub-groups of the destroyed group ('Group ... is not registered')."""
    import torch

    from vit.train.config import PretrainConfig
    from vit.train.distributed import World, destroy_process_group, init_process_group
    from vit.train.engine import build_optimizer, create_engine, ds_config, param_groups
    from vit.models.vit import create_model

    cpu = torch.device("cpu")
    cfg = PretrainConfig(data={"shards": "s", "batch_size": 4})
    for _ in range(2):
        init_process_group(World(), cpu)
        model = create_model("micro/4", num_classes=3, image_size=16)
        engine = create_engine(model, build_optimizer(param_groups(model, cfg.optim), cfg.optim, cpu),
                               ds_config(cfg, device=cpu))
        loss = engine(torch.randn(4, 3, 16, 16)).sum()
        engine.backward(loss)
        engine.step()
        destroy_process_group()


@pytest.mark.parametrize("extra, message", [
    (["--nproc", "0"], "--nproc 0 --nnodes 1: both must be >= 1"),
    (["--nproc", "2", "--tracking.fail-fast", "--tracking.uri", "UNREACHABLE"], "is unreachable"),
])
def test_bad_launch_options_and_an_unreachable_tracking_server_fail_before_any_rank(extra, message, digits_shards,
                                                                                     tmp_path, capsys):
    """`--nproc 0` used to run one process silently; `--tracking.fail-fast` failed in rank 0 only,
    under torchrun's report. Both are one line from the launching process now, exit 2."""
    from vit.train.distributed import free_port
    from vitpipe.cli import main as vitpipe

    extra = [f"http://127.0.0.1:{free_port()}" if a == "UNREACHABLE" else a for a in extra]
    assert vitpipe(["pretrain", "--data.shards", str(digits_shards), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "launching:" not in err and err.count("error:") == 1, err
    assert not (tmp_path / "o").exists()
