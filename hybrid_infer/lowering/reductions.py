"""Layers that reduce over axes: MVN, Reduction and ArgMax.

Sums are ONNX ReduceSum, whose axes are an input from opset 13 on (ReduceMean and the
other reductions only took that form in opset 18), followed by Caffe's own scaling: Caffe
averages by multiplying with 1/dim or coeff/dim in float32, and so does the lowering. None of
these layers is lowered when it would reduce over the batch axis.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..graph.layer_graph import Layer, LayerGraph
from .context import LoweringContext
from .registry import register_lowering
from .tensor_ops import emit_reshape

#: TensorRT's TopK takes k up to this value.
TENSORRT_MAX_TOP_K = 3840
_FLOAT = 1  # onnx.TensorProto.FLOAT


def _sum(ctx: LoweringContext, layer: str, x: str, axis: int, keepdims: int, out: Optional[str] = None) -> str:
    return ctx.node("ReduceSum", [x, ctx.const(np.array([axis]), f"{layer}/axes")], [out] if out else None,
                    layer=layer, keepdims=keepdims)[0]


def _scale(ctx: LoweringContext, layer: str, x: str, factor: np.float32, out: Optional[str] = None) -> str:
    return ctx.node("Mul", [x, ctx.const(factor, f"{layer}/factor")], [out] if out else None, layer=layer)[0]


@register_lowering("MVN")
def lower_mvn(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """mvn_layer.cpp: per item (across_channels) or per item and channel, y = x - mean and, with
    normalize_variance, y / (sqrt(mean(y^2)) + eps): eps is added to the standard deviation,
    not to the variance. Means are sums times float32(1/dim). Caffe's top is 4-D (N, C, H, W)
    whatever the input's rank (legacy shape), so the result is reshaped to it."""
    p = layer.param.mvn_param
    name, shape = layer.name, ctx.shape(inputs[0])
    channels = shape[1] if len(shape) > 1 else 1
    rows = emit_reshape(ctx, name, inputs[0], [0, -1] if p.across_channels else [0, channels, -1])
    dim = int(np.prod(shape[1 if p.across_channels else 2:], dtype=np.int64))
    inverse_dim = np.float32(1.0 / dim)
    mean = _scale(ctx, name, _sum(ctx, name, rows, -1, 1), inverse_dim)
    centred = ctx.node("Sub", [rows, mean], layer=name)[0]
    result = centred
    if p.normalize_variance:
        square = ctx.node("Mul", [centred, centred], layer=name)[0]
        std = ctx.node("Sqrt", [_scale(ctx, name, _sum(ctx, name, square, -1, 1), inverse_dim)], layer=name)[0]
        denominator = ctx.node("Add", [std, ctx.const(np.float32(p.eps), f"{name}/eps")], layer=name)[0]
        result = ctx.node("Div", [centred, denominator], layer=name)[0]
    emit_reshape(ctx, name, result, [0, *ctx.shape(outputs[0])[1:]], outputs[0])


def _reduction_axis(layer: Layer, graph: LayerGraph) -> tuple[int, int]:
    rank = len(graph.values[layer.bottoms[0]].shape)
    axis = layer.param.reduction_param.axis
    return (axis + rank if axis < 0 else axis), rank


def check_reduction(layer: Layer, graph: LayerGraph) -> Optional[str]:
    axis, rank = _reduction_axis(layer, graph)
    if axis == 0:
        return "reducing from axis 0 sums over the batch (one scalar per batch)"
    if not 0 < axis < rank:
        return f"axis {layer.param.reduction_param.axis} is out of range for a {rank}-D blob"
    return None


@register_lowering("Reduction", check=check_reduction)
def lower_reduction(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """reduction_layer.cpp reduces all axes from ``axis`` on (the output keeps the axes before it):
    SUM, ASUM (sum of |x|), SUMSQ (sum of x^2) or MEAN (the sum times coeff/dim, divided in
    float32), then times ``coeff`` when that is not 1."""
    p = layer.param.reduction_param
    name = layer.name
    axis, _ = _reduction_axis(layer, ctx.graph)
    x = emit_reshape(ctx, name, inputs[0], [0] * axis + [-1])
    if p.operation == p.ASUM:
        x = ctx.node("Abs", [x], layer=name)[0]
    elif p.operation == p.SUMSQ:
        x = ctx.node("Mul", [x, x], layer=name)[0]
    coeff = np.float32(p.coeff)
    if p.operation == p.MEAN:
        coeff = coeff / np.float32(np.prod(ctx.shape(inputs[0])[axis:], dtype=np.int64))
    if coeff == 1:
        _sum(ctx, name, x, axis, 0, outputs[0])
    else:
        _scale(ctx, name, _sum(ctx, name, x, axis, 0), coeff, outputs[0])


def check_argmax(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.argmax_param
    rank = len(graph.values[layer.bottoms[0]].shape)
    if p.HasField("axis") and (p.axis == 0 or p.axis == -rank):
        return "ArgMax over axis 0 ranks across the batch"
    if p.top_k > TENSORRT_MAX_TOP_K:
        return f"top_k {p.top_k} is above TensorRT's TopK limit of {TENSORRT_MAX_TOP_K}"
    return None


def _ranked_indices(ctx: LoweringContext, layer: str, x: str, axis: int, size: int, k: int) -> str:
    """Indices (int64) of the ``k`` largest entries along ``axis``, in Caffe's order.

    argmax_layer.cpp partially sorts (value, index) pairs with std::greater, so among equal
    values the *larger* index comes first. For k = 1 that is ArgMax with select_last_index;
    for k > 1 the axis is reversed (Gather), TopK is taken (ONNX puts the lower index first
    among ties, i.e. the larger original index) and the indices are mapped back.
    """
    if k == 1:
        return ctx.node("ArgMax", [x], layer=layer, axis=axis, keepdims=1, select_last_index=1)[0]
    reversed_x = ctx.node("Gather", [x, ctx.const(np.arange(size - 1, -1, -1), f"{layer}/reverse")], layer=layer,
                          axis=axis)[0]
    _, indices = ctx.node("TopK", [reversed_x, ctx.const(np.array([k]), f"{layer}/k")],
                          [ctx.fresh(f"{layer}/top_values"), ctx.fresh(f"{layer}/top_indices")],
                          layer=layer, axis=axis, largest=1, sorted=1)
    return ctx.node("Sub", [ctx.const(np.array(size - 1), f"{layer}/last"), indices], layer=layer)[0]


@register_lowering("ArgMax", check=check_argmax)
def lower_argmax(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """With ``axis``: the top_k indices (as float) or, with out_max_val, the values, along that
    axis. Without: per item over the flattened rest, shape (N, 1, top_k) of indices or
    (N, 2, top_k) of indices then values, padded with unit axes to the input's rank."""
    p = layer.param.argmax_param
    name, shape, k = layer.name, ctx.shape(inputs[0]), int(p.top_k)
    if p.HasField("axis"):
        axis = ctx.canonical_axis(name, p.axis, len(shape))
        x, size = inputs[0], shape[axis]
    else:
        axis, size = 1, int(np.prod(shape[1:], dtype=np.int64))
        x = emit_reshape(ctx, name, inputs[0], [0, -1])
    indices = _ranked_indices(ctx, name, x, axis, size, k)
    if p.HasField("axis"):
        if p.out_max_val:
            ctx.node("GatherElements", [x, indices], outputs, layer=name, axis=axis)
        else:
            ctx.node("Cast", [indices], outputs, layer=name, to=_FLOAT)
        return
    as_float = ctx.node("Cast", [indices], layer=name, to=_FLOAT)[0]
    if p.out_max_val:
        values = ctx.node("GatherElements", [x, indices], layer=name, axis=axis)[0]
        as_float = ctx.node("Concat", [as_float, values], layer=name, axis=1)[0]
    emit_reshape(ctx, name, as_float, [0, *ctx.shape(outputs[0])[1:]], outputs[0])
