"""`vitpipe launch`: the commands each backend builds, bad input, and real local/DeepSpeed runs.

The Slurm backend's real runs are in test_slurm.py (they need the test Slurm cluster).
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys

import pytest

from cluster.launch import SBATCH_SCRIPT, LaunchConfig, build_launch, read_hostfile
from vitpipe.cli import main
from vitpipe.errors import UserError


def _dry_run(capsys, *args: str) -> list[str]:
    assert main(["launch", "--dry-run", *args]) == 0
    return shlex.split(capsys.readouterr().out.strip())


def _after(argv: list[str], marker: str) -> list[str]:
    return argv[argv.index(marker) + 1:]


def test_local_dry_run_forwards_the_command(capsys):
    argv = _dry_run(capsys, "--nproc-per-node", "4", "pretrain", "cfg.yaml", "--optim.lr", "1e-3")
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in argv and argv[argv.index("--nproc-per-node") + 1] == "4"
    assert _after(argv, "-m")[-5:] == ["vitpipe.cli", "pretrain", "cfg.yaml", "--optim.lr", "1e-3"]
    # one rank: no launcher at all, the stage runs in one plain process
    assert _dry_run(capsys, "--", "pretrain", "cfg.yaml") == [sys.executable, "-m", "vitpipe.cli",
                                                             "pretrain", "cfg.yaml"]


def test_slurm_dry_run_requests_nodes_and_gpus(capsys):
    argv = _dry_run(capsys, "--backend", "slurm", "--nodes", "2", "--nproc-per-node", "8",
                    "--slurm.partition", "gpu", "--slurm.time", "1-00:00:00",
                    "--slurm.extra-args", "[--exclusive]", "pretrain", "cfg.yaml", "--train.steps", "100")
    env = dict(a.split("=", 1) for a in argv[:3])
    assert env == {"VITPIPE_PYTHON": sys.executable, "VITPIPE_PROCS_PER_NODE": "8", "VITPIPE_MODULE": "vitpipe.cli"}
    sbatch = argv[3:]
    assert sbatch[0] == "sbatch"
    for opt in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                "--time=1-00:00:00", "--exclusive"):
        assert opt in sbatch
    assert _after(sbatch, str(SBATCH_SCRIPT)) == ["pretrain", "cfg.yaml", "--train.steps", "100"]


def test_deepspeed_dry_run_with_hostfile(capsys, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two 8-GPU machines\ngpu-a slots=8\ngpu-b slots=8  # spare\ngpu-c slots=8\n")
    argv = _dry_run(capsys, "--backend", "deepspeed", "--deepspeed.hostfile", str(hostfile), "--nodes", "2",
                    "--nproc-per-node", "8", "--deepspeed.master-addr", "10.0.0.1", "pretrain", "cfg.yaml")
    assert argv[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    for opt in ("--num_nodes=2", "--num_gpus=8", "--master_addr=10.0.0.1", "--no_local_rank"):
        assert opt in argv
    assert argv[argv.index("--hostfile") + 1] == str(hostfile)
    assert "--no_ssh_check" not in argv  # remote hosts: DeepSpeed's ssh check is worth having
    assert _after(argv, "--module") == ["vitpipe.cli", "pretrain", "cfg.yaml"]


def test_config_file_and_command_line(tmp_path, capsys):
    """A launch profile in YAML (cluster defaults) with the command line winning."""
    profile = tmp_path / "cluster.yaml"
    profile.write_text("backend: slurm\nnodes: 2\nnproc_per_node: 8\nslurm: {partition: gpu, account: vision}\n")
    argv = _dry_run(capsys, "--config", str(profile), "--slurm.partition", "debug", "evaluate", "x.yaml")
    assert "--partition=debug" in argv and "--account=vision" in argv and "--nodes=2" in argv


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2", "pretrain", "c.yaml"], "--nodes 2 with --backend local"),
    (["--backend", "deepspeed", "--nodes", "2", "pretrain", "c.yaml"], "needs --deepspeed.hostfile"),
    (["--backend", "deepspeed", "--deepspeed.hostfile", "/no/such/hosts", "pretrain", "c.yaml"],
     "'/no/such/hosts' does not exist"),
    ([], "no vitpipe command to launch"),
    (["launch", "pretrain"], "not launch itself"),
    (["--backend", "kubernetes", "pretrain"], "backend"),
    (["--nproc-per-node", "0", "pretrain"], "nproc_per_node"),
])
def test_bad_input_names_the_value(args, message, capsys):
    assert main(["launch", "--dry-run", *args]) == 2
    assert message in capsys.readouterr().err


def test_hostfile_checks(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=2\nb slots=4\n")
    assert read_hostfile(hostfile) == {"a": 2, "b": 4}
    with pytest.raises(UserError, match="--nodes 3: the hostfile .* lists only 2"):
        build_launch(LaunchConfig(backend="deepspeed", nodes=3, deepspeed={"hostfile": str(hostfile)}), ["x"])
    with pytest.raises(UserError, match=r"--nproc-per-node 4: host\(s\) a \(slots=2\)"):
        build_launch(LaunchConfig(backend="deepspeed", nodes=2, nproc_per_node=4,
                                  deepspeed={"hostfile": str(hostfile)}), ["x"])
    for bad in ("a slots=0\n", "a\n", "a slots=2\na slots=2\n", "# only a comment\n"):
        hostfile.write_text(bad)
        with pytest.raises(UserError, match="hostfile|slots"):
            read_hostfile(hostfile)


def test_sbatch_script_is_valid_bash():
    res = subprocess.run(["bash", "-n", str(SBATCH_SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = SBATCH_SCRIPT.read_text()
    assert '-m "${VITPIPE_MODULE:-vitpipe.cli}" "$@"' in text  # forwards everything to the entry point


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["local", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_two_ranks_meet(backend, tmp_path, monkeypatch):
    """Real launches: two ranks rendezvous and all_reduce (torchrun, then DeepSpeed's launcher with a
    one-host hostfile, the way a multi-host one is read)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    extra = []
    if backend == "deepspeed":
        hostfile = tmp_path / "hosts"
        hostfile.write_text("localhost slots=2\n")
        with socket.socket() as s:  # a free port: other tests' jobs may hold 29500
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        extra = ["--deepspeed.hostfile", str(hostfile), "--deepspeed.master-port", str(port)]
    res = subprocess.run([sys.executable, "-m", "vitpipe.cli", "launch", "--backend", backend,
                          "--nproc-per-node", "2", *extra, "--module", "cluster.allreduce_check"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rank 0/2" in res.stdout and "rank 1/2" in res.stdout and "OK, 2 ranks" in res.stdout
