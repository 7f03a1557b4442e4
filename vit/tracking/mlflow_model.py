"""The MLflow model of a registered vitpipe ViT, logged as code: no pickle anywhere.

`vit.tracking.registry.register_model` logs this file as the model's code and the export (model.safetensors
+ config.json) as its artifact. `mlflow.pyfunc.load_model` and `mlflow models serve` run it:
predict takes float32 images N x C x H x W, normalised as in training, and returns logits
N x classes. vitpipe itself loads registered models without running any of it
(`vit.tracking.registry.load_logged_model` reads the safetensors).
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class ViTModel(PythonModel):
    def load_context(self, context) -> None:
        from vit.models.weights import load_pretrained

        self.model = load_pretrained(context.artifacts["export"]).eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.model(x).numpy()


mlflow.models.set_model(ViTModel())
