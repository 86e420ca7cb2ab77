"""Convolution, Deconvolution, Im2col, Pooling and InnerProduct: the layers that carry windows or weights.

Convolutions map one to one onto ONNX. Pooling does not: Caffe rounds its output size
up (unless ``ceil_mode: false``), drops a last window that would start in the padding,
and divides AVE sums by the window clipped to the *padded* input. The lowering therefore
takes the output size Caffe computed and derives explicit end pads from it, and corrects
ONNX's constant ``kernel_h * kernel_w`` divisor with a per-position factor where needed.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..graph.layer_graph import Layer, LayerGraph
from .context import LoweringContext
from .registry import register_lowering


def _per_axis(ctx: LoweringContext, layer: Layer, what: str, values: Sequence[int],
              rank: int, default: int) -> list[int]:
    """Caffe's repeated geometry fields: absent (default), once for all axes, or once per axis."""
    if len(values) == 0:
        return [default] * rank
    if len(values) == 1:
        return [int(values[0])] * rank
    if len(values) == rank:
        return [int(v) for v in values]
    raise ctx.error(layer.name, f"{what} is given {len(values)} times for {rank} spatial axes")


def _conv_geometry(ctx: LoweringContext, layer: Layer, rank: int) -> dict[str, list[int]]:
    """kernel_shape, strides, pads, dilations as ONNX attributes, from Caffe's several spellings."""
    p = layer.param.convolution_param
    if p.HasField("kernel_h") or p.HasField("kernel_w"):
        kernel = [p.kernel_h, p.kernel_w]
    else:
        kernel = _per_axis(ctx, layer, "kernel_size", p.kernel_size, rank, 0)
    if p.HasField("stride_h") or p.HasField("stride_w"):
        stride = [p.stride_h, p.stride_w]
    else:
        stride = _per_axis(ctx, layer, "stride", p.stride, rank, 1)
    if p.HasField("pad_h") or p.HasField("pad_w"):
        pad = [p.pad_h, p.pad_w]
    else:
        pad = _per_axis(ctx, layer, "pad", p.pad, rank, 0)
    dilation = _per_axis(ctx, layer, "dilation", p.dilation, rank, 1)
    if len(kernel) != rank or min(kernel) <= 0:
        raise ctx.error(layer.name, f"kernel {kernel} does not fit {rank} spatial axes")
    return {"kernel_shape": kernel, "strides": stride, "pads": pad + pad, "dilations": dilation}


def _lower_conv_like(op_type: str, ctx: LoweringContext, layer: Layer, inputs: list[str],
                     outputs: list[str]) -> None:
    """Caffe convolves each bottom with the same weights into the top of the same position
    (base_conv_layer.cpp), so several bottoms share one weight initializer."""
    p = layer.param.convolution_param
    rank = len(ctx.shape(inputs[0])) - 2
    blobs = ctx.weights(layer.name)
    weights = [ctx.const(blobs[0], f"{layer.name}/weight")]
    if p.bias_term:
        weights.append(ctx.const(blobs[1], f"{layer.name}/bias"))
    geometry = _conv_geometry(ctx, layer, rank)
    for x, out in zip(inputs, outputs):
        ctx.node(op_type, [x, *weights], [out], layer=layer.name, group=int(p.group), **geometry)


def check_convolution(layer: Layer, graph: LayerGraph) -> Optional[str]:
    """Channel axis 1, 1-D to 3-D."""
    p = layer.param.convolution_param
    rank = len(graph.values[layer.bottoms[0]].shape)
    if p.axis not in (1, 1 - rank):
        return f"convolution over axis {p.axis}; only channel axis 1 is lowered"
    if rank - 2 not in (1, 2, 3):
        return "only 1-D, 2-D and 3-D convolutions are lowered"
    return None


@register_lowering("Convolution", check=check_convolution)
def lower_convolution(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Caffe's floor-rounded output size is ONNX Conv's with symmetric pads."""
    _lower_conv_like("Conv", ctx, layer, inputs, outputs)


@register_lowering("Deconvolution", check=check_convolution)
def lower_deconvolution(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Caffe stores deconvolution weights as (C_in, C_out/group, k...), which is ConvTranspose's
    layout, and its output size stride*(in-1) + extent - 2*pad is ConvTranspose's with those pads."""
    _lower_conv_like("ConvTranspose", ctx, layer, inputs, outputs)


@register_lowering("Im2col", check=check_convolution)
def lower_im2col(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """im2col_layer.cpp lays each window out along the channel axis, channel-major then kernel
    offsets in row-major order: (N, C * prod(kernel), out...). That is a grouped convolution
    (one group per input channel) whose kernels are one-hot, so each output is exactly one
    input value (or a zero of the padding). Caffe's Im2col ignores ``group``; so does this."""
    rank = len(ctx.shape(inputs[0])) - 2
    geometry = _conv_geometry(ctx, layer, rank)
    channels, taps = ctx.shape(inputs[0])[1], int(np.prod(geometry["kernel_shape"]))
    one_hot = np.zeros((channels * taps, 1, *geometry["kernel_shape"]), dtype=np.float32)
    one_hot.reshape(channels, taps, taps)[:, np.arange(taps), np.arange(taps)] = 1
    ctx.node("Conv", [inputs[0], ctx.const(one_hot, f"{layer.name}/one_hot")], outputs, layer=layer.name,
             group=int(channels), **geometry)


def _ave_divisor(size: int, out: int, kernel: int, stride: int, pad: int) -> np.ndarray:
    """Caffe's AVE pool_size along one axis: the window clipped to [-pad, size + pad)."""
    starts = np.arange(out) * stride - pad
    return np.minimum(starts + kernel, size + pad) - starts


def emit_pool(ctx: LoweringContext, layer: str, method: str, x: str, out: str,
              kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
              in_hw: Sequence[int], out_hw: Sequence[int]) -> None:
    """2-D MAX or AVE pooling producing exactly Caffe's ``out_hw`` windows.

    End pads are whatever makes ONNX's floor rounding reach Caffe's last window; they may
    exceed Caffe's pad, which is harmless because MAX ignores pads and AVE's sum counts them
    as zeros while the divisor is corrected to Caffe's anyway.
    """
    if any((o - 1) * s - p >= i for i, o, s, p in zip(in_hw, out_hw, stride, pad)):
        raise ctx.error(layer, "the last pooling window starts past the input (stride larger than "
                               "kernel, no padding); Caffe fills it with -FLT_MAX or 0/0")
    end = [max(0, (o - 1) * s + k - i - p) for i, o, k, s, p in zip(in_hw, out_hw, kernel, stride, pad)]
    attrs = dict(kernel_shape=list(kernel), strides=list(stride), pads=list(pad) + end, ceil_mode=0)
    if method == "MAX":
        ctx.node("MaxPool", [x], [out], layer=layer, **attrs)
        return
    divisor = np.outer(*(_ave_divisor(i, o, k, s, p)
                         for i, o, k, s, p in zip(in_hw, out_hw, kernel, stride, pad)))
    area = kernel[0] * kernel[1]
    if np.all(divisor == area):
        ctx.node("AveragePool", [x], [out], layer=layer, count_include_pad=1, **attrs)
        return
    mean = ctx.node("AveragePool", [x], layer=layer, count_include_pad=1, **attrs)[0]
    factor = ctx.const((area / divisor).reshape(1, 1, *divisor.shape), f"{layer}/divisor_fix")
    ctx.node("Mul", [mean, factor], [out], layer=layer)


def _pool_pair(p: Any, single: str, prefix: str) -> list[int]:
    """Pooling's (h, w) pair: ``prefix_h``/``prefix_w`` if given, else ``single`` for both."""
    if p.HasField(f"{prefix}_h") or p.HasField(f"{prefix}_w"):
        return [getattr(p, f"{prefix}_h"), getattr(p, f"{prefix}_w")]
    return [getattr(p, single)] * 2


def check_pooling(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.pooling_param
    if p.pool not in (p.MAX, p.AVE):
        return "stochastic pooling has no TensorRT equivalent"
    if len(layer.tops) > 1:
        return "max pooling with a mask top has no TensorRT equivalent"
    return None


@register_lowering("Pooling", check=check_pooling)
def lower_pooling(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Takes the output size from Caffe's own shape computation rather than re-deriving it."""
    p = layer.param.pooling_param
    method = "MAX" if p.pool == p.MAX else "AVE"
    shape = ctx.shape(inputs[0])
    if len(shape) != 4:
        raise ctx.error(layer.name, "Caffe pools 4-D blobs only")
    if p.global_pooling:
        ctx.node("GlobalMaxPool" if method == "MAX" else "GlobalAveragePool", inputs, outputs,
                 layer=layer.name)
        return
    kernel = _pool_pair(p, "kernel_size", "kernel")
    stride = _pool_pair(p, "stride", "stride")
    pad = _pool_pair(p, "pad", "pad")
    if min(kernel) <= 0:
        raise ctx.error(layer.name, "pooling needs a kernel size")
    emit_pool(ctx, layer.name, method, inputs[0], outputs[0], kernel, stride, pad,
              shape[2:], ctx.shape(outputs[0])[2:])


@register_lowering("InnerProduct")
def lower_inner_product(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Axis 1 becomes Flatten + Gemm (what TensorRT maps onto its fully connected path);
    other axes flatten only the trailing dims and use MatMul, keeping the leading ones."""
    p = layer.param.inner_product_param
    shape = ctx.shape(inputs[0])
    axis = ctx.canonical_axis(layer.name, p.axis, len(shape))
    blobs = ctx.weights(layer.name)
    x = inputs[0]
    if axis == 1:
        if len(shape) > 2:
            x = ctx.node("Flatten", [x], layer=layer.name, axis=1)[0]
        operands = [x, ctx.const(blobs[0], f"{layer.name}/weight")]
        if p.bias_term:
            operands.append(ctx.const(blobs[1], f"{layer.name}/bias"))
        ctx.node("Gemm", operands, outputs, layer=layer.name, transB=0 if p.transpose else 1)
        return
    if len(shape) > axis + 1:
        target = ctx.const(np.array([0] * axis + [-1]), f"{layer.name}/shape")
        x = ctx.node("Reshape", [x, target], layer=layer.name)[0]
    weight = blobs[0] if p.transpose else blobs[0].T
    product = ctx.node("MatMul", [x, ctx.const(np.ascontiguousarray(weight), f"{layer.name}/weight")],
                       None if p.bias_term else outputs, layer=layer.name)[0]
    if p.bias_term:
        ctx.node("Add", [product, ctx.const(blobs[1], f"{layer.name}/bias")], outputs, layer=layer.name)
