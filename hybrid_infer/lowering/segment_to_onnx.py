"""Lower one segment of a Caffe net (a run of layers) to a self-contained ONNX model.

Tensors keep their value ids as names, so the executor feeds and reads the segment by
the same names the layer graph uses. The batch axis is symbolic in the interface and
never baked into the graph: the same model is built into TensorRT engines and run by
ONNX Runtime at whatever batch the user brings.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import LoweringError
from ..graph.layer_graph import LayerGraph
from .context import LoweringContext
from .registry import REGISTRY

MIN_OPSET = 13  # Softmax's single-axis semantics and axes-as-input ops start here


def _value_info(graph: LayerGraph, value_id: str) -> onnx.ValueInfoProto:
    shape = graph.values[value_id].shape
    dims: list[int | str] = ["batch", *shape[1:]] if shape else []
    return helper.make_tensor_value_info(value_id, TensorProto.FLOAT, dims)


def lower_segment(graph: LayerGraph, layer_names: Sequence[str], inputs: Sequence[str],
                  outputs: Sequence[str], weights: Mapping[str, Sequence[np.ndarray]], *,
                  opset: int = 17, name: str = "segment", check: bool = True) -> onnx.ModelProto:
    """ONNX model computing ``outputs`` from ``inputs`` (value ids) through ``layer_names``.

    Raises LoweringError for a layer without a lowering or with parameters the lowering
    cannot express; a segment whose layers read values it neither receives nor computes is
    a partitioning bug and raises ValueError.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; lowering needs opset {MIN_OPSET} or later")
    ctx = LoweringContext(graph, weights, opset)
    available = set(inputs)
    for layer_name in layer_names:
        layer = graph.layers[layer_name]
        registration = REGISTRY.find(layer)
        if registration is None:
            raise LoweringError(layer.name, layer.type, "no ONNX lowering is registered for this layer")
        refusal = registration.refusal(layer, graph)
        if refusal is not None:
            raise LoweringError(layer.name, layer.type, refusal)
        missing = [v for v in layer.bottoms if v not in available]
        if missing:
            raise ValueError(f"segment '{name}': layer '{layer.name}' reads {', '.join(missing)}, "
                             "which is neither a segment input nor computed earlier in the segment")
        registration.lower(ctx, layer, list(layer.bottoms), list(layer.tops))
        available.update(layer.tops)
    absent = [v for v in outputs if v not in available]
    if absent:
        raise ValueError(f"segment '{name}': outputs {', '.join(absent)} are not computed by its layers")
    onnx_graph = helper.make_graph(ctx.nodes, name, [_value_info(graph, v) for v in inputs],
                                   [_value_info(graph, v) for v in outputs], ctx.initializers)
    opset_ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(onnx_graph, opset_imports=opset_ids, producer_name="hybrid_infer",
                              ir_version=helper.find_min_ir_version_for(opset_ids))
    if check:
        # The full check serializes the model and infers every shape: on ResNet-50 it adds
        # about 200 MiB to the peak, so engine builds skip it (ONNX Runtime and TensorRT's
        # parser validate what they load) while export and the tests keep it.
        onnx.checker.check_model(model, full_check=True)
    return model
