"""Presize every image once into shard files, at each size the recipe needs."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
