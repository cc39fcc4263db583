"""Training: build the model, lr_find, then one training pipeline under three namespaces."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
