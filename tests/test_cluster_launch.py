"""`vitpipe launch`: the commands each backend builds, bad input, and real local/DeepSpeed runs.

The Slurm backend's real runs are in test_slurm.py (they need the test Slurm cluster).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

import pytest

from cluster.launch import SBATCH_SCRIPT, LaunchConfig, build_launch
from vit.train.launch import read_hostfile
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
    with pytest.raises(UserError, match="--deepspeed.hostfile 'hosts' is read by --backend deepspeed"):
        build_launch(LaunchConfig(deepspeed={"hostfile": "hosts"}), ["pretrain"])  # not silently ignored


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
        build_launch(LaunchConfig(backend="deepspeed", nodes=3, deepspeed={"hostfile": str(hostfile)}), ["pretrain"])
    with pytest.raises(UserError, match=r"--nproc-per-node 4: host\(s\) a \(slots=2\)"):
        build_launch(LaunchConfig(backend="deepspeed", nodes=2, nproc_per_node=4,
                                  deepspeed={"hostfile": str(hostfile)}), ["pretrain"])
    for bad in ("a slots=0\n", "a\n", "a slots=2\na slots=2\n", "# only a comment\n"):
        hostfile.write_text(bad)
        with pytest.raises(UserError, match="hostfile|slots"):
            read_hostfile(hostfile)


@pytest.mark.parametrize("command, message", [
    (["pretrain", "--data.shards", "nope"], "no shard index at 'nope/index.json'"),
    (["frobnicate"], "'frobnicate' is not a vitpipe command"),
    (["shard", "a", "b"], "'vitpipe shard' runs as one process"),
    (["pretrain", "--data.bogus", "1"], "vitpipe pretrain: unrecognized arguments: --data.bogus"),
    (["evaluate", "--model", "nope", "--data.shards", "SHARDS"], "--model nope: no such file"),
])
def test_launch_checks_the_command_once_before_starting_ranks(command, message, digits_shards, capsys):
    """Each rank would print the same error under torchrun's report (exit 1); checked here: exit 2."""
    command = [str(digits_shards) if c == "SHARDS" else c for c in command]
    assert main(["launch", "--nproc-per-node", "2", *command]) == 2
    err = capsys.readouterr().err
    assert message in err and "torch.distributed.run" not in err and "Traceback" not in err, err


def test_sbatch_script_is_valid_bash():
    res = subprocess.run(["bash", "-n", str(SBATCH_SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = SBATCH_SCRIPT.read_text()
    assert '-m "${VITPIPE_MODULE:-vitpipe.cli}" "$@"' in text  # forwards everything to the entry point



def test_the_sbatch_scripts_after_job_step_keeps_the_jobs_exit_code(tmp_path):
    """`python -m cluster.launch after-job RC COMMAND...` (what cluster/vitpipe.sbatch runs after a
    failed srun): bad arguments are a usage line and exit 2; a command whose run it cannot find (no
    checkpoints, a config only other hosts see) changes nothing and exits RC. Closing a real run:
    tests/test_slurm.py::test_a_bare_sbatch_job_closes_its_run_when_rank0_is_sigkilled."""
    def after_job(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.launch", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)

    for bad in ([], ["after-job"], ["after-job", "-1", "pretrain"], ["after-job", "x", "pretrain"], ["1", "x"]):
        res = after_job(*bad)
        assert res.returncode == 2 and "usage: python -m cluster.launch after-job EXIT_CODE" in res.stderr, bad
    for command in (["pretrain", "--out", str(tmp_path / "never-ran")], ["pretrain", str(tmp_path / "gone.yaml")],
                    ["evaluate", "--model", "x"]):
        res = after_job("after-job", "137", *command)
        assert res.returncode == 137 and "Traceback" not in res.stderr and "closed as" not in res.stderr, res.stderr
    assert not list(tmp_path.rglob("mlflow*"))


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


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests and the container recipe. No Kubernetes cluster (nor Docker) is available
# here, so these check what a cluster would act on: the objects' links to each other, the pod's
# command as torchrun and vitpipe themselves parse it, and the mounted run config as vitpipe
# validates it.

K8S = SBATCH_SCRIPT.parent / "k8s"


def _k8s(name: str) -> dict[str, dict]:
    import yaml

    return {d["kind"]: d for d in yaml.safe_load_all((K8S / name).read_text()) if d}


def _check_pod_command(container: dict, config_map: dict, tmp_path) -> tuple:
    """The container runs torchrun -m vitpipe.cli pretrain FILE, FILE is the mounted ConfigMap,
    and that file is a valid PretrainConfig. Returns torchrun's parsed arguments."""
    from torch.distributed.run import get_args_parser

    from vit.train.config import PretrainConfig
    from vitpipe.cli import build_parser
    from vitpipe.config import build_config

    assert container["command"] == ["python", "-m", "torch.distributed.run"]
    args = container["args"]
    run = get_args_parser().parse_args(args)
    assert run.module and run.training_script == "vitpipe.cli"
    stage = run.training_script_args
    assert stage[0] == "pretrain"
    build_parser("pretrain").parse_args(stage)  # the stage accepts its arguments

    config_path = stage[1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert os.path.dirname(config_path) == mounts["config"]
    assert mounts["dshm"] == "/dev/shm"
    key = os.path.basename(config_path)
    local = tmp_path / key
    local.write_text(config_map["data"][key])
    cfg = build_config(PretrainConfig, local)
    assert cfg.checkpoint.dir.startswith(mounts["runs"]) and cfg.out.startswith(mounts["runs"])
    return run, cfg


def test_indexed_job_manifest(tmp_path):
    objs = _k8s("pretrain-job.yaml")
    config_map = _k8s("pretrain-config.yaml")["ConfigMap"]
    service, job = objs["Service"], objs["Job"]
    pod = job["spec"]["template"]
    container = pod["spec"]["containers"][0]
    run, cfg = _check_pod_command(container, config_map, tmp_path)

    # one pod per node, all at once, named NAME-INDEX
    assert job["spec"]["completionMode"] == "Indexed"
    nodes = job["spec"]["completions"]
    assert job["spec"]["parallelism"] == nodes and run.nnodes == str(nodes)
    # the rendezvous host is pod 0's DNS name through the headless Service
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert all(pod["metadata"]["labels"].get(k) == v for k, v in service["spec"]["selector"].items())
    host, port = run.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}" and run.rdzv_backend == "c10d"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    # one rank per GPU
    assert int(run.nproc_per_node) == container["resources"]["limits"]["nvidia.com/gpu"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert cfg.deepspeed.zero_stage >= 1  # the multi-node example shards optimizer state


def test_pytorchjob_manifest(tmp_path, monkeypatch):
    job = _k8s("pytorchjob.yaml")["PyTorchJob"]
    config_map = _k8s("pretrain-config.yaml")["ConfigMap"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    nodes = specs["Master"]["replicas"] + specs["Worker"]["replicas"]
    container = specs["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"  # the training operator injects its variables there
    # What the operator sets on each pod; torchrun reads PET_* as its options' defaults.
    for key, value in {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
                       "PET_MASTER_ADDR": "vitpipe-pretrain-master-0", "PET_MASTER_PORT": "23456",
                       "PET_NODE_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    run, _ = _check_pod_command(container, config_map, tmp_path)
    assert run.nnodes == str(nodes) and run.nproc_per_node == "8" and run.node_rank == 1
    assert int(run.nproc_per_node) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert specs["Master"]["template"] == specs["Worker"]["template"]


def test_dockerfile_installs_the_package():
    text = (SBATCH_SCRIPT.parent / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("ARG BASE=") and lines[1] == "FROM ${BASE}"
    copies = [line.split()[1] for line in lines if line.startswith("COPY ")]
    root = SBATCH_SCRIPT.parent.parent
    for src in copies:  # every COPY source exists in the build context (the repository root)
        assert (root / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    packages = set(__import__("setuptools").find_packages(str(root), include=["vitpipe*", "pipeline*", "vit*",
                                                                               "flows*", "cluster*"]))
    assert {p.split(".")[0] + "/" for p in packages} <= set(copies)
    assert any(line.startswith("RUN pip install .") for line in lines)
    assert lines[-2] == 'ENTRYPOINT ["vitpipe"]'


@pytest.mark.parametrize("state, exit_code, first_error, expected", [
    ("COMPLETED", 0, "", 0),
    ("FAILED", 1, "vitpipe pretrain: error: model 'micro/4': unknown override(s) x", 2),
    ("FAILED", 143, "RuntimeError: CUDA error: an illegal memory access", 1),  # srun's 143 is not ours
    ("CANCELLED", 0, "", 130),
    ("PREEMPTED", 0, "", 143),
    ("TIMEOUT", 0, "", 143),
    ("OUT_OF_MEMORY", 0, "", 137),
])
def test_slurm_job_end_to_exit_status(state, exit_code, first_error, expected):
    """Orchestrators decide on retries from `vitpipe launch`'s status: bad input never, preemption yes."""
    from cluster.launch import exit_status
    from cluster.slurm import JobStatus

    assert exit_status(JobStatus("7", state, exit_code=exit_code), first_error) == expected
