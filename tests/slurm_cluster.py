"""A real, throw-away Slurm cluster on this host for tests: munged + slurmctld + N slurmd.

Everything lives in one temporary directory (generated `slurm.conf`, munge key and socket, state,
logs) and listens on free ports of 127.0.0.1, so it neither needs nor touches a system Slurm and
several test sessions can run side by side. The N nodes are emulated: N slurmd daemons on this
host (`slurmd -N nodeK`), which is enough for a real multi-node rendezvous over loopback.

Use the `slurm_cluster` fixture (import it into a test module) or `SlurmCluster` directly:

    from slurm_cluster import slurm_cluster  # noqa: F401  (pytest fixture)

    def test_job(slurm_cluster):
        job_id = cluster.slurm.submit(...)       # SLURM_CONF points at the test cluster

Tests skip, naming the missing package, where `slurm-wlm` or `munge` is not installed (see
tests/system-deps.sh).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel")


def missing_programs() -> list[str]:
    """The Slurm/munge programs not on PATH (empty when a test cluster can start)."""
    extra = ["/usr/sbin", "/sbin"]
    path = os.pathsep.join([os.environ.get("PATH", ""), *extra])
    return [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p, path=path) is None]


def _which(program: str) -> str:
    found = shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    assert found, f"{program} not found; install slurm-wlm and munge (tests/system-deps.sh)"
    return found


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """munged, slurmctld and `nodes` slurmd daemons configured under `root`; a context manager."""

    def __init__(self, root: Path, *, nodes: int = 2, cpus_per_node: int = 2, name: str = "vitpipetest"):
        self.root = Path(root)
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.name = name
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.node_names = [f"node{i + 1}" for i in range(nodes)]

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (sbatch, squeue, ...) to talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # munged refuses keys in group/world-writable directories
        self._start_munge()
        self._write_conf()
        self._run(_which("slurmctld"), "-f", str(self.conf))
        for node in self.node_names:
            self._run(_which("slurmd"), "-f", str(self.conf), "-N", node)
        self._wait_idle(timeout)
        return self

    def stop(self) -> None:
        """Cancel leftover jobs and stop every daemon this cluster started (by its pid file)."""
        if self.conf.exists():
            subprocess.run([_which("scancel"), "--full", "--quiet", "-u", str(os.getuid())],
                           env=self.env, capture_output=True, timeout=30)
        for pid_file in [*(self.root / f"slurmd-{n}.pid" for n in self.node_names),
                         self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]:
            self._kill_pid_file(pid_file)

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self) -> str:
        """The tails of the daemons' logs, for a failing test's message."""
        parts = []
        for log in sorted(self.root.glob("*.log")) + sorted((self.root / "munge").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-20:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- internals -------------------------------------------------------------------------

    def _start_munge(self) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self._run(_which("munged"), "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                  f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                  f"--seed-file={munge_dir / 'munged.seed'}")

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        r = self.root
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
            for n, p in zip(self.node_names, node_ports))
        user = "root" if os.getuid() == 0 else os.environ.get("USER", "root")
        # Plugins chosen to run anywhere, containers included: no cgroups, no accounting
        # database (job states come from slurmctld, kept for MinJobAge after the end).
        self.conf.write_text(f"""\
ClusterName={self.name}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool-%n'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd-%n.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd-%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=5
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "state").mkdir(exist_ok=True)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            res = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%N %t"], env=self.env,
                                 capture_output=True, text=True, timeout=30)
            out = res.stdout + res.stderr
            states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
            if res.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names):
                return
            time.sleep(0.5)
        raise RuntimeError(f"test Slurm cluster not idle after {timeout:.0f}s: {out}\n{self.logs()}")

    def _run(self, *argv: str) -> None:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr}\n{self.logs()}")

    @staticmethod
    def _kill_pid_file(pid_file: Path, timeout: float = 15.0) -> None:
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running 2-node test Slurm cluster; SLURM_CONF points at it for the module's tests."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"Slurm cannot run here: {', '.join(missing)} not installed "
                    "(apt-get install slurm-wlm munge, or run tests/system-deps.sh as root)")
    root = Path(tmp_path_factory.mktemp("slurm"))
    with SlurmCluster(root) as cluster:
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        try:
            yield cluster
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old
