"""Stratified k-fold cross-validation of the recipe: out-of-fold predictions and label issues."""

from .pipeline import create_pipeline, predict_pipeline

__all__ = ["create_pipeline", "predict_pipeline"]
