"""ingest: raw images -> verified manifest (+ data report) -> train/valid split (+ split report)."""

from kedro.pipeline import Node, Pipeline

from .nodes import check_ingest, ingest_images, split_manifest


def create_pipeline(**kwargs) -> Pipeline:
    """ingest_images -> check_ingest -> split_manifest."""
    return Pipeline(
        [
            Node(
                ingest_images,
                inputs=["raw_images", "params:ingest"],
                outputs=["candidate_manifest", "data_report"],
                name="ingest_images",
            ),
            Node(
                check_ingest,
                inputs=["candidate_manifest", "data_report", "params:ingest"],
                outputs="manifest",
                name="check_ingest",
            ),
            Node(
                split_manifest,
                inputs=["manifest", "data_report", "params:split"],
                outputs=["split_manifest", "split_report"],
                name="split_manifest",
            ),
        ]
    )
