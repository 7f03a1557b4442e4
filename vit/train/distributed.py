"""Rank and world facts of this process, and the process group.

Every launcher describes the job through environment variables, each with its own names:
torchrun and the DeepSpeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT,
Slurm's srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST. `World.from_env`
reads whichever is there (torchrun/DeepSpeed win when both are, since they run inside Slurm
allocations too), and nothing else in vitpipe looks at those variables.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

import torch

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class World:
    """Where this process sits in the job: global rank, ranks per node, node index, rendezvous."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    source: str = "single"  # which launcher's variables described the job

    @property
    def is_main(self) -> bool:
        """True on the one process that logs, writes files and shows progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """Read the job layout from torchrun / DeepSpeed launcher / Slurm variables; none = one process."""
        env = os.environ if env is None else env
        # WORLD_SIZE=1 is a job of one: its variables may be left over from an earlier in-process
        # run (they are inherited by subprocesses), so a fresh single-process setup is used instead;
        # except under torchrun (TORCHELASTIC_RUN_ID), whose one worker must meet torchrun's own
        # store at MASTER_PORT (a fresh port there waits for a store that never comes).
        launched = env.get("WORLD_SIZE") != "1" or bool(env.get("TORCHELASTIC_RUN_ID"))
        if "RANK" in env and "WORLD_SIZE" in env and launched:
            world_size = _int(env, "WORLD_SIZE")
            local_world_size = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", world_size))
            rank = _int(env, "RANK")
            node_rank = _int(env, "GROUP_RANK", _int(env, "CROSS_RANK", _int(env, "NODE_RANK",
                                                                          rank // max(1, local_world_size))))
            return cls._checked(rank=rank, world_size=world_size, local_rank=_int(env, "LOCAL_RANK", 0),
                                local_world_size=local_world_size, node_rank=node_rank,
                                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                                master_port=_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
                                source="torchrun/deepspeed")
        if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
            world_size = _int(env, "SLURM_NTASKS")
            nodes = _int(env, "SLURM_NNODES", 1)
            local_world_size = _slurm_tasks_per_node(env, world_size, nodes)
            job_id = _int(env, "SLURM_JOB_ID", 0)
            return cls._checked(rank=_int(env, "SLURM_PROCID"), world_size=world_size,
                                local_rank=_int(env, "SLURM_LOCALID", 0), local_world_size=local_world_size,
                                node_rank=_int(env, "SLURM_NODEID", 0),
                                master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "")),
                                # A port derived from the job id lets two jobs share a node without clashing.
                                master_port=_int(env, "MASTER_PORT", 20000 + job_id % 20000),
                                source="slurm")
        return cls()

    @classmethod
    def _checked(cls, **kw) -> World:
        world = cls(**kw)
        if not 0 <= world.rank < world.world_size:
            raise RuntimeError(f"rank {world.rank} outside world size {world.world_size} "
                               f"(from {world.source} environment variables)")
        return world

    def export_env(self) -> None:
        """Set the torch.distributed variables (Slurm jobs lack them) so env:// rendezvous works."""
        os.environ.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                           "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
                           "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)})


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def _slurm_tasks_per_node(env: Mapping[str, str], world_size: int, nodes: int) -> int:
    # SLURM_NTASKS_PER_NODE is '4' or '4(x2)' (heterogeneous layouts list several); take the first.
    value = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    m = re.match(r"(\d+)", value)
    return int(m.group(1)) if m else max(1, world_size // max(1, nodes))


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,9],cpu1' -> 'gpu03' (no scontrol needed)."""
    nodelist = nodelist.strip()
    if not nodelist:
        return "127.0.0.1"
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def device_for(world: World) -> torch.device:
    """The device this rank trains on: its local GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(world: World, device: torch.device, *, timeout_s: float = 600) -> None:
    """Join the job's process group; call once, before building the engine (a later call is a no-op).

    DeepSpeed needs a process group even for one process; that one rendezvouses on a free local
    port so that several single-process runs (tests, notebooks) never collide.
    """
    if torch.distributed.is_initialized():
        return
    single = not world.is_distributed and world.source == "single"
    if single:
        world = dataclasses.replace(world, master_port=free_port())
    world.export_env()  # DeepSpeed's engine reads LOCAL_RANK and friends from the environment
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import deepspeed  # deferred: importing DeepSpeed costs seconds, single-process tools never need it

    _forget_deepspeed_groups()
    deepspeed.init_distributed(dist_backend=backend_for(device), auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))


def free_port() -> int:
    """A TCP port that was free a moment ago, for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (metrics); the identity for one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    """Send a small picklable value from rank `src` to every rank (e.g. the chosen checkpoint)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's small picklable `obj`, in rank order, on every rank (a list of one for one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class SameErrorAsRank0(SystemExit):
    """How a rank other than 0 stops on an error every rank agreed on: quietly, since rank 0 says it."""


def raise_on_rank0(world: World, error: BaseException, *, cause: BaseException | None = None) -> None:
    """Stop every rank on an error all of them agreed on (after a collective): rank 0 raises `error`,
    the others `SameErrorAsRank0` with the exit status a user error gets (2) or 1, so the user reads
    one line, not one per rank."""
    from vitpipe.errors import UserError

    if world.is_main:
        raise error from cause
    raise SameErrorAsRank0(2 if isinstance(error, UserError) else 1) from error


def destroy_process_group() -> None:
    """Leave the process group (a later `init_process_group` in this process starts a fresh one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """Drop the sub-groups DeepSpeed caches at module level: they die with the process group.

    Without this, a second engine built in the same process after the group was re-created (the
    flows and tests run stages one after another) fails in DeepSpeed's broadcast with
    'Group ... is not registered'.
    """
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    groups._WORLD_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()
