"""presize: one node, reused under a namespace per presize (``small``: 460, ``large``: 560)."""

from kedro.pipeline import Node, Pipeline

from .nodes import presize_images

# The recipe presizes twice: 460 for the frozen stage (size 224) and 560 for the unfrozen and
# mixup stages (size 448). Each namespace has its own ``<ns>.presize`` parameters and writes
# ``<ns>.presized_images``.
NAMESPACES = ("small", "large")


def create_pipeline(**kwargs) -> Pipeline:
    """The presize node under each namespace, sharing the split manifest and the raw images."""
    base = Pipeline(
        [
            Node(
                presize_images,
                inputs=["split_manifest", "data_report", "raw_images", "params:presize"],
                outputs="presized_images",
                name="presize_images",
            )
        ]
    )
    return sum(
        (
            Pipeline(
                base,
                namespace=ns,
                inputs={"split_manifest", "data_report", "raw_images"},
                parameters={"params:presize": f"params:{ns}.presize"},
            )
            for ns in NAMESPACES
        ),
        Pipeline([]),
    )
