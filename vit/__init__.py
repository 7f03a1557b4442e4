"""The Vision Transformer: model, pretraining (DeepSpeed), fine-tuning and evaluation."""
