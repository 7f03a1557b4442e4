"""Launching on real clusters: DeepSpeed hostfiles, Slurm, Kubernetes, and Dask for sharding.

- `cluster.launch`: `vitpipe launch --backend {local,deepspeed,slurm}` (and `--dry-run`).
- `cluster.slurm`: `submit`, `wait`, `status`, `cancel` for Slurm batch jobs (used by the flows).
- `cluster/vitpipe.sbatch`: N nodes x G GPUs, srun + torchrun c10d rendezvous, forwards "$@".
- `cluster/k8s/`, `cluster/Dockerfile`: Indexed Job + headless Service, PyTorchJob, the image.
- `cluster.dask_shard`: the shard stage with its shard writers on a Dask cluster.
- `cluster.object_store`: copy a finished shard set to S3 (or any fsspec URL), index last.
- `cluster.process_tree`: stop a launcher with every rank under it; children that die with their parent.
- `cluster.allreduce_check`: a seconds-long check that all ranks of a launch can meet.

See docs/cluster.md.
"""
