"""Layers that combine, cut, repeat or rearrange blobs: Eltwise, Concat, Slice, Split, Flatten,
Reshape, Crop, Permute, Tile, Unsqueeze, the table look-up Embed, and the pass-through Input
and Dropout.

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


def emit_reshape(ctx: LoweringContext, layer: str, x: str, target: list[int], out: Optional[str] = None) -> str:
    """Reshape ``x`` to ``target`` (ONNX's 0 copies the input dim, -1 is inferred; give the batch
    axis as 0 so the graph serves every batch size); returns the output name."""
    return ctx.node("Reshape", [x, ctx.const(np.array(target), f"{layer}/shape")], [out] if out else None,
                    layer=layer)[0]


@register_lowering("Flatten")
def lower_flatten(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Axes before ``axis`` are copied (0), the flattened run is inferred (-1), later axes kept."""
    p = layer.param.flatten_param
    shape = ctx.shape(inputs[0])
    start = ctx.canonical_axis(layer.name, p.axis, len(shape))
    end = ctx.canonical_axis(layer.name, p.end_axis, len(shape))
    if end < start:
        raise ctx.error(layer.name, f"end_axis {p.end_axis} comes before axis {p.axis}")
    emit_reshape(ctx, layer.name, inputs[0], [0] * start + [-1] + list(shape[end + 1:]), outputs[0])


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
    emit_reshape(ctx, layer.name, inputs[0], [0] * start + [int(d) for d in p.shape.dim] + list(shape[end:]),
                 outputs[0])


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


def _not_batch_axis(axis: int, rank: int, what: str) -> Optional[str]:
    """None, or why an operation on axis 0 (the batch axis, symbolic in segments) is refused."""
    if axis == 0 or axis == -rank:
        return f"{what} the batch axis, whose size the segment leaves open"
    return None


def check_tile(layer: Layer, graph: LayerGraph) -> Optional[str]:
    rank = len(graph.values[layer.bottoms[0]].shape)
    return _not_batch_axis(layer.param.tile_param.axis, rank, "tiling repeats")


@register_lowering("Tile", check=check_tile)
def lower_tile(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """tile_layer.cpp copies the block from ``axis`` on ``tiles`` times per outer index: ONNX Tile
    with repeats 1 everywhere but ``axis``."""
    p = layer.param.tile_param
    rank = len(ctx.shape(inputs[0]))
    repeats = np.ones(rank, dtype=np.int64)
    repeats[ctx.canonical_axis(layer.name, p.axis, rank)] = p.tiles
    ctx.node("Tile", [inputs[0], ctx.const(repeats, f"{layer.name}/repeats")], outputs, layer=layer.name)


def _unsqueeze_position(layer: Layer, rank: int) -> int:
    """unsqueeze.cpp: a negative dim counts from the end of the output (dim + rank + 1)."""
    dim = layer.param.unsqueeze_param.dim
    return dim + rank + 1 if dim < 0 else dim


def check_unsqueeze(layer: Layer, graph: LayerGraph) -> Optional[str]:
    rank = len(graph.values[layer.bottoms[0]].shape)
    position = _unsqueeze_position(layer, rank)
    if position == 0:
        return "a new axis before the batch axis moves the batch off axis 0"
    if not 0 < position <= rank:
        return f"dim {layer.param.unsqueeze_param.dim} is out of range for a {rank}-D blob"
    return None


@register_lowering("Unsqueeze", check=check_unsqueeze)
def lower_unsqueeze(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """A unit axis inserted at ``dim``. (Caffe fixes the top shape at setup, so in Caffe this
    layer only works at the prototxt's batch; the lowering works at any.)"""
    position = _unsqueeze_position(layer, len(ctx.shape(inputs[0])))
    ctx.node("Unsqueeze", [inputs[0], ctx.const(np.array([position]), f"{layer.name}/axes")], outputs,
             layer=layer.name)


@register_lowering("Embed")
def lower_embed(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """embed_layer.cpp: each input value, truncated to an int, selects a row of the (input_dim,
    num_output) weight, plus the bias: Cast to int32 (truncation), Gather, Add. Output shape is
    the input's with num_output appended. An index outside [0, input_dim) is an error in ONNX
    Runtime where Caffe reads past its weights."""
    blobs = ctx.weights(layer.name)
    index = ctx.node("Cast", inputs, layer=layer.name, to=6)[0]  # TensorProto.INT32
    has_bias = layer.param.embed_param.bias_term
    rows = ctx.node("Gather", [ctx.const(blobs[0], f"{layer.name}/weight"), index], None if has_bias else outputs,
                    layer=layer.name, axis=0)[0]
    if has_bias:
        ctx.node("Add", [rows, ctx.const(blobs[1], f"{layer.name}/bias")], outputs, layer=layer.name)
