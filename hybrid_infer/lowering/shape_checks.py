"""Parameter checks that several lowerings share: conditions on the shapes Caffe computed."""
from __future__ import annotations

from typing import Optional

from ..graph.layer_graph import Layer, LayerGraph


def empty_output(layer: Layer, graph: LayerGraph) -> Optional[str]:
    """None, or why a layer is not lowered whose tops Caffe sized with no entries along a
    non-batch axis (a Resize scaled below one pixel, a crop to nothing, a window larger
    than the padded input): ONNX graph checks reject the empty tensors such layers would
    produce, and Caffe's own forward over an empty blob aborts on its missing memory."""
    for top in layer.tops:
        shape = graph.values[top].shape
        if any(d <= 0 for d in shape[1:]):
            return f"Caffe computes an empty output {tuple(shape)} for '{top}' from these sizes and parameters"
    return None
