"""Ingest (list and verify every image) and split (train / validation)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
