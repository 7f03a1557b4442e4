"""Stop a launcher and every process under it; make processes die with their parent.

A training launch is a tree: `vitpipe launch` -> torchrun (or DeepSpeed's launcher, or srun) ->
one process per rank. torchrun starts each rank in a session of its own, so signalling the
launcher's process group misses the ranks, and a launcher killed outright (SIGKILL, the OOM
killer, a node agent) leaves them training on as orphans. Two guarantees close that:

- `stop_tree(proc)` signals every descendant of `proc` (found through psutil, whatever its group
  or session), waits a grace period for them to stop (ranks save a checkpoint on SIGTERM), then
  kills what is left;
- `die_with_parent()` (Linux `PR_SET_PDEATHSIG`) makes the kernel send SIGTERM to a process when
  its parent goes, however the parent went. `vitpipe launch` starts torchrun with it
  (`preexec_fn`), and a vitpipe process sets it for itself on start (`vitpipe.cli`) when it is a
  rank or when its parent asked for it (`child_env`), so even a SIGKILL to the top of the tree
  takes the whole tree down.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterable

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
PARENT_ENV = "VITPIPE_DIE_WITH_PARENT"  # set by a parent (its pid) that wants its vitpipe child to die with it


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(sig: int = signal.SIGTERM, *, parent: int | None = None) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux; elsewhere a no-op).

    `parent`: the pid the parent had; if this process was already reparented (its parent died
    while it started), `sig` is raised at once, so a child never outlives a parent that died early.
    """
    prctl = _prctl()
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return  # not fatal: stop_tree still covers an orderly stop
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        os.kill(os.getpid(), sig)


def become_subreaper() -> bool:
    """Make orphans of this process's descendants its own children (Linux `PR_SET_CHILD_SUBREAPER`):
    a rank whose torchrun died is then still found below this process, and stopped. True if set."""
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def preexec_die_with_parent():
    """A `preexec_fn` for Popen that makes the child die with this process (resolved here, in the parent:
    the forked child then only makes a system call, no imports)."""
    prctl = _prctl()
    if prctl is None:
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a vitpipe child process that should die with this one (see `die_with_parent_if_asked`)."""
    return {**env, PARENT_ENV: str(os.getpid())}


def die_with_parent_if_asked(environ=os.environ) -> None:
    """At the start of a vitpipe process: die with the parent if it asked (`child_env`) or if this
    is a rank of a launched job (torchrun starts ranks in sessions of their own, so only this
    keeps a rank from outliving a killed launcher)."""
    asked = environ.pop(PARENT_ENV, None)  # not inherited further down the tree
    if asked is not None:
        die_with_parent(parent=int(asked) if asked.isdigit() else None)
    elif "RANK" in environ and "LOCAL_RANK" in environ:  # torchrun's, DeepSpeed's launcher's or srun's rank
        die_with_parent()


def descendants(pid: int) -> list:
    """Every living process below `pid` (children, grandchildren...), whatever their group or session."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: Iterable) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def signal_all(procs: Iterable, sig: int) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def stop_tree(root_pid: int, *, sig: int = signal.SIGTERM, grace: float = 30.0,
              include_root: bool = True) -> list[int]:
    """Send `sig` to `root_pid` and all its descendants, SIGKILL whatever is left after `grace` s.

    The tree is read before signalling (a rank whose launcher exits first is reparented and would
    no longer be found below it) and again while waiting (children started meanwhile count too).
    Returns the pids that had to be killed.
    """
    import psutil

    try:
        root = [psutil.Process(root_pid)] if include_root else []
    except psutil.NoSuchProcess:
        root = []
    tree = {p.pid: p for p in [*root, *descendants(root_pid)]}
    signal_all(tree.values(), sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        tree.update({p.pid: p for p in descendants(root_pid)})
        if not _alive(tree.values()):
            return []
        time.sleep(0.2)
    left = _alive(tree.values())
    signal_all(left, signal.SIGKILL)
    psutil.wait_procs(left, timeout=10)
    return [p.pid for p in left]
