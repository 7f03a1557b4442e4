"""The data stage: image collections -> WebDataset shards + index, and shards -> training batches."""
