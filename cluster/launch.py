"""`vitpipe launch`: run a vitpipe command on several processes, hosts or Slurm nodes.

Call it in front of any vitpipe command; it builds the launcher's command line, runs it (or
prints it with `--dry-run`) and forwards everything after the options to `vitpipe` on every rank:

    vitpipe launch --nproc-per-node 8 pretrain cfg.yaml                         # this machine, torchrun
    vitpipe launch --backend deepspeed --deepspeed.hostfile hosts --nodes 2 --nproc-per-node 8 \\
        pretrain cfg.yaml                                                      # DeepSpeed launcher, ssh
    vitpipe launch --backend slurm --nodes 2 --nproc-per-node 8 --slurm.partition gpu \\
        pretrain cfg.yaml                                                      # sbatch, follows the job

Backends, all thin: `local` is `torchrun --standalone`; `deepspeed` is DeepSpeed's own launcher
with an MPI-style hostfile; `slurm` submits `cluster/vitpipe.sbatch` (srun + torchrun rendezvous)
and, unless `--no-slurm.wait`, streams the job's log and exits with its state; Ctrl-C cancels it.

Stopping it (SIGTERM from a preemption, an orchestrator or `kill`; SIGINT; SIGHUP) stops every
rank, not only the launcher's process group: ranks get SIGTERM (they save a checkpoint) and
`stop_grace` seconds to exit, then whatever is left is killed; on Slurm the job is cancelled.
`vitpipe launch` then exits 128 + the signal (143 for SIGTERM), which retry policies (the flows')
read as "stopped from outside: relaunch, it resumes". Ranks die with their launcher even when it
is killed outright (SIGKILL): see `cluster.process_tree`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from vit.train.launch import read_hostfile
from vitpipe.config import StageConfig, add_config_arguments, config_from_args
from vitpipe.errors import UserError

SBATCH_SCRIPT = Path(__file__).with_name("vitpipe.sbatch")
_ERROR_LINE = re.compile(r"error:|Error\b|Exception\b")


class SlurmOptions(StageConfig):
    partition: str | None = Field(None, description="partition (queue) to run in; unset: the site's default")
    account: str | None = Field(None, description="account to charge, where the site requires one")
    time: str | None = Field(None, description="wall-clock limit, e.g. 2-00:00:00; unset: the partition's")
    gpus_per_node: int | None = Field(
        None, ge=0, description="GPUs to request per node; unset: nproc_per_node; 0 on CPU-only partitions")
    cpus_per_task: int | None = Field(
        None, ge=1, description="cores per node for the ranks' data loaders; unset: the script's (32)")
    job_name: str = Field("vitpipe", description="name shown by squeue")
    output: str = Field("vitpipe-%j.out", description="job log file (%j: job id), relative to the working dir")
    script: str | None = Field(None, description="batch script to submit; unset: the packaged cluster/vitpipe.sbatch")
    extra_args: list[str] = Field(
        default_factory=list, description="more sbatch options, e.g. ['--exclusive', '--qos=high']")
    wait: bool = Field(True, description="follow the job to its end (log, state); False: submit and return")
    poll: float = Field(10.0, gt=0, description="seconds between job state checks while following")


class DeepSpeedOptions(StageConfig):
    hostfile: str | None = Field(
        None, description="MPI-style hostfile, 'HOST slots=GPUS' per line (cluster/hostfile.example); "
                          "unset: this machine only")
    master_addr: str | None = Field(None, description="address of the first host as the others reach it; "
                                                      "unset: DeepSpeed asks the first host over ssh")
    master_port: int = Field(29500, ge=1, le=65535, description="rendezvous port on the first host")
    extra_args: list[str] = Field(
        default_factory=list, description="more DeepSpeed launcher options, e.g. ['--launcher', 'openmpi']")


class LaunchConfig(StageConfig):
    backend: Literal["local", "deepspeed", "slurm"] = Field(
        "local", description="local: torchrun on this machine; deepspeed: DeepSpeed launcher over a "
                             "hostfile; slurm: sbatch the packaged batch script")
    nodes: int = Field(1, ge=1, description="machines to run on")
    nproc_per_node: int = Field(
        1, ge=1, description="ranks per machine: one per GPU (8 on an 8-GPU node); CPU processes without GPUs")
    module: str = Field("vitpipe.cli", description="Python module every rank runs; cluster.allreduce_check "
                                                   "tests rendezvous and the network in seconds")
    stop_grace: float = Field(30.0, ge=0, description="seconds the ranks get to save a checkpoint and exit when the "
                                                      "launch is stopped (SIGTERM/SIGINT), before they are killed")
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions)


@dataclass
class Launch:
    """A command to run (or to submit) and the variables it needs beyond this environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one line a user can paste into a shell."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


RANKED = ("pretrain", "finetune", "evaluate")  # the stages that run as ranks of one job


def _check_command(cfg: LaunchConfig, command: list[str]) -> None:
    """What the command must be, whatever the backend (dry runs included)."""
    if cfg.module != "vitpipe.cli":
        return
    from vitpipe.cli import COMMANDS

    if not command:
        raise UserError("no vitpipe command to launch; add one after the options, "
                        "e.g. 'vitpipe launch --nproc-per-node 2 pretrain cfg.yaml'")
    name = command[0]
    if name == "launch":
        raise UserError("'vitpipe launch launch ...': the command to launch is a stage "
                        "(pretrain, finetune, evaluate...), not launch itself")
    if name not in COMMANDS:
        raise UserError(f"{name!r} is not a vitpipe command; launch one of {', '.join(RANKED)}")
    if name not in RANKED and cfg.nodes * cfg.nproc_per_node > 1:
        raise UserError(f"'vitpipe {name}' runs as one process; launch runs {', '.join(RANKED)} on several "
                        f"ranks (run 'vitpipe {name}' directly)")


def local_launch(cfg: LaunchConfig, command: list[str]) -> Launch:
    """This machine: one plain process, or `torchrun --standalone` for several ranks."""
    from vit.train.launch import launcher_argv

    if cfg.nodes != 1:
        raise UserError(f"--nodes {cfg.nodes} with --backend local: local runs on this machine only; "
                        "use --backend deepspeed (hostfile) or --backend slurm for several machines")
    if cfg.deepspeed.hostfile:
        raise UserError(f"--deepspeed.hostfile {cfg.deepspeed.hostfile!r} is read by --backend deepspeed; "
                        "add it, or drop the hostfile to run on this machine")
    if cfg.nproc_per_node == 1:
        return Launch([sys.executable, "-m", cfg.module, *command])
    # The same torchrun command `vitpipe pretrain --nproc N` builds for itself.
    opts = argparse.Namespace(nproc=cfg.nproc_per_node, nnodes=1, node_rank=0, master_addr="127.0.0.1",
                              master_port=29500, rdzv_endpoint=None, rdzv_id="vitpipe", hostfile=None,
                              launcher="torchrun", max_restarts=0)
    return Launch(launcher_argv(opts, command, module=cfg.module))


def _is_this_machine(host: str) -> bool:
    return host in {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}


def deepspeed_launch(cfg: LaunchConfig, command: list[str]) -> Launch:
    """DeepSpeed's launcher: pdsh/ssh to the first `nodes` hosts of the hostfile, `nproc_per_node` ranks each.

    Built here rather than by vit.train.launch.launcher_argv, which uses every host and slot of the file
    (`vitpipe pretrain --hostfile`); this one selects the hosts and GPUs a launch profile asks for.
    """
    ds = cfg.deepspeed
    argv = [sys.executable, "-m", "deepspeed.launcher.runner"]
    master_addr = ds.master_addr
    if ds.hostfile:
        hosts = read_hostfile(ds.hostfile, option="--deepspeed.hostfile")
        if cfg.nodes > len(hosts):
            raise UserError(f"--nodes {cfg.nodes}: the hostfile {ds.hostfile} lists only {len(hosts)} "
                            f"host(s) ({', '.join(hosts)}); add hosts or lower --nodes")
        used = dict(list(hosts.items())[:cfg.nodes])
        short = {h: s for h, s in used.items() if s < cfg.nproc_per_node}
        if short:
            raise UserError(f"--nproc-per-node {cfg.nproc_per_node}: host(s) "
                            f"{', '.join(f'{h} (slots={s})' for h, s in short.items())} have fewer slots; "
                            "lower --nproc-per-node or raise slots= in the hostfile")
        argv += ["--hostfile", str(ds.hostfile)]
        if len(used) == 1 and _is_this_machine(next(iter(used))):
            # One local host: DeepSpeed launches it directly, so its ssh probe would only fail.
            argv.append("--no_ssh_check")
            master_addr = master_addr or "127.0.0.1"
    elif cfg.nodes != 1:
        raise UserError(f"--nodes {cfg.nodes} with --backend deepspeed needs --deepspeed.hostfile "
                        "listing the machines ('HOST slots=GPUS' per line)")
    else:
        # No hostfile: this machine only, so nothing to reach over ssh.
        argv.append("--no_ssh_check")
        master_addr = master_addr or "127.0.0.1"
    argv += [f"--num_nodes={cfg.nodes}", f"--num_gpus={cfg.nproc_per_node}",
             f"--master_port={ds.master_port}"]
    if master_addr:
        argv.append(f"--master_addr={master_addr}")
    # vitpipe reads LOCAL_RANK from the environment; a --local_rank argument would be an
    # unknown option to every stage.
    argv += ["--no_local_rank", *ds.extra_args, "--module", cfg.module, *command]
    return Launch(argv)


@dataclass
class SlurmSubmission:
    """What `cluster.slurm.submit` gets: sbatch options, the batch script, its arguments, env."""

    sbatch_args: list[str]
    script: Path
    args: list[str]
    env: dict[str, str]


def slurm_submission(cfg: LaunchConfig, command: list[str]) -> SlurmSubmission:
    """The sbatch options for `cfg` (nodes, GPUs, partition...) and the command to forward."""
    s = cfg.slurm
    gpus = cfg.nproc_per_node if s.gpus_per_node is None else s.gpus_per_node
    sbatch = [f"--job-name={s.job_name}", f"--nodes={cfg.nodes}", "--ntasks-per-node=1",
              f"--gpus-per-node={gpus}", f"--output={s.output}"]
    for flag, value in (("partition", s.partition), ("account", s.account), ("time", s.time),
                        ("cpus-per-task", s.cpus_per_task)):
        if value is not None:
            sbatch.append(f"--{flag}={value}")
    env = {
        # The job runs the interpreter that submitted it: cluster nodes share the filesystem.
        "VITPIPE_PYTHON": sys.executable,
        "VITPIPE_PROCS_PER_NODE": str(cfg.nproc_per_node),
        "VITPIPE_MODULE": cfg.module,
    }
    script = Path(s.script) if s.script else SBATCH_SCRIPT
    return SlurmSubmission([*sbatch, *s.extra_args], script, command, env)


def slurm_launch(cfg: LaunchConfig, command: list[str]) -> Launch:
    """`sbatch` of the batch script with the nodes, GPUs and the command given."""
    sub = slurm_submission(cfg, command)
    return Launch(["sbatch", *sub.sbatch_args, str(sub.script), *sub.args], sub.env)


BACKENDS = {"local": local_launch, "deepspeed": deepspeed_launch, "slurm": slurm_launch}


def build_launch(cfg: LaunchConfig, command: list[str]) -> Launch:
    """The command line `cfg.backend` runs for the vitpipe `command` (a stage and its options)."""
    _check_command(cfg, command)
    return BACKENDS[cfg.backend](cfg, command)


def run_slurm(cfg: LaunchConfig, command: list[str]) -> int:
    """Submit; then (with slurm.wait) stream the job's log and return `exit_status` of its end."""
    from cluster import slurm

    sub = slurm_submission(cfg, command)
    job_id = slurm.submit(sub.script, sub.args, sbatch_args=sub.sbatch_args, env=sub.env)
    print(f"vitpipe launch: submitted Slurm job {job_id}", file=sys.stderr, flush=True)
    if not cfg.slurm.wait:
        print(job_id)
        return 0

    def on_state(st: slurm.JobStatus) -> None:
        print(f"vitpipe launch: job {job_id} {st.summary()}", file=sys.stderr, flush=True)

    first_error: list[str] = []

    def on_log(line: str) -> None:
        print(line, flush=True)
        # The ranks' own error comes first; torchrun's and srun's reports of it follow and
        # push it out of view (and out of an orchestrator's log tail).
        if not first_error and _ERROR_LINE.search(line) and not line.startswith(("srun:", "slurmstepd")):
            first_error.append(line.strip())

    # Orchestrators (Prefect cancelling a flow run, Kubernetes, CI) stop us with SIGTERM, which
    # would otherwise end this process and leave the job running: wait() cancels it on the way out.
    try:
        with _stopped_by_signals():
            final = slurm.wait(job_id, poll=cfg.slurm.poll, on_log=on_log, on_state=on_state)
    except Stopped as stop:
        print(f"vitpipe launch: received {stop.name}; cancelled Slurm job {job_id} (relaunch to resume "
              f"from its latest checkpoint)", file=sys.stderr, flush=True)
        return 128 + stop.signum
    if final.ok:
        print(f"vitpipe launch: Slurm job {job_id} {final.summary()}", file=sys.stderr, flush=True)
        return 0
    cause = f"; first error in its log: {first_error[0]}" if first_error else ""
    print(f"vitpipe launch: Slurm job {job_id} {final.summary()}{cause}", file=sys.stderr, flush=True)
    return exit_status(final, first_error[0] if first_error else "")


# What the job's end means for whoever runs `vitpipe launch` (a shell, a Prefect retry policy):
# ended from outside, worth a retry that resumes from the checkpoint -> 128 + SIGTERM.
_KILLED_FROM_OUTSIDE = {"PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "TIMEOUT", "DEADLINE"}


def exit_status(final, first_error: str = "") -> int:
    """`vitpipe launch`'s exit status for a finished Slurm job, in the vitpipe convention.

    0 completed; 2 a rank stopped on bad input (`vitpipe STAGE: error:`, not worth a retry);
    130 cancelled (scancel); 137 out of memory; 143 preempted, node failure or time limit (a
    retry resumes from the last checkpoint); 1 any other failure. The batch script's own exit
    code is no guide: srun reports a rank that it killed after another one failed as 143.
    """
    if final.ok:
        return 0
    if final.state == "CANCELLED":
        return 128 + signal.SIGINT
    if final.state == "OUT_OF_MEMORY":
        return 128 + signal.SIGKILL
    if final.state in _KILLED_FROM_OUTSIDE:
        return 128 + signal.SIGTERM
    if re.match(r"vitpipe \w+: error: ", first_error):
        return 2
    return 1


def _stage(command: list[str]):
    """The stage module and config of a ranked vitpipe command (None for other commands)."""
    import importlib

    from vitpipe.cli import COMMANDS, build_parser

    name = command[0]
    if name not in RANKED:
        return None
    args, unknown = build_parser(name).parse_known_args(command)
    if unknown:
        raise UserError(f"vitpipe {name}: unrecognized arguments: {' '.join(unknown)}; see 'vitpipe {name} --help'")
    stage = importlib.import_module(COMMANDS[name][0])
    return stage, stage.cli_config(args)


def _preflight(command: list[str]) -> None:
    """Parse a stage command and run its cheap input checks here, once: launched as is, each rank
    would print the same error under the launcher's report of failed children."""
    if found := _stage(command):
        stage, cfg = found
        stage.preflight(cfg)


def _close_job_run(command: list[str], rc: int, *, stopped: bool | None = None) -> None:
    """After the ranks of a training job are gone: its MLflow run closed if rank 0 could not (it was
    SIGKILLed, or died with its node), so no run stays RUNNING. Best effort: for Slurm, the run
    record lies on the cluster's filesystem, which this host may not see."""
    if rc == 0:
        return
    try:
        found = _stage(command)
    except (UserError, OSError):  # e.g. a config file only the cluster's nodes see
        return
    if found is None or not hasattr(found[1], "checkpoint"):  # evaluate: no checkpoints, no run record
        return
    from vit.train.loop import close_job_run

    close_job_run(found[1], rc, stopped=stopped)


class Stopped(Exception):
    """This launch was asked to stop by a signal (SIGTERM, SIGINT, SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def _stopped_by_signals():
    """While inside: SIGTERM, SIGINT and SIGHUP raise `Stopped` (in the main thread), once."""
    def on_signal(signum, frame):
        for s in _STOP_SIGNALS:  # a second signal while stopping must not interrupt the stop
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {s: signal.signal(s, on_signal) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_stoppable(argv: list[str], env: dict[str, str], *, grace: float) -> int:
    """Run a launcher (torchrun, DeepSpeed's runner, one process) to its end; its exit status.

    Stopped by a signal, it stops the launcher and every rank below it (`process_tree.stop_tree`)
    and returns 128 + the signal. This process is the ranks' subreaper, so a rank that lost its
    launcher is still found and stopped; ranks left behind by a launcher that exited are too.
    """
    from cluster import process_tree

    process_tree.become_subreaper()
    try:
        with _stopped_by_signals():
            proc = subprocess.Popen(argv, env=env, preexec_fn=process_tree.preexec_die_with_parent())
            rc = proc.wait()
    except Stopped as stop:
        ranks = process_tree.descendants(os.getpid())
        print(f"vitpipe launch: received {stop.name}; stopping {len(ranks)} process(es) (ranks save a "
              f"checkpoint; killed after {grace:g}s)", file=sys.stderr, flush=True)
        killed = process_tree.stop_tree(os.getpid(), grace=grace, include_root=False)
        print(f"vitpipe launch: stopped{f' ({len(killed)} killed)' if killed else ''}; the same command "
              f"resumes from the latest checkpoint", file=sys.stderr, flush=True)
        return 128 + stop.signum
    left = process_tree.descendants(os.getpid())
    if left:  # ranks whose launcher exited without them (reparented to us)
        print(f"vitpipe launch: stopping {len(left)} process(es) the launcher left running", file=sys.stderr,
              flush=True)
        process_tree.stop_tree(os.getpid(), grace=grace, include_root=False)
    return rc


def launch(cfg: LaunchConfig, command: list[str], *, dry_run: bool = False) -> int:
    """Run (or with `dry_run`, print) `command` through the configured backend; the exit status."""
    plan = build_launch(cfg, command)
    if dry_run:
        print(plan.shell())
        return 0
    if cfg.module == "vitpipe.cli" and cfg.backend != "slurm":
        # Not for Slurm: its nodes may see paths (a cluster filesystem) that the submitting host does not.
        _preflight(command)
    if cfg.backend == "slurm":
        rc = run_slurm(cfg, command)
    else:
        print(f"vitpipe launch: {plan.shell()}", file=sys.stderr, flush=True)
        rc = run_stoppable(plan.argv, {**os.environ, **plan.env}, grace=cfg.stop_grace)
    if cfg.module == "vitpipe.cli":
        _close_job_run(command, rc)
    return rc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, LaunchConfig)
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("forward", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                        help="the vitpipe command every rank runs, e.g. 'pretrain cfg.yaml --optim.lr 1e-3'")


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(LaunchConfig, args)
    command = list(args.forward)
    if command[:1] == ["--"]:
        command = command[1:]
    return launch(cfg, command, dry_run=args.dry_run)


def after_job(argv: list[str]) -> int:
    """`python -m cluster.launch after-job RC COMMAND...`: run by cluster/vitpipe.sbatch on the job's
    first node once its ranks are gone, so that a job submitted with a bare `sbatch` closes its
    MLflow run too when rank 0 could not (SIGKILLed, out of memory, its node lost). Exits RC."""
    if len(argv) < 2 or argv[0] != "after-job" or not argv[1].isdigit():
        print("usage: python -m cluster.launch after-job EXIT_CODE VITPIPE_COMMAND ...", file=sys.stderr)
        return 2
    rc = int(argv[1])
    try:
        # FAILED, whatever the code: srun itself ends the other nodes' tasks with SIGTERM once one
        # fails (--kill-on-bad-exit), so its 143 does not mean the job was stopped; a stopped job
        # (scancel, preemption, time limit) has rank 0 close its run as KILLED, and this script
        # is signalled too, before it gets here.
        _close_job_run(argv[2:], rc, stopped=False)
    except Exception as e:  # noqa: BLE001  the job's own status matters more than this best-effort close
        print(f"vitpipe: could not check the job's MLflow run after exit {rc}: {e}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(after_job(sys.argv[1:]))
