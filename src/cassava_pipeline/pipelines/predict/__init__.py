"""cassava_predict: class probabilities and a Kaggle submission for a folder of new images."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
