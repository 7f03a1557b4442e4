"""Check that every rank of a launch can reach every other, in seconds, before a long job.

Run it through any launcher in place of the training command; it joins the process group the
launcher set up (torchrun/DeepSpeed env vars), sums one tensor across all ranks and checks the
result, so a wrong rendezvous address, a blocked port or a missing node fails here, fast:

    VITPIPE_MODULE=cluster.allreduce_check sbatch cluster/vitpipe.sbatch
    vitpipe launch --backend deepspeed --deepspeed.hostfile hosts --module cluster.allreduce_check
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> int:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(device)
    # Each rank contributes rank + 1, so a rank that is missing or counted twice changes the sum.
    total = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(total)
    expected = world * (world + 1) / 2
    print(f"allreduce_check: rank {rank}/{world} on {socket.gethostname()} ({backend}): "
          f"sum {total.item():g}, expected {expected:g}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if total.item() != expected:
        print(f"allreduce_check: rank {rank}: wrong sum; some ranks joined another job", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"allreduce_check: OK, {world} ranks", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
