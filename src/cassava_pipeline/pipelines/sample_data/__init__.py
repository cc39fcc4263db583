"""Draw the embedded synthetic Cassava sample in Kaggle's layout."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
