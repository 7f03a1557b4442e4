"""Shard an image collection on a Dask cluster: listing, planning and shard writing run on its workers.

Call it when one machine is not enough to list or pack a collection; the output is the same,
byte for byte, as a local `vitpipe shard` (the plan never depends on who lists, plans or writes).
Each part of SRC (a few class folders, a manifest part file) is listed by a task on a worker, each
range of the sort order is planned by another, and each shard is written by a third; this process
only cuts the plan into shards and writes index.json, in memory that does not grow with SRC:

    python -m cluster.dask_shard --scheduler tcp://sched:8786 SRC OUT [vitpipe shard options]

or from Python, `shard_on_dask(ShardConfig(src=..., out=...), "tcp://sched:8786")`. Start the
cluster the way your site does (`dask scheduler` + `dask worker` per node, dask-jobqueue's
SLURMCluster, the Dask Helm chart); every worker needs vitpipe installed, read access to SRC and
write access to OUT (a shared filesystem): workers write the listing and plan files under
OUT/.vitpipe and whole shards in OUT. A worker that dies mid-task is replaced by Dask and its
task re-run (a half-written shard is never counted); if Dask gives up on a task, the command says
which, and re-running it resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from pipeline.shard import ShardConfig, shard
from vitpipe.config import add_config_arguments, config_from_args
from vitpipe.errors import UserError


def shard_on_dask(cfg: ShardConfig, scheduler: str, *, wait_for_workers: float = 60.0,
                  connect_timeout: float = 30.0) -> dict:
    """Run the shard stage with its shards fanned out over the Dask scheduler at `scheduler`.

    Returns the shard stage's stats. Waits up to `wait_for_workers` seconds for at least one
    worker, so a cluster that is still starting (workers queued in Slurm) is not an error.
    """
    from dask.distributed import Client

    try:
        client = Client(scheduler, timeout=f"{connect_timeout}s")
    except (OSError, TimeoutError) as e:
        raise UserError(f"--scheduler {scheduler!r}: no Dask scheduler answers there ({e}); start one "
                        "('dask scheduler') and pass its address, e.g. tcp://HOST:8786") from None
    with _quiet_cancellations(), client:  # the client closes before the filter goes
        try:
            client.wait_for_workers(1, timeout=wait_for_workers)
        except TimeoutError:
            raise UserError(f"Dask scheduler {scheduler} has no workers after {wait_for_workers:g}s; "
                            "start some ('dask worker " + scheduler + "')") from None
        n = len(client.scheduler_info()["workers"])
        print(f"dask: sharding on {n} worker(s) of {scheduler}", file=sys.stderr, flush=True)
        return shard(cfg, executor=client.get_executor())


def _from_the_futures_adapter(record: logging.LogRecord) -> bool:
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "_cascade_future" and code.co_filename.endswith("cfexecutor.py"):
            return True
        tb = tb.tb_next
    return False


@contextlib.contextmanager
def _quiet_cancellations():
    """Once a task fails, the stage cancels the ones still queued and the client closes; Dask's
    concurrent.futures adapter (distributed.cfexecutor) may then log, through tornado, a traceback
    for each of those futures (FutureCancelledError, CommClosedError) next to the one-line error
    that says what happened. Its records are dropped: the outcome of every future it hands over
    is the stage's to report, and is. Nothing else is dropped."""
    logger = logging.getLogger("tornado.application")
    keep = lambda record: not _from_the_futures_adapter(record)  # noqa: E731
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", required=True, metavar="ADDRESS",
                        help="the Dask scheduler's address, e.g. tcp://HOST:8786")
    add_config_arguments(parser, ShardConfig, positional=("src", "out"))


def run_cli(args: argparse.Namespace) -> int:
    shard_on_dask(config_from_args(ShardConfig, args), args.scheduler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.dask_shard",
                                     description="vitpipe shard, with the shards written by Dask workers")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
