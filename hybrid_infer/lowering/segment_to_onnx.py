"""Lower one segment of a Caffe net (a run of layers) to a self-contained ONNX model.

Tensors keep their value ids as names, so the executor feeds and reads the segment by
the same names the layer graph uses. The batch axis is symbolic in the interface and
never baked into the graph: the same model is built into TensorRT engines and run by
ONNX Runtime at whatever batch the user brings.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import LoweringError
from ..graph.layer_graph import Layer, LayerGraph
from .context import LoweringContext
from .registry import REGISTRY

MIN_OPSET = 13  # Softmax's single-axis semantics and axes-as-input ops start here


#: The name of the symbolic batch axis of every segment's inputs and outputs.
BATCH = "batch"


def _value_info(graph: LayerGraph, value_id: str,
                declared: Mapping[str, Sequence[int | str]] = {}) -> onnx.ValueInfoProto:
    shape = graph.values[value_id].shape
    dims: list[int | str] = [BATCH, *shape[1:]] if shape else []
    dims = list(declared.get(value_id, dims))
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
                                   [_value_info(graph, v, ctx.declared_dims) for v in outputs], ctx.initializers)
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
    if not registration.built_in:
        _check_top_shapes(ctx, layer, graph, registration.describe(), nodes, initializers)


def _dims(value_info: onnx.ValueInfoProto) -> Optional[list[Optional[int | str]]]:
    """A tensor's inferred dims: an int, BATCH for the symbolic batch, None where unknown;
    None for no shape at all."""
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else BATCH if d.dim_param == BATCH else None
            for d in tensor.shape.dim]


def _check_top_shapes(ctx: LoweringContext, layer: Layer, graph: LayerGraph, lowering: str,
                      first_node: int, first_initializer: int) -> None:
    """ONNX shape inference on just the nodes a user's lowering added for ``layer`` (its
    bottoms as inputs, with the symbolic batch): every top must come out in Caffe's shape,
    its batch axis symbolic or Caffe's size (or in the dims the lowering declared with
    ``ctx.declare_dims``, where a name matches any size). Raises LoweringError naming the layer, the
    lowering and both shapes, so that the layer runs in Caffe instead of giving a wrongly
    shaped tensor to the layers after it."""
    inputs = list(dict.fromkeys(layer.bottoms))
    piece = helper.make_graph(ctx.nodes[first_node:], f"{layer.name} alone", [_value_info(graph, v) for v in inputs],
                              [helper.make_value_info(top, onnx.TypeProto()) for top in layer.tops],
                              ctx.initializers[first_initializer:])
    opset_ids = [helper.make_opsetid("", ctx.opset)]
    model = helper.make_model(piece, opset_imports=opset_ids, ir_version=helper.find_min_ir_version_for(opset_ids))
    _check_node_schemas(ctx, layer, lowering, first_node)
    try:
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model, data_prop=True).graph.output}
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise LoweringError(layer.name, layer.type, f"ONNX shape inference fails on the nodes of {lowering}: "
                                                    f"{str(exc).strip().splitlines()[0]}") from exc
    unknown_ops = sorted({n.op_type for n in ctx.nodes[first_node:] if not onnx.defs.has(n.op_type, n.domain)})
    for top in layer.tops:
        caffe_shape, declared = graph.values[top].shape, ctx.declared_dims.get(top)
        dims = _dims(inferred[top]) if top in inferred else None
        if declared is not None:  # ctx.declare_dims: a name stands for a size known only at run time
            fits = dims is not None and len(dims) == len(declared) and all(
                isinstance(e, str) or d == e for d, e in zip(dims, declared))
            wanted = f"its declared dims are {tuple(declared)}"
        else:
            fits = dims is not None and len(dims) == len(caffe_shape) and all(
                d == c or (i == 0 and d == BATCH) for i, (d, c) in enumerate(zip(dims, caffe_shape)))
            wanted = f"Caffe's is {caffe_shape}"
        if not fits and unknown_ops:
            raise LoweringError(layer.name, layer.type, f"{lowering} uses operator(s) ONNX does not define "
                                                        f"({', '.join(unknown_ops)}), so the shape of top '{top}' "
                                                        "cannot be checked against Caffe's")
        if not fits:
            shown = "unknown" if dims is None else \
                "(" + ", ".join("N" if d == BATCH else "?" if d is None else str(d) for d in dims) + ")"
            raise LoweringError(layer.name, layer.type, f"{lowering} gives top '{top}' the shape {shown} "
                                                        f"(ONNX shape inference), but {wanted}")


SUBGRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _check_node_schemas(ctx: LoweringContext, layer: Layer, lowering: str, first_node: int) -> None:
    """Each node a user's lowering added, checked against its ONNX operator's schema
    (attributes, input and output counts). Shape inference passes over an attribute the
    operator does not define, and so do some engines (OpenVINO ran a Relu given an unknown
    attribute), so a node the lowering got wrong must be refused here. Operators ONNX does not
    define (a TensorRT plugin's) are left to the engines."""
    checker_context = onnx.checker.C.CheckerContext()
    checker_context.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", ctx.opset)])
    checker_context.opset_imports = {"": ctx.opset}
    for node in ctx.nodes[first_node:]:
        if node.domain or not onnx.defs.has(node.op_type) or any(a.type in SUBGRAPH_ATTRIBUTES for a in node.attribute):
            continue  # a Loop or If body reads names from outside, which check_node cannot see
        try:
            onnx.checker.check_node(node, checker_context)
        except onnx.checker.ValidationError as exc:
            raise LoweringError(layer.name, layer.type, f"{lowering} wrote a {node.op_type} node that ONNX's "
                                                        f"checker refuses: {str(exc).strip().splitlines()[0]}") from exc


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
