"""Kedro datasets: raw image folders, presized image shards, checkpoints, working folders."""

from .checkpoint import CheckpointDataset, WorkDirDataset
from .image_root import ImageRootDataset
from .shards import ImageShardsDataset

__all__ = ["CheckpointDataset", "ImageRootDataset", "ImageShardsDataset", "WorkDirDataset"]
