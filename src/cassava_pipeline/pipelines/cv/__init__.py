"""Stratified k-fold cross-validation of the recipe: out-of-fold predictions and label issues."""

from .pipeline import clean_pipeline, create_pipeline, predict_pipeline

__all__ = ["clean_pipeline", "create_pipeline", "predict_pipeline"]
