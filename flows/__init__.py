"""Prefect flows that orchestrate the stages; the work itself lives in `pipeline` and `vit`."""
