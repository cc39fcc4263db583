"""Kedro datasets for raw image folders and presized image shards."""

from .image_root import ImageRootDataset
from .shards import ImageShardsDataset

__all__ = ["ImageRootDataset", "ImageShardsDataset"]
