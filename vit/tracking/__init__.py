"""MLflow: the training job's run (`tracker`), the model registry (`registry`) and the MLflow model
code that `mlflow models serve` runs (`mlflow_model`)."""
