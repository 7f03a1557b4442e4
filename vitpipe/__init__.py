"""vitpipe: images -> WebDataset shards -> pretrained ViT (DeepSpeed) -> fine-tuned and evaluated.

The stages live in their own top-level packages: `pipeline` (sharding and loading), `vit` (model,
pretraining, fine-tuning, evaluation), `flows` (Prefect orchestration) and `cluster` (launching on
Slurm, DeepSpeed hostfiles, Kubernetes, Dask). This package holds only what they share: the
command line and the config machinery.
"""

__version__ = "0.1.0"
