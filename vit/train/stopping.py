"""Stopping a run when it is asked to (preemption, Ctrl-C): at a step all ranks agree on, with a
checkpoint, the MLflow run marked KILLED, and in bounded time.

Shared GPU clusters preempt: Slurm, Kubernetes and torchrun send SIGTERM, wait (30 s by default),
then SIGKILL. A signal usually reaches every rank, but not at the same moment, so a rank never
stops on its own: each step boundary carries a tiny vote (`StopOnSignal.poll`, an all-reduce of
"the signal I received, or 0" over a gloo group, started at one boundary and read at the next, so
it never waits on the GPU), and all ranks see the same answer at the same step. They then save
that step's checkpoint and exit with 128 + the signal. Outside the steps (building the model,
the final evaluation and export) a signal stops at once. If the ranks have not stopped within
`checkpoint.stop_timeout_s`, the MLflow run is closed KILLED and the process exits regardless.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from vit.tracking.tracker import STOP_SIGNALS, Stopped


class StopOnSignal:
    """Context manager around a run (every rank): SIGTERM, SIGINT and SIGHUP ask it to stop.

    Inside `deferred()` (the training steps) a signal is only noted, and `poll()` at each step
    boundary says, on every rank alike, whether some rank got one; elsewhere it raises `Stopped`.
    """

    def __init__(self, *, timeout_s: float, on_expire: Callable[[], None] | None = None, say=None):
        self.timeout_s = timeout_s
        self.on_expire = on_expire  # e.g. close the MLflow run, before the process exits regardless
        self.say = say or (lambda m: print(m, file=sys.stderr, flush=True))
        self.signum: int | None = None
        self._deferring = False
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None
        self._group = None
        self._work = None
        self._vote: torch.Tensor | None = None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            return  # already stopping (torchrun and the scheduler may both send one)
        self.signum = signum
        name = signal.Signals(signum).name
        if self._deferring and self.timeout_s > 0:
            self.say(f"received {name}: stopping after this step with a checkpoint (at most "
                     f"{self.timeout_s:.0f} s, checkpoint.stop_timeout_s)")
            self._timer = threading.Timer(self.timeout_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
            return
        raise Stopped(signum, f"stopped by {name}")

    def _expire(self) -> None:
        self.say(f"did not stop within checkpoint.stop_timeout_s={self.timeout_s:.0f} s of "
                 f"{signal.Signals(self.signum).name}: exiting now, without a new checkpoint")
        try:
            if self.on_expire is not None:
                self.on_expire()
        finally:
            os._exit(128 + self.signum)

    @contextmanager
    def deferred(self) -> Iterator[StopOnSignal]:
        """Collective (every rank enters it): signals wait for the next `poll()` instead of raising.
        On the way out, a signal that came after the last poll stops the run there (`Stopped`)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1 and self._group is None:
            # A CPU group of its own: the vote never queues behind (or syncs with) the GPU's collectives.
            self._group = torch.distributed.new_group(backend="gloo")
        self._deferring = self.timeout_s > 0
        try:
            yield self
        except BaseException:
            self._deferring = False
            self._work = None  # another rank may be gone: do not wait for its vote
            raise
        self._deferring = False
        if self._work is not None:
            self._work.wait()  # every rank started this vote; finish it so the group stays in step
            self._work = None
        agreed = self._vote_now()
        if agreed:
            raise Stopped(agreed, f"stopped by {signal.Signals(agreed).name}")

    def _vote_now(self) -> int:
        if self._group is None:
            return self.signum or 0
        vote = torch.tensor([self.signum or 0], dtype=torch.int64)
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(vote.item())

    def poll(self) -> int:
        """Collective, at every step boundary of every rank: the signal some rank received (the same
        answer everywhere, one step after the vote was started), or 0 to go on."""
        mine = self.signum or 0
        if self._group is None:
            return mine
        agreed = 0
        if self._work is not None:
            self._work.wait()
            agreed = int(self._vote.item())
        self._vote = torch.tensor([mine], dtype=torch.int64)
        self._work = torch.distributed.all_reduce(self._vote, op=torch.distributed.ReduceOp.MAX, group=self._group,
                                                  async_op=True)
        return agreed
