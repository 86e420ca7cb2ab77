"""Layers that combine, cut or rearrange blobs: Eltwise, Concat, Slice, Split, Flatten,
Reshape, Crop, Permute, and the pass-through Input and Dropout.

None of them may bake the batch size into the graph, because one ONNX model serves
every batch: new shapes copy the batch axis (Reshape's 0) or infer it (-1), and slices
along the batch axis run to the end instead of to the prototxt's batch.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..graph.layer_graph import Layer, LayerGraph
from .context import LoweringContext
from .registry import register_lowering

_TO_END = np.iinfo(np.int64).max


@register_lowering("Input")
def lower_input(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Input blobs are the ONNX graph's inputs: nothing to compute."""


def _identity(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    for out in outputs:
        ctx.node("Identity", [inputs[0]], [out], layer=layer.name)


@register_lowering("Split")
def lower_split(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Every top is the bottom itself; ONNX needs one Identity per distinct output name."""
    _identity(ctx, layer, inputs, outputs)


@register_lowering("Dropout")
def lower_dropout(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """At TEST Caffe's Dropout copies its input (training already scaled the kept units)."""
    _identity(ctx, layer, inputs, outputs)


def check_eltwise(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.eltwise_param
    if len(p.coeff) and (p.operation != p.SUM or len(p.coeff) != len(layer.bottoms)):
        return "Eltwise coefficients need operation SUM and one value per bottom"
    return None


@register_lowering("Eltwise", check=check_eltwise)
def lower_eltwise(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """SUM adds coeff_i * x_i in bottom order, as Caffe's axpy loop does."""
    p = layer.param.eltwise_param
    if p.operation == p.MAX:
        ctx.node("Max", inputs, outputs, layer=layer.name)
        return
    terms = list(inputs)
    if p.operation == p.SUM:
        terms = [x if c == 1 else ctx.node("Mul", [x, ctx.const(np.float32(c), f"{layer.name}/coeff")],
                                           layer=layer.name)[0]
                 for x, c in zip(inputs, list(p.coeff) or [1.0] * len(inputs))]
    op = "Add" if p.operation == p.SUM else "Mul"
    if len(terms) == 1:
        ctx.node("Identity", terms, outputs, layer=layer.name)
        return
    acc = terms[0]
    for i, term in enumerate(terms[1:], start=2):
        acc = ctx.node(op, [acc, term], outputs if i == len(terms) else None, layer=layer.name)[0]


@register_lowering("Concat")
def lower_concat(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    p = layer.param.concat_param
    rank = len(ctx.shape(inputs[0]))
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    ctx.node("Concat", inputs, outputs, layer=layer.name,
             axis=ctx.canonical_axis(layer.name, axis, rank))


@register_lowering("Slice")
def lower_slice(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Equal parts become one Split; slice points become one Slice per top, the last running
    to the end, so that slicing the batch axis still works at other batch sizes."""
    p = layer.param.slice_param
    rank = len(ctx.shape(inputs[0]))
    axis = ctx.canonical_axis(layer.name, p.slice_dim if p.HasField("slice_dim") else p.axis, rank)
    if len(outputs) == 1:
        ctx.node("Identity", inputs, outputs, layer=layer.name)
        return
    if not len(p.slice_point):
        attrs = {"num_outputs": len(outputs)} if ctx.opset >= 18 else {}
        ctx.node("Split", inputs, outputs, layer=layer.name, axis=axis, **attrs)
        return
    points = [int(q) for q in p.slice_point]
    if len(points) != len(outputs) - 1:
        raise ctx.error(layer.name, f"{len(points)} slice points for {len(outputs)} tops")
    axes = ctx.const(np.array([axis]), f"{layer.name}/axis")
    for start, end, out in zip([0] + points, points + [_TO_END], outputs):
        ctx.node("Slice", [inputs[0], ctx.const(np.array([start]), f"{layer.name}/start"),
                           ctx.const(np.array([end]), f"{layer.name}/end"), axes], [out],
                 layer=layer.name)


def _reshape(ctx: LoweringContext, layer: Layer, x: str, out: str, target: list[int]) -> None:
    ctx.node("Reshape", [x, ctx.const(np.array(target), f"{layer.name}/shape")], [out], layer=layer.name)


@register_lowering("Flatten")
def lower_flatten(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Axes before ``axis`` are copied (0), the flattened run is inferred (-1), later axes kept."""
    p = layer.param.flatten_param
    shape = ctx.shape(inputs[0])
    start = ctx.canonical_axis(layer.name, p.axis, len(shape))
    end = ctx.canonical_axis(layer.name, p.end_axis, len(shape))
    if end < start:
        raise ctx.error(layer.name, f"end_axis {p.end_axis} comes before axis {p.axis}")
    _reshape(ctx, layer, inputs[0], outputs[0], [0] * start + [-1] + list(shape[end + 1:]))


@register_lowering("Reshape")
def lower_reshape(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Caffe's 0 copies the input dim at the same output position, as ONNX's 0 does, so the
    spec goes through unchanged; kept axes before it are copied, kept axes after it are static."""
    p = layer.param.reshape_param
    shape = ctx.shape(inputs[0])
    start = p.axis if p.axis >= 0 else len(shape) + p.axis + 1
    end = len(shape) if p.num_axes == -1 else start + p.num_axes
    if not 0 <= start <= end <= len(shape):
        raise ctx.error(layer.name, f"axis {p.axis} / num_axes {p.num_axes} do not fit a {len(shape)}-D blob")
    if end == 0 and shape:
        raise ctx.error(layer.name, "inserting axes before the batch axis is not lowered")
    _reshape(ctx, layer, inputs[0], outputs[0],
             [0] * start + [int(d) for d in p.shape.dim] + list(shape[end:]))


@register_lowering("Crop")
def lower_crop(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Axes from ``axis`` on take the second bottom's size at the given offsets. The batch
    axis can only be 'cropped' to itself, which every batch size allows."""
    p = layer.param.crop_param
    shape, reference = ctx.shape(inputs[0]), ctx.shape(inputs[1])
    start_axis = ctx.canonical_axis(layer.name, p.axis, len(shape))
    cropped = len(shape) - start_axis
    if len(p.offset) > 1:
        offsets = [int(o) for o in p.offset]
    else:
        offsets = [int(p.offset[0]) if len(p.offset) else 0] * cropped
    if len(offsets) != cropped:
        raise ctx.error(layer.name, f"{len(offsets)} offsets for {cropped} cropped axes")
    if start_axis == 0 and offsets[0] != 0:
        raise ctx.error(layer.name, "cropping the batch axis at an offset is not lowered")
    axes = [i for i, off in enumerate(offsets, start=start_axis)
            if i > 0 and (off, reference[i]) != (0, shape[i])]
    if not axes:
        ctx.node("Identity", inputs[:1], outputs, layer=layer.name)
        return
    starts = [offsets[i - start_axis] for i in axes]
    ends = [start + reference[i] for start, i in zip(starts, axes)]
    ctx.node("Slice", [inputs[0], ctx.const(np.array(starts), f"{layer.name}/starts"),
                       ctx.const(np.array(ends), f"{layer.name}/ends"),
                       ctx.const(np.array(axes), f"{layer.name}/axes")], outputs, layer=layer.name)


@register_lowering("Permute")
def lower_permute(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Unlisted axes follow the listed ones in their original order, as in SSD's Permute."""
    rank = len(ctx.shape(inputs[0]))
    order = [int(o) for o in layer.param.permute_param.order]
    if len(set(order)) != len(order) or any(not 0 <= o < rank for o in order):
        raise ctx.error(layer.name, f"order {order} is not a permutation of axes of a {rank}-D blob")
    order += [i for i in range(rank) if i not in order]
    if order == list(range(rank)):
        ctx.node("Identity", inputs, outputs, layer=layer.name)
    else:
        ctx.node("Transpose", inputs, outputs, layer=layer.name, perm=order)
