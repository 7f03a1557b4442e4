"""Start a training command on several processes or nodes by re-running it under a launcher.

`vitpipe pretrain CFG --nproc 2` is the user's whole interface: the command sees that it is not a
launched worker yet (no RANK in the environment), builds the launcher's command line around its
own arguments minus the launch options, and replaces itself with it. Each worker then runs the
same command and reads its rank from the environment (vit.train.distributed.World).

    one process          vitpipe pretrain run.yaml
    one node, 4 procs    vitpipe pretrain run.yaml --nproc 4                       (torchrun --standalone)
    node r of N, static  vitpipe pretrain run.yaml --nproc 8 --nnodes N --node-rank r --master-addr HOST
    elastic rendezvous   vitpipe pretrain run.yaml --nproc 8 --nnodes N --rdzv-endpoint HOST:29400
    DeepSpeed launcher   vitpipe pretrain run.yaml --hostfile hosts.txt              (ssh/pdsh to each host)
                         vitpipe pretrain run.yaml --launcher deepspeed --nproc 4    (this machine)
    Slurm                srun vitpipe pretrain run.yaml                              (one task per GPU)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from vitpipe.errors import UserError

# option -> takes a value; stripped from the worker's command line
_LAUNCH_OPTIONS = {"--nproc": True, "--nnodes": True, "--node-rank": True, "--master-addr": True,
                   "--master-port": True, "--rdzv-endpoint": True, "--rdzv-id": True, "--hostfile": True,
                   "--launcher": True, "--max-restarts": True}


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose how many processes run the command, and where."""
    g = parser.add_argument_group("launch options (ignored inside a launched worker)")
    g.add_argument("--nproc", type=int, default=1, help="processes per node, e.g. the number of GPUs [default: 1]")
    g.add_argument("--nnodes", type=int, default=1, help="number of nodes [default: 1]")
    g.add_argument("--node-rank", type=int, default=0, help="index of this node, 0..nnodes-1 (static rendezvous)")
    g.add_argument("--master-addr", default=None,
                   help="address of node 0 [default: 127.0.0.1; with --hostfile, the file's first host]")
    g.add_argument("--master-port", type=int, default=29500, help="port on node 0 (static rendezvous)")
    g.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT of a torchrun c10d rendezvous: nodes join in any order, no node ranks")
    g.add_argument("--rdzv-id", default="vitpipe", help="job id shared by the nodes of one rendezvous")
    g.add_argument("--hostfile", default=None,
                   help="DeepSpeed hostfile ('host slots=N' per line): launch on every host over ssh/pdsh")
    g.add_argument("--launcher", choices=["auto", "torchrun", "deepspeed"], default="auto",
                   help="auto = deepspeed with --hostfile, torchrun otherwise")
    g.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts of a failed worker group; each restart resumes from the checkpoint")


def is_worker(env=None) -> bool:
    """True inside a process of a multi-process job (torchrun, the DeepSpeed launcher, srun)."""
    from vit.train.distributed import World

    return World.from_env(os.environ if env is None else env).is_distributed


def wants_launcher(args: argparse.Namespace) -> bool:
    return args.nproc > 1 or args.nnodes > 1 or bool(args.hostfile) or bool(args.rdzv_endpoint)


def strip_launch_options(argv: list[str]) -> list[str]:
    """The command line minus the launch options, for the workers to run."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _LAUNCH_OPTIONS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def launcher_argv(args: argparse.Namespace, worker_argv: list[str], *, module: str = "vitpipe.cli") -> list[str]:
    """The full command that starts `python -m module *worker_argv` on every process of the job."""
    check_launch_options(args)
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank {args.node_rank}: must be in 0..{args.nnodes - 1} for --nnodes {args.nnodes}")
    launcher = args.launcher
    if launcher == "auto":
        launcher = "deepspeed" if args.hostfile else "torchrun"
    if launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
        if args.hostfile:  # every host of the file, reached over ssh/pdsh
            read_hostfile(args.hostfile)  # a bad file is one line here, not DeepSpeed's traceback
            cmd += ["--hostfile", args.hostfile]
            if args.master_addr:  # else DeepSpeed's runner takes the first host of the file, as node 0 is
                cmd += ["--master_addr", args.master_addr]
        else:  # this machine only; on a CPU "gpus" are simply processes
            cmd += ["--num_nodes", "1", "--num_gpus", str(args.nproc)]
        # our workers read LOCAL_RANK from the environment, not a --local_rank argument
        return cmd + ["--master_port", str(args.master_port), "--no_local_rank", "--module", module, *worker_argv]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--max-restarts", str(args.max_restarts)]
    if args.rdzv_endpoint:
        cmd += ["--nnodes", str(args.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint,
                "--rdzv-id", args.rdzv_id]
    elif args.nnodes > 1:
        cmd += ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank),
                "--master-addr", args.master_addr or "127.0.0.1", "--master-port", str(args.master_port)]
    else:
        cmd += ["--standalone"]  # picks a free port: several local jobs never collide
    return cmd + ["-m", module, *worker_argv]


def check_launch_options(args: argparse.Namespace) -> None:
    """One line for launch options that make no sense (before anything starts)."""
    if args.nproc < 1 or args.nnodes < 1:
        raise UserError(f"--nproc {args.nproc} --nnodes {args.nnodes}: both must be >= 1 (--nproc 1 is one "
                        f"process, the default)")


def maybe_relaunch(args: argparse.Namespace, argv: list[str] | None = None, *,
                   preflight: Callable[[], None] | None = None,
                   on_exit: Callable[[int, int | None], int | None] | None = None,
                   env: dict[str, str] | None = None) -> None:
    """Start the launcher when the options ask for several processes, and exit with its status;
    else return (this process is the one to run, or a launched worker).

    `preflight`: cheap checks of the inputs (shard index, model path) run once here first. Without
    them every rank would print the same error, under the launcher's report of failed ranks.
    `on_exit(status, signal)`: called once the ranks are gone (status: the launcher's exit
    status; signal: what this process was stopped with, or None), e.g. to close what a killed rank
    0 left open; it may return the exit status to use instead. Without it this process is
    replaced by the launcher. `env`: defaults for the launcher's environment.
    """
    check_launch_options(args)
    if is_worker() or not wants_launcher(args):
        return
    if preflight is not None:
        preflight()
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = launcher_argv(args, strip_launch_options(argv))
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    env = {**(env or {}), **os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")  # N processes x all cores each would thrash the CPU
    sys.stdout.flush()
    if on_exit is None:
        os.execvpe(cmd[0], cmd, env)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vitpipe-launch-") as tmp:
        # Where rank 0 leaves its one-line error (note_error), to be said again after torchrun's report.
        env[ERROR_FILE] = str(Path(tmp) / "error.txt")
        status, signum = run_launcher(cmd, env)
        error = Path(env[ERROR_FILE]).read_text().strip() if Path(env[ERROR_FILE]).is_file() else ""
    replaced = on_exit(status, signum)
    if error and not signum:
        print(error, file=sys.stderr, flush=True)
        replaced = 2  # a user error in the ranks: not worth a retry, as in one process
    raise SystemExit(128 + signum if signum else replaced if replaced is not None else status)


ERROR_FILE = "VITPIPE_ERROR_FILE"


def note_error(line: str) -> None:
    """In a launched rank 0: hand the launching process the one line a user error printed."""
    path = os.environ.get(ERROR_FILE)
    if path and not Path(path).exists():
        try:
            Path(path).write_text(line + "\n")
        except OSError:
            pass


def run_launcher(cmd: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Run the launcher `cmd` to its end, passing it SIGTERM/SIGINT/SIGHUP once each; returns
    (its exit status, the first signal this process got or None).

    It runs in a session of its own, so a Ctrl-C at the terminal reaches it once, through us,
    not twice (torchrun takes a second signal as a reason to stop waiting for its ranks)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    got: list[int] = []

    def forward(signum, frame):
        if signum not in got:
            got.append(signum)
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in stops}
    try:
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status, (got[0] if got else None)


def read_hostfile(path: str | Path, option: str = "--hostfile") -> dict[str, int]:
    """Parse an MPI-style hostfile ('HOST slots=N', '#' comments) into {host: slots}."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {str(path)!r} is a folder; pass the hostfile itself, one line "
                        "'HOST slots=GPUS' per machine (see cluster/hostfile.example)")
    if not path.is_file():
        raise UserError(f"{option} {str(path)!r} does not exist; write one line "
                        "'HOST slots=GPUS' per machine (see cluster/hostfile.example)")
    hosts: dict[str, int] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = parts[1].removeprefix("slots=") if len(parts) == 2 else ""
        if not slots.isdigit() or int(slots) < 1 or parts[0] in hosts:
            raise UserError(f"{path}:{n}: {raw.strip()!r} is not 'HOST slots=N' with N >= 1 and a new "
                            "HOST; e.g. 'worker-1 slots=8'")
        hosts[parts[0]] = int(slots)
    if not hosts:
        raise UserError(f"{option} {str(path)!r} lists no hosts; add 'HOST slots=GPUS' lines")
    return hosts
