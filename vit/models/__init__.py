"""Models: the Vision Transformer (`vit.models.vit`) and its weight formats (`vit.models.weights`).

Nothing here imports torch.distributed, DeepSpeed, data loading or MLflow: a model is a plain
`nn.Module` that runs forward on a CPU, and weight conversion is a pure state_dict filter.
"""
