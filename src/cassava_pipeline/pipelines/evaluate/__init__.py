"""Evaluate the final model on the validation set, with and without test-time augmentation."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
