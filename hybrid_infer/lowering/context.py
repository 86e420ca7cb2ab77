"""The interface a lowering talks to while it emits one layer's ONNX: a stable, public API.

A lowering (see ``register_lowering``) receives a ``LoweringContext``, the Caffe ``Layer``
(its ``name``, ``type`` and ``param``, the user's own ``caffe_pb2.LayerParameter``, so fork
fields are there), and the value ids of its inputs and outputs. It adds nodes and constants
through the context only, so naming rules live in one place: every node carries its Caffe
layer's name in ``doc_string`` (TensorRT parser errors are mapped back to Caffe layers
through it) and a unique ``layer/Op_k`` name, and no helper tensor can collide with a
value id of the Caffe graph, whatever the blob names are.

Tensors are FP32 and N-first, in Caffe's layout (NCHW for images). The batch axis is
symbolic in the segment's interface: a lowering must not bake the prototxt's batch size
into the graph (copy it with Reshape's 0, infer it with -1, or take it from ``Shape``).
ONNX opset: ``ctx.opset`` (17 by default, never below 13).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import LoweringError

if TYPE_CHECKING:
    import onnx

    from ..graph.layer_graph import LayerGraph

Shape = tuple[int, ...]


def channel_shaped(array: np.ndarray, rank: int) -> np.ndarray:
    """A per-channel vector shaped (C, 1, ...) to broadcast over an N-first blob of ``rank`` axes."""
    return array.reshape((-1,) + (1,) * (rank - 2))


class LoweringContext:
    """Collects the nodes and initializers of one segment's ONNX graph while layers are lowered.

    Attributes a lowering may read: ``opset`` (int) and ``graph`` (the ``LayerGraph``:
    ``graph.values[value_id].shape``, ``graph.layers[name]``); everything else is private.
    """

    def __init__(self, graph: "LayerGraph", weights: Mapping[str, Sequence[np.ndarray]], opset: int):
        self.graph = graph
        self.opset = opset
        self.nodes: list["onnx.NodeProto"] = []
        self.initializers: list["onnx.TensorProto"] = []
        self._weights = weights
        self._taken: set[str] = set(graph.values)
        self._nodes_per_layer: dict[str, int] = {}

    def shape(self, value_id: str) -> Shape:
        """Static shape Caffe computed for the value, N-first (axis 0 is the prototxt's batch,
        which the segment does not fix: use it for per-item sizes only)."""
        return self.graph.values[value_id].shape

    def weights(self, layer_name: str) -> list[np.ndarray]:
        """The layer's parameter blobs as float32 arrays, in Caffe's blob order and shapes.

        Raises LoweringError when the model carries no weights for the layer.
        """
        if layer_name not in self._weights:
            raise self.error(layer_name, "no weights were given for this layer")
        return [np.asarray(a, dtype=np.float32) for a in self._weights[layer_name]]

    def error(self, layer_name: str, reason: str) -> LoweringError:
        """A LoweringError naming the layer and its type, for the lowering to raise; the
        layer then runs in Caffe and the report shows ``reason``."""
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
        """Add an initializer and return its tensor name. Floating point values are stored as
        float32 and integers as int64 (what ONNX shape operands take); shape as given."""
        from onnx import numpy_helper
        value = np.asarray(array)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        elif value.dtype.kind in "iub":
            value = value.astype(np.int64) if value.dtype.kind != "b" else value
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def tensor_attribute(self, array: Any) -> "onnx.TensorProto":
        """An ONNX tensor for attributes that take one (e.g. ConstantOfShape's ``value``);
        dtype as given."""
        from onnx import numpy_helper
        return numpy_helper.from_array(np.asarray(array), "value")

    def node(self, op_type: str, inputs: Sequence[str], outputs: Optional[Sequence[str]] = None, *,
             layer: str, **attrs: Any) -> list[str]:
        """Append one ONNX node of ``layer`` (the Caffe layer's name) and return its output names.

        Without ``outputs`` the node gets one fresh output name. ``attrs`` are the ONNX
        attributes (ints, floats, lists, strings, tensors).
        """
        from onnx import helper
        k = self._nodes_per_layer.get(layer, 0)
        self._nodes_per_layer[layer] = k + 1
        if outputs is None:
            outputs = [self.fresh(f"{layer}/{op_type.lower()}")]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs),
                                           name=f"{layer}/{op_type}_{k}", doc_string=layer, **attrs))
        return list(outputs)

    def canonical_axis(self, layer_name: str, axis: int, rank: int) -> int:
        """Caffe's CanonicalAxisIndex (include/caffe/blob.hpp): negative axes count from the end;
        raises LoweringError when out of range."""
        if not -rank <= axis < rank:
            raise self.error(layer_name, f"axis {axis} is out of range for a {rank}-D blob")
        return axis + rank if axis < 0 else axis
