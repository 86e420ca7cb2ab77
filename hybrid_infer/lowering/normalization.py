"""BatchNorm (and the BatchNormKyle fork), Scale, Bias, LRN, Normalize and Softmax.

Scale and Bias apply a tensor (learned, or a second bottom) whose axes line up with
the input's from ``axis`` on; in ONNX that is plain broadcasting once the tensor has
trailing unit axes. LRN WITHIN_CHANNEL has no ONNX op and is composed exactly as
Caffe composes it internally: square, AVE pool, power, product; ACROSS_CHANNELS is composed
the same way (over the channel axis) because ONNX Runtime's LRN kernel is slow.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..graph.layer_graph import Layer, LayerGraph
from .activations import emit_power
from .context import LoweringContext, channel_shaped
from .conv_pool import emit_pool
from .registry import register_lowering


def check_batch_norm(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        return f"{layer.type} with use_global_stats: false normalises by batch statistics"
    if len(graph.values[layer.bottoms[0]].shape) < 2:
        return f"{layer.type} is lowered for blobs with a channel axis only"
    return None


def _emit_global_stats(ctx: LoweringContext, layer: Layer, x: str, out: str,
                       alpha: Optional[np.ndarray] = None, beta: Optional[np.ndarray] = None) -> None:
    """Caffe computes (x - mean * s) / sqrt(var * s + eps) with s = 1 / factor (0 when the
    factor is 0), then BatchNormKyle's optional alpha * . + beta; this is emitted as x * a + b
    with a = alpha / std and b = beta - mean * s * alpha / std folded in float64, because a Mul
    and an Add of constants right after a convolution are what ONNX Runtime and TensorRT fold
    into the convolution's weights (a Sub and a Div are not). The result differs from Caffe's
    by float32 rounding only."""
    mean, var, factor = (a.astype(np.float64) for a in ctx.weights(layer.name)[:3])
    scale = 0.0 if factor.flat[0] == 0 else 1.0 / factor.flat[0]
    multiplier = 1.0 / np.sqrt(var * scale + np.float64(np.float32(layer.param.batch_norm_param.eps)))
    shift = -mean * scale * multiplier
    if alpha is not None and beta is not None:
        multiplier, shift = multiplier * alpha, shift * alpha + beta
    rank = len(ctx.shape(x))
    scaled = ctx.node("Mul", [x, ctx.const(channel_shaped(multiplier, rank), f"{layer.name}/inverse_std")],
                      layer=layer.name)[0]
    ctx.node("Add", [scaled, ctx.const(channel_shaped(shift, rank), f"{layer.name}/shift")], [out],
             layer=layer.name)


@register_lowering("BatchNorm", check=check_batch_norm)
def lower_batch_norm(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Global statistics only (see ``_emit_global_stats``)."""
    _emit_global_stats(ctx, layer, inputs[0], outputs[0])


@register_lowering("BatchNormKyle", check=check_batch_norm)
def lower_batch_norm_kyle(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """batch_norm_kyle_layer.cpp: BatchNorm's global-statistics formula (it uses global statistics
    at TEST unless told otherwise), then with use_alpha_beta a per-channel alpha * y + beta
    (blobs 3 and 4)."""
    if not layer.param.batch_norm_param.use_alpha_beta:
        _emit_global_stats(ctx, layer, inputs[0], outputs[0])
        return
    alpha, beta = (a.astype(np.float64) for a in ctx.weights(layer.name)[3:5])
    _emit_global_stats(ctx, layer, inputs[0], outputs[0], alpha, beta)


def _broadcast_operand(ctx: LoweringContext, layer: Layer, operand: "str | np.ndarray",
                       shape: tuple[int, ...], axis: int, x_shape: tuple[int, ...], hint: str) -> str:
    """Give a Scale/Bias operand trailing unit axes so it lines up with ``x`` from ``axis`` on.

    Caffe (Bias, and BVLC Scale) requires the operand's dims to equal the input's there;
    this fork's Scale dropped that check but still indexes as if they were equal.
    """
    if shape != x_shape[axis:axis + len(shape)]:
        raise ctx.error(layer.name, f"operand of shape {shape} does not match input dims "
                                    f"{x_shape[axis:axis + len(shape)]} from axis {axis}")
    trailing = len(x_shape) - axis - len(shape)
    if isinstance(operand, np.ndarray):
        return ctx.const(operand.reshape(shape + (1,) * trailing), hint)
    if trailing == 0:
        return operand
    axes = ctx.const(np.arange(len(shape), len(shape) + trailing), f"{hint}_axes")
    return ctx.node("Unsqueeze", [operand, axes], layer=layer.name)[0]


def _apply(ctx: LoweringContext, layer: Layer, op: str, x: str, x_shape: tuple[int, ...],
           operand: "str | np.ndarray", axis: int, outputs: "list[str] | None", hint: str) -> str:
    """``x op operand`` with the operand applied from ``axis`` (from 0 if it is a scalar, as in
    Caffe, whatever ``axis`` says)."""
    shape = ctx.shape(operand) if isinstance(operand, str) else operand.shape
    start = 0 if not shape else ctx.canonical_axis(layer.name, axis, len(x_shape))
    operand_name = _broadcast_operand(ctx, layer, operand, shape, start, x_shape, f"{layer.name}/{hint}")
    return ctx.node(op, [x, operand_name], outputs, layer=layer.name)[0]


@register_lowering("Scale")
def lower_scale(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """The bias of ``bias_term`` has the scale's shape and axis; it is blob 1, or blob 0 when
    the scale comes from a second bottom."""
    p = layer.param.scale_param
    x_shape = ctx.shape(inputs[0])
    from_bottom = len(inputs) > 1
    blobs = ctx.weights(layer.name) if p.bias_term or not from_bottom else []
    factor = inputs[1] if from_bottom else blobs[0]
    if not p.bias_term:
        _apply(ctx, layer, "Mul", inputs[0], x_shape, factor, p.axis, outputs, "scale")
        return
    scaled = _apply(ctx, layer, "Mul", inputs[0], x_shape, factor, p.axis, None, "scale")
    _apply(ctx, layer, "Add", scaled, x_shape, blobs[0 if from_bottom else 1], p.axis, outputs, "bias")


@register_lowering("Bias")
def lower_bias(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    bias = inputs[1] if len(inputs) > 1 else ctx.weights(layer.name)[0]
    _apply(ctx, layer, "Add", inputs[0], ctx.shape(inputs[0]), bias, layer.param.bias_param.axis,
           outputs, "bias")


@register_lowering("Softmax")
def lower_softmax(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Opset-13 Softmax normalises along one axis, exactly Caffe's, trailing dims or not."""
    axis = ctx.canonical_axis(layer.name, layer.param.softmax_param.axis, len(ctx.shape(inputs[0])))
    ctx.node("Softmax", inputs, outputs, layer=layer.name, axis=axis)


def _power(ctx: LoweringContext, layer: str, base: str, exponent: float) -> str:
    """base ^ exponent for base > 0, with exponents 1/2 and 3/4 (LRN's usual beta) as square
    roots: ONNX Runtime's Pow calls powf per element and its Log is not vectorised, while Sqrt
    is. Other exponents go through exp(exponent * log(base)). Each form is within a few ulp of
    Caffe's powf."""
    if exponent in (0.5, 0.75):
        root = ctx.node("Sqrt", [base], layer=layer)[0]
        if exponent == 0.5:
            return root
        return ctx.node("Sqrt", [ctx.node("Mul", [base, root], layer=layer)[0]], layer=layer)[0]
    logarithm = ctx.node("Log", [base], layer=layer)[0]
    scaled = ctx.node("Mul", [logarithm, ctx.const(np.float32(exponent), f"{layer}/exponent")], layer=layer)[0]
    return ctx.node("Exp", [scaled], layer=layer)[0]


def _lrn_across_channels(ctx: LoweringContext, layer: Layer, x: str, out: str) -> None:
    """x / (k + alpha/size * sum of x^2 over a window of ``size`` channels)^beta.

    Composed rather than ONNX's LRN node, whose CPU kernel in ONNX Runtime is a scalar loop
    (a third of AlexNet's and GoogLeNet's time). The channel-window sum is an average pool
    of the squares with the channel axis moved next to the width, (N, H, C, W): a (size x 1)
    window, zero-padded like Caffe's padded square and divided by ``size`` everywhere
    (count_include_pad), as Caffe divides; H stays a pooling channel, so the pool runs in
    parallel. The element-wise rest is done in that layout, then moved back.
    """
    p = layer.param.lrn_param
    name, size = layer.name, int(p.local_size)
    pad = (size - 1) // 2
    square = ctx.node("Mul", [x, x], layer=name)[0]
    rows = ctx.node("Transpose", [square], layer=name, perm=[0, 2, 1, 3])[0]
    window_mean = ctx.node("AveragePool", [rows], layer=name, kernel_shape=[size, 1],
                           strides=[1, 1], pads=[pad, 0, pad, 0], count_include_pad=1)[0]
    scaled = ctx.node("Mul", [window_mean, ctx.const(np.float32(p.alpha), f"{name}/alpha")], layer=name)[0]
    base = ctx.node("Add", [scaled, ctx.const(np.float32(p.k), f"{name}/k")], layer=name)[0]
    denominator = ctx.node("Transpose", [_power(ctx, name, base, float(np.float32(p.beta)))], layer=name,
                           perm=[0, 2, 1, 3])[0]
    ctx.node("Div", [x, denominator], [out], layer=name)


@register_lowering("LRN")
def lower_lrn(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """ACROSS_CHANNELS: see ``_lrn_across_channels``. WITHIN_CHANNEL is
    x * (1 + alpha * avgpool(x^2))^-beta over size x size windows padded by (size-1)/2; its
    k is ignored and the pooling divides by size^2 everywhere, as in Caffe."""
    p = layer.param.lrn_param
    size = int(p.local_size)
    if size % 2 != 1:
        raise ctx.error(layer.name, f"local_size {size} is even; Caffe's LRN takes odd sizes only")
    shape = ctx.shape(inputs[0])
    if len(shape) != 4:
        raise ctx.error(layer.name, "Caffe's LRN takes 4-D blobs only")
    if p.norm_region == p.ACROSS_CHANNELS:
        _lrn_across_channels(ctx, layer, inputs[0], outputs[0])
        return
    name, x = layer.name, inputs[0]
    square = ctx.node("Mul", [x, x], layer=name)[0]
    mean = ctx.fresh(f"{name}/window_mean")
    pad = (size - 1) // 2
    emit_pool(ctx, name, "AVE", square, mean, [size, size], [1, 1], [pad, pad], shape[2:], shape[2:])
    denominator = ctx.fresh(f"{name}/inverse_denominator")
    emit_power(ctx, name, mean, denominator, power=-p.beta, scale=p.alpha, shift=1.0)
    ctx.node("Mul", [x, denominator], outputs, layer=name)


def check_normalize(layer: Layer, graph: LayerGraph) -> Optional[str]:
    if len(graph.values[layer.bottoms[0]].shape) != 4:
        return "Normalize is lowered for 4-D blobs only"
    return None


@register_lowering("Normalize", check=check_normalize)
def lower_normalize(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """SSD's L2 normalisation: x / sqrt(sum(x^2) + eps) over all of an item (across_spatial)
    or over channels per position, then times the learned scale (one, or one per channel)."""
    p = layer.param.norm_param
    name, x = layer.name, inputs[0]
    rank = len(ctx.shape(x))
    axes = list(range(1, rank)) if p.across_spatial else [1]
    square = ctx.node("Mul", [x, x], layer=name)[0]
    total = ctx.node("ReduceSum", [square, ctx.const(np.array(axes), f"{name}/axes")], layer=name,
                     keepdims=1)[0]
    with_eps = ctx.node("Add", [total, ctx.const(np.float32(p.eps), f"{name}/eps")], layer=name)[0]
    norm = ctx.node("Sqrt", [with_eps], layer=name)[0]
    normalised = ctx.node("Div", [x, norm], layer=name)[0]
    scale = ctx.weights(name)[0]
    scale = scale.reshape(()) if p.channel_shared else channel_shaped(scale, rank)
    ctx.node("Mul", [normalised, ctx.const(scale, f"{name}/scale")], outputs, layer=name)
