"""cassava-pipeline: the fastai transfer-learning recipe as a reproducible Kedro pipeline."""

__version__ = "0.1.0"
