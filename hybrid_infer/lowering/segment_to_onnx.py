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
from ..graph.layer_graph import Layer, LayerGraph
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

    Raises LoweringError naming every layer of the segment that has no lowering, whose
    lowering refuses its parameters or fails, or (``check``) whose ONNX is invalid; a
    segment whose layers read values it neither receives nor computes is a partitioning bug
    and raises ValueError.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; lowering needs opset {MIN_OPSET} or later")
    ctx = LoweringContext(graph, weights, opset)
    available = set(inputs)
    failures: list[LoweringError] = []
    for layer_name in layer_names:
        layer = graph.layers[layer_name]
        missing = [v for v in layer.bottoms if v not in available]
        if missing:
            raise ValueError(f"segment '{name}': layer '{layer.name}' reads {', '.join(missing)}, "
                             "which is neither a segment input nor computed earlier in the segment")
        available.update(layer.tops)  # also after a failure, so later layers are still examined
        try:
            _lower_layer(ctx, layer, graph)
        except LoweringError as exc:
            failures.append(exc)
    if failures:
        raise LoweringError.combine(failures)
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
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            blamed = layers_named_in(str(exc), model)
            if not blamed:
                raise
            message = str(exc).strip().splitlines()[0]
            raise LoweringError.combine([LoweringError(layer, graph.layers[layer].type,
                                                       f"its ONNX is invalid: {message}")
                                         for layer in blamed]) from exc
    return model


def _lower_layer(ctx: LoweringContext, layer: Layer, graph: LayerGraph) -> None:
    """Lower one layer through its registration, checking that it wrote every top."""
    registration = REGISTRY.find(layer)
    if registration is None:
        raise LoweringError(layer.name, layer.type, "no ONNX lowering is registered for this layer")
    refusal = registration.refusal(layer, graph)
    if refusal is not None:
        raise LoweringError(layer.name, layer.type, refusal)
    nodes, initializers = len(ctx.nodes), len(ctx.initializers)
    registration.emit(ctx, layer, list(layer.bottoms), list(layer.tops))
    if layer.is_input:
        return
    written = {out for node in ctx.nodes[nodes:] for out in node.output}
    written.update(init.name for init in ctx.initializers[initializers:])
    unwritten = [top for top in layer.tops if top not in written]
    if unwritten:
        raise LoweringError(layer.name, layer.type,
                            f"{registration.describe()} did not write its output(s) {', '.join(unwritten)}")


def layers_named_in(message: str, model: onnx.ModelProto) -> list[str]:
    """The Caffe layers whose ONNX nodes an error message names, in node order.

    Every node the lowering emits is called ``layer/Op_k`` and carries the layer's name in
    ``doc_string`` (LoweringContext.node), so ONNX, ONNX Runtime and OpenVINO messages that
    quote a node name can be traced back to the Caffe layer.
    """
    layers: list[str] = []
    for node in model.graph.node:
        if node.name and node.doc_string and node.name in message and node.doc_string not in layers:
            layers.append(node.doc_string)
    return layers
