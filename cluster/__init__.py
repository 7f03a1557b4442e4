"""Launching on real clusters: DeepSpeed hostfiles, Slurm, Kubernetes, and Dask for sharding."""
