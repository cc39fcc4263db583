"""Kedro datasets: raw image folders, presized image shards, checkpoints, the exported model,
working folders."""

from .checkpoint import CheckpointDataset, WorkDirDataset
from .image_root import ImageRootDataset
from .mlflow_model import MlflowPyfuncModelDataset
from .model import ExportedModelDataset
from .shards import ImageShardsDataset

__all__ = [
    "CheckpointDataset",
    "ExportedModelDataset",
    "ImageRootDataset",
    "ImageShardsDataset",
    "MlflowPyfuncModelDataset",
    "WorkDirDataset",
]
