"""Kedro pipelines: thin, typed nodes that call into ``cassava_pipeline.vision``."""
