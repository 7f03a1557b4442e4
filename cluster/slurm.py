"""Submit a batch job to Slurm, follow it to the end, cancel it: the small API the flows use.

    job_id = submit("cluster/vitpipe.sbatch", ["pretrain", "cfg.yaml"], sbatch_args=["--nodes=2"])
    status = wait(job_id, poll=10, on_log=print)     # streams the job's log, returns at the end
    if not status.ok:
        raise RuntimeError(f"job {job_id}: {status.summary()}")

`wait` cancels the job (`scancel`) when it is left by an exception, a Ctrl-C or Prefect cancelling
the flow run, so an abandoned wait never leaves a job holding GPUs. Everything goes through the
Slurm commands (`sbatch`, `scontrol`, `sacct`, `scancel`) of the machine it runs on, with
`SLURM_CONF` and the rest of the environment as the user has them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vitpipe.errors import UserError

# Job states after which nothing more happens (Slurm's JOB_STATE names, `scontrol`/`sacct`).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})


@dataclass(frozen=True)
class JobStatus:
    """What Slurm says about a job: its state, and once it ended, how."""

    job_id: str
    state: str                   # PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, TIMEOUT...
    exit_code: int | None = None  # the batch script's exit status once the job ended
    signal: int | None = None     # the signal that ended it, if any (15 when cancelled)
    reason: str = ""              # why it waits (Priority, Resources) or failed (NonZeroExitCode)
    log: str | None = None        # the job's stdout file (sbatch --output)
    nodes: str = ""               # the node list, once running

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and not self.exit_code

    def summary(self) -> str:
        """One line for logs: 'COMPLETED (exit 0) on node[1-2]'."""
        parts = [self.state]
        if self.exit_code is not None and self.done:
            parts.append(f"(exit {self.exit_code}" + (f", signal {self.signal})" if self.signal else ")"))
        if self.reason and self.reason != "None":
            parts.append(f"reason {self.reason}")
        if self.nodes and self.nodes != "(null)":
            parts.append(f"on {self.nodes}")
        return " ".join(parts)


def _slurm_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"'{name}' not found on PATH: run this on a Slurm login node "
                        "(or install the Slurm client, e.g. apt-get install slurm-client)")
    return path


def _run(argv: list[str], *, env: Mapping[str, str] | None = None,
         cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([_slurm_program(argv[0]), *argv[1:]], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env}, cwd=cwd, timeout=120)


# What sbatch says when this host knows no cluster (no slurm.conf, no controller), not a bad option.
_NO_CLUSTER = ("Could not establish a configuration source", "Unable to contact slurm controller",
               "slurm.conf", "configuration source")


def submit(script: str | Path, args: Sequence[str] = (), *, sbatch_args: Sequence[str] = (),
           env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> str:
    """Submit `script args...` with `sbatch sbatch_args...`; returns the job id.

    `env` is added to this process's environment for sbatch, which passes it on to the job
    (sbatch's default `--export=ALL`). `cwd` is the job's working directory (sbatch's default).
    """
    script = Path(script)
    if not script.is_file():
        raise UserError(f"batch script {str(script)!r} does not exist; pass cluster/vitpipe.sbatch "
                        "or your own copy of it")
    res = _run(["sbatch", "--parsable", *sbatch_args, str(script), *args], env=env, cwd=cwd)
    if res.returncode != 0:
        said = res.stderr.strip() or res.stdout.strip()
        no_cluster = any(s in said for s in _NO_CLUSTER)
        raise UserError(f"sbatch {'found no Slurm cluster' if no_cluster else 'refused the job'}: {said}\n"
                        f"  command: sbatch {' '.join([*sbatch_args, str(script), *args])}\n" +
                        ("  this host has no working Slurm client setup (slurm.conf or a reachable controller); "
                         "submit from a login node of the cluster" if no_cluster else
                         "  fix the option it names (partition, account, --gpus-per-node...) and retry"))
    # --parsable prints "JOBID" or "JOBID;CLUSTER"
    return res.stdout.strip().split(";")[0]


def _parse_scontrol(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints `Key=value` pairs separated by spaces; values may hold spaces."""
    fields: dict[str, str] = {}
    key = None
    for token in line.split(" "):
        m = re.match(r"([A-Za-z][\w/:]*)=(.*)", token)
        if m:
            key = m.group(1)
            fields[key] = m.group(2)
        elif key is not None and token:
            fields[key] += " " + token
    return fields


def _exit_code(text: str) -> tuple[int | None, int | None]:
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def status(job_id: str) -> JobStatus:
    """Ask Slurm about a job now: slurmctld first, the accounting database for old jobs."""
    res = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if res.returncode == 0 and res.stdout.strip():
        f = _parse_scontrol(res.stdout.strip().splitlines()[0])
        code, sig = _exit_code(f.get("ExitCode", ""))
        return JobStatus(job_id=str(job_id), state=f.get("JobState", "UNKNOWN"), exit_code=code,
                         signal=sig, reason=f.get("Reason", ""), log=f.get("StdOut") or None,
                         nodes=f.get("NodeList", ""))
    if "Invalid job id" not in res.stderr:
        raise RuntimeError(f"scontrol show job {job_id} failed: {res.stderr.strip()}")
    # slurmctld forgets a job MinJobAge (default 5 min) after it ends; accounting remembers.
    acct = _run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State,ExitCode,NodeList"])
    line = acct.stdout.strip().splitlines()[0] if acct.returncode == 0 and acct.stdout.strip() else ""
    if not line:
        raise UserError(f"Slurm job {job_id} is unknown: not in slurmctld and not in accounting "
                        f"({(acct.stderr or 'no record').strip()}); check the job id")
    state, exit_code, nodes = (line.split("|") + ["", ""])[:3]
    code, sig = _exit_code(exit_code)
    return JobStatus(job_id=str(job_id), state=state.split()[0], exit_code=code, signal=sig, nodes=nodes)


class _LogFollower:
    """Hands the new complete lines of a growing log file to a callback."""

    def __init__(self, on_line: Callable[[str], None]):
        self.on_line = on_line
        self.path: str | None = None
        self.offset = 0
        self.partial = b""

    def poll(self, path: str | None, *, final: bool = False) -> None:
        if path and path != self.path:
            self.path, self.offset, self.partial = path, 0, b""
        if not self.path:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:  # not created until the job starts (or not shared with us)
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            self.on_line(line.decode(errors="replace"))


def wait(job_id: str, *, poll: float = 5.0, on_log: Callable[[str], None] | None = None,
         on_state: Callable[[JobStatus], None] | None = None, timeout: float | None = None,
         cancel_on_exit: bool = True) -> JobStatus:
    """Block until the job ends; returns its final `JobStatus` (check `.ok`).

    `on_log` gets each new line of the job's stdout file as it grows (the file must be visible
    here: a shared filesystem, as on any Slurm cluster). `on_state` gets the status each time
    the state changes (PENDING -> RUNNING -> COMPLETED). Leaving early, by `timeout`
    (TimeoutError), Ctrl-C or a flow-run cancellation, cancels the job unless `cancel_on_exit`
    is False.
    """
    follower = _LogFollower(on_log) if on_log else None
    deadline = None if timeout is None else time.monotonic() + timeout
    last_state = None
    failures = 0
    try:
        while True:
            try:
                st = status(job_id)
                failures = 0
            except RuntimeError:
                # slurmctld busy or restarting: tolerate a few polls before giving up.
                failures += 1
                if failures > 5:
                    raise
                time.sleep(poll)
                continue
            if st.state != last_state:
                last_state = st.state
                if on_state:
                    on_state(st)
            if follower:
                follower.poll(st.log, final=st.done)
            if st.done:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Slurm job {job_id} still {st.state} after {timeout:g}s")
            time.sleep(poll)
    except BaseException:
        if cancel_on_exit:
            cancel(job_id)
        raise


def cancel(job_id: str, *, signal: str | None = None) -> None:
    """Cancel the job (or, with `signal`, e.g. "USR1", only signal its processes)."""
    argv = ["scancel", *(["--full", f"--signal={signal}"] if signal else []), str(job_id)]
    res = _run(argv)
    if res.returncode != 0 and "already completed" not in res.stderr.lower() \
            and "invalid job id" not in res.stderr.lower():
        raise RuntimeError(f"scancel {job_id} failed: {res.stderr.strip()}")
