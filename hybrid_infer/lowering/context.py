"""The state one segment's lowering builds up: ONNX nodes, initializers and fresh names.

Lowerings only talk to this object, so naming rules live in one place: every node
carries its Caffe layer's name in ``doc_string`` (TensorRT parser errors are mapped
back to Caffe layers through it) and a unique ``layer/Op_k`` name, and no helper
tensor can collide with a value id of the Caffe graph, whatever the blob names are.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import LoweringError
from ..graph.layer_graph import LayerGraph

Shape = tuple[int, ...]


def channel_shaped(array: np.ndarray, rank: int) -> np.ndarray:
    """A per-channel vector shaped (C, 1, ...) to broadcast over an N-first blob of ``rank`` axes."""
    return array.reshape((-1,) + (1,) * (rank - 2))


class LoweringContext:
    """Collects the nodes and initializers of one ONNX graph while layers are lowered."""

    def __init__(self, graph: LayerGraph, weights: Mapping[str, Sequence[np.ndarray]], opset: int):
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._weights = weights
        self._taken: set[str] = set(graph.values)
        self._nodes_per_layer: dict[str, int] = {}

    def shape(self, value_id: str) -> Shape:
        """Static shape Caffe computed for the value (its first axis is the prototxt's batch)."""
        return self.graph.values[value_id].shape

    def weights(self, layer_name: str) -> list[np.ndarray]:
        """The layer's parameter blobs as float32 arrays, in Caffe's blob order."""
        if layer_name not in self._weights:
            raise self.error(layer_name, "no weights were given for this layer")
        return [np.asarray(a, dtype=np.float32) for a in self._weights[layer_name]]

    def error(self, layer_name: str, reason: str) -> LoweringError:
        """A LoweringError naming the layer and its type, for the lowering to raise."""
        return LoweringError(layer_name, self.graph.layers[layer_name].type, reason)

    def fresh(self, hint: str) -> str:
        """A tensor name not used anywhere in the graph yet, readable from ``hint``."""
        name, n = hint, 1
        while name in self._taken:
            n += 1
            name = f"{hint}_{n}"
        self._taken.add(name)
        return name

    def const(self, array: Any, hint: str) -> str:
        """Add an initializer (floats as float32, integers as int64) and return its name."""
        value = np.asarray(array)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        elif value.dtype.kind in "iu":
            value = value.astype(np.int64)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op_type: str, inputs: Sequence[str], outputs: Optional[Sequence[str]] = None, *,
             layer: str, **attrs: Any) -> list[str]:
        """Append one node of ``layer``; without ``outputs`` it gets one fresh output name."""
        k = self._nodes_per_layer.get(layer, 0)
        self._nodes_per_layer[layer] = k + 1
        if outputs is None:
            outputs = [self.fresh(f"{layer}/{op_type.lower()}")]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs),
                                           name=f"{layer}/{op_type}_{k}", doc_string=layer, **attrs))
        return list(outputs)

    def canonical_axis(self, layer_name: str, axis: int, rank: int) -> int:
        """Caffe's CanonicalAxisIndex: negative axes count from the end."""
        if not -rank <= axis < rank:
            raise self.error(layer_name, f"axis {axis} is out of range for a {rank}-D blob")
        return axis + rank if axis < 0 else axis
