"""Layers that resample or re-grid the spatial axes: Upsample, Resize, BilinearInterpolate,
PixelShuffle, Pad and SPP.

The two bilinear layers of this Caffe map output to input coordinates in their own ways
(Resize: ``i * in/out`` with the neighbour past the edge dropped, not clamped;
BilinearInterpolate: half-pixel or align-corners, clamped), which ONNX Resize's coordinate
modes only approximate. Both are therefore lowered as a separable interpolation whose source
rows/columns and weights are computed here, in float32 as Caffe computes them, from the
static spatial sizes: per axis, a sum over two taps of Gather(x, rows) * weights. Only the
batch axis is left free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..graph.layer_graph import Layer, LayerGraph
from .context import LoweringContext
from .conv_pool import emit_pool
from .registry import register_lowering
from .tensor_ops import emit_reshape


@dataclass(frozen=True)
class Tap:
    """One term of a 1-D interpolation: output position i reads source ``index[i]`` with
    weight ``weight[i]`` (both shaped (out,))."""
    index: np.ndarray
    weight: np.ndarray


def _emit_axis(ctx: LoweringContext, layer: str, x: str, axis: int, rank: int, taps: Sequence[Tap],
               size: int, out: Optional[str]) -> str:
    """sum over taps of Gather(x, tap.index, axis) * tap.weight, along ``axis`` of a ``rank``-D
    tensor whose axis has ``size`` entries; taps of weight 0 everywhere are skipped, and an
    identity mapping emits nothing (unless ``out`` must be written)."""
    taps = [t for t in taps if np.any(t.weight != 0)]
    if (len(taps) == 1 and np.all(taps[0].weight == 1) and len(taps[0].index) == size
            and np.array_equal(taps[0].index, np.arange(size))):
        return ctx.node("Identity", [x], [out], layer=layer)[0] if out else x
    broadcast = (-1,) + (1,) * (rank - axis - 1)
    terms = []
    for tap in taps:
        rows = ctx.node("Gather", [x, ctx.const(tap.index.astype(np.int64), f"{layer}/rows")], layer=layer,
                        axis=axis)[0]
        if np.all(tap.weight == 1):
            terms.append(rows)
        else:
            weight = ctx.const(tap.weight.astype(np.float32).reshape(broadcast), f"{layer}/weights")
            terms.append(ctx.node("Mul", [rows, weight], layer=layer)[0])
    if len(terms) == 1:
        return ctx.node("Identity", terms, [out], layer=layer)[0] if out else terms[0]
    return ctx.node("Add", terms, [out] if out else None, layer=layer)[0]


def emit_separable(ctx: LoweringContext, layer: str, x: str, out: str,
                   taps_h: Sequence[Tap], taps_w: Sequence[Tap]) -> None:
    """Interpolate a (N, C, H, W) tensor along H with ``taps_h`` then along W with ``taps_w``."""
    h, w = ctx.shape(x)[2:]
    rows = _emit_axis(ctx, layer, x, 2, 4, taps_h, h, None)
    _emit_axis(ctx, layer, rows, 3, 4, taps_w, w, out)


def resize_taps(src: int, dst: int) -> list[Tap]:
    """Caffe's Resize (util/util_img.cpp, BiLinearResizeMat_cpu) along one axis: position i
    maps to f = i * (src / dst) in float32; it reads floor(f) with weight |1 - frac| and the
    next source position with weight |frac| only if that exists (no clamping at the far edge)."""
    scale = np.float32(src) / np.float32(dst)
    f = np.arange(dst, dtype=np.float32) * scale
    first = np.floor(f).astype(np.int64)
    frac = f - first.astype(np.float32)
    has_next = first + 1 < src
    return [Tap(first, np.abs(np.float32(1) - frac)),
            Tap(np.where(has_next, first + 1, first), np.where(has_next, np.abs(frac), np.float32(0)))]


def bilinear_interpolate_taps(src: int, dst: int, align_corners: bool) -> list[Tap]:
    """Caffe's BilinearInterpolate (bilinear_interpolate_layer.cpp) along one axis: half-pixel
    (src/dst * (i + 0.5) - 0.5, the ratio in float32, the rest in double, stored as float) or
    align-corners ((src-1)/(dst-1) * i), clamped to [0, src-1]; it reads rows h0 and h0+1 with
    h0 = floor clamped to [0, src-2], weights (h0+1 - h) and (h - h0). A 1-long source gives
    h0 = -1 with weight 0, which reads row 0 here."""
    i = np.arange(dst)
    if align_corners:
        f = (np.float32(src - 1) / np.float32(dst - 1)) * i.astype(np.float32)
    else:
        ratio = np.float64(np.float32(src) / np.float32(dst))
        f = (ratio * (i + 0.5) - 0.5).astype(np.float32)
    f = np.clip(f, np.float32(0), np.float32(src - 1)).astype(np.float32)
    first = np.minimum(np.maximum(np.floor(f).astype(np.int64), 0), src - 2)
    low_weight = (first + 1).astype(np.float32) - f
    high_weight = f - first.astype(np.float32)
    return [Tap(np.maximum(first, 0), low_weight), Tap(first + 1, high_weight)]


def _rank(layer: Layer, graph: LayerGraph) -> int:
    return len(graph.values[layer.bottoms[0]].shape)


def check_upsample(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.upsample_param
    if p.scale < 1:
        return f"scale {p.scale} is not a positive integer"
    if p.dims_num not in (3, 4) or _rank(layer, graph) != p.dims_num:
        return f"dims_num {p.dims_num} with a {_rank(layer, graph)}-D input is not what Caffe's Upsample computes"
    return None


@register_lowering("Upsample", check=check_upsample)
def lower_upsample(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """upsample_layer.cpp: out[h, w] = in[h / scale, w / scale] (integer division) over the last
    two axes (dims_num 4) or the last one (dims_num 3): ONNX Resize, nearest, asymmetric, floor."""
    p = layer.param.upsample_param
    spatial = p.dims_num - 2
    scales = np.array([1.0] * (p.dims_num - spatial) + [float(p.scale)] * spatial, dtype=np.float32)
    ctx.node("Resize", [inputs[0], "", ctx.const(scales, f"{layer.name}/scales")], outputs, layer=layer.name,
             mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def _four_d(layer: Layer, graph: LayerGraph) -> Optional[str]:
    return None if _rank(layer, graph) == 4 else f"{layer.type} is lowered for 4-D (N, C, H, W) blobs only"


@register_lowering("Resize", check=_four_d)
def lower_resize(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Output size as Caffe computed it (fixed, or scaled for is_pyramid_test); see ``resize_taps``."""
    (h, w), (out_h, out_w) = ctx.shape(inputs[0])[2:], ctx.shape(outputs[0])[2:]
    emit_separable(ctx, layer.name, inputs[0], outputs[0], resize_taps(h, out_h), resize_taps(w, out_w))


def check_bilinear_interpolate(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.bilinear_interpolate_param
    sized = p.HasField("dst_h") or p.HasField("dst_w")
    if sized == p.HasField("scale_factor"):
        return "give either dst_h/dst_w or scale_factor (Caffe leaves the output size unset otherwise)"
    if _rank(layer, graph) != 4:
        return _four_d(layer, graph)
    if p.align_corners and 1 in graph.values[layer.tops[0]].shape[2:]:
        return "align_corners with an output side of 1 divides by zero in Caffe"
    return None


@register_lowering("BilinearInterpolate", check=check_bilinear_interpolate)
def lower_bilinear_interpolate(ctx: LoweringContext, layer: Layer, inputs: list[str],
                               outputs: list[str]) -> None:
    """See ``bilinear_interpolate_taps``; the output size is the one Caffe computed."""
    align = layer.param.bilinear_interpolate_param.align_corners
    (h, w), (out_h, out_w) = ctx.shape(inputs[0])[2:], ctx.shape(outputs[0])[2:]
    emit_separable(ctx, layer.name, inputs[0], outputs[0], bilinear_interpolate_taps(h, out_h, align),
                   bilinear_interpolate_taps(w, out_w, align))


def check_pixel_shuffle(layer: Layer, graph: LayerGraph) -> Optional[str]:
    if layer.param.pixelshuffle_param.upscale_factor < 1:
        return "upscale_factor must be positive"
    return _four_d(layer, graph)


@register_lowering("PixelShuffle", check=check_pixel_shuffle)
def lower_pixel_shuffle(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """pixelshuffle_layer.cpp: out[n, p, i*r + sh, j*r + sw] = in[n, p*r*r + sh*r + sw, i, j], which
    is DepthToSpace in CRD order. Caffe only requires C % r == 0 and ignores the channels past
    C_out * r * r; those are sliced off first."""
    r = int(layer.param.pixelshuffle_param.upscale_factor)
    channels, used = ctx.shape(inputs[0])[1], ctx.shape(outputs[0])[1] * r * r
    x = inputs[0]
    if used != channels:
        x = ctx.node("Slice", [x, ctx.const(np.array([0]), f"{layer.name}/start"),
                               ctx.const(np.array([used]), f"{layer.name}/end"),
                               ctx.const(np.array([1]), f"{layer.name}/axis")], layer=layer.name)[0]
    ctx.node("DepthToSpace", [x], outputs, layer=layer.name, blocksize=r, mode="CRD")


def _pads(layer: Layer) -> tuple[int, int, int, int]:
    p = layer.param.pad_param
    return int(p.pad_u), int(p.pad_d), int(p.pad_l), int(p.pad_r)


def check_pad(layer: Layer, graph: LayerGraph) -> Optional[str]:
    """Caffe's Pad forward indexes N, C, H, W (a 2-D or 3-D blob is read as N x C x 1 x 1 or
    N x C x H x 1 while Reshape pads other axes), crops only when all four pads are negative,
    and reflects correctly only for pads smaller than the side."""
    if _rank(layer, graph) != 4:
        return "Pad is lowered for 4-D blobs only (Caffe's forward is inconsistent with its shape otherwise)"
    pads = _pads(layer)
    if any(v < 0 for v in pads) and not all(v < 0 for v in pads):
        return "negative pads crop only when all four are negative; mixed signs write outside the blob in Caffe"
    p = layer.param.pad_param
    if p.pad_type == p.REFLECT and min(pads) >= 0:
        h, w = graph.values[layer.bottoms[0]].shape[2:]
        if max(pads[:2]) >= h or max(pads[2:]) >= w:
            return "REFLECT pads must be smaller than the padded side"
    return None


@register_lowering("Pad", check=check_pad)
def lower_pad(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """pad_layer.cpp: pad_u/pad_d on H, pad_l/pad_r on W; CONSTANT (pad_value), REPLICATE (ONNX
    edge) or REFLECT (mirror without repeating the edge, ONNX reflect). All-negative pads crop
    whatever the type (ONNX Pad with negative pads)."""
    p = layer.param.pad_param
    u, d, left, right = _pads(layer)
    pads = ctx.const(np.array([0, 0, u, left, 0, 0, d, right]), f"{layer.name}/pads")
    if min(u, d, left, right) < 0 or p.pad_type == p.CONSTANT:
        value = ctx.const(np.float32(p.pad_value), f"{layer.name}/value")
        ctx.node("Pad", [inputs[0], pads, value], outputs, layer=layer.name, mode="constant")
        return
    mode = "edge" if p.pad_type == p.REPLICATE else "reflect"
    ctx.node("Pad", [inputs[0], pads], outputs, layer=layer.name, mode=mode)


@dataclass(frozen=True)
class PyramidLevel:
    """One SPP level's pooling: kernel, stride, pad and Caffe's output size, each as (h, w)."""
    kernel: tuple[int, int]
    pad: tuple[int, int]
    out: tuple[int, int]


def spp_level(level: int, height: int, width: int) -> PyramidLevel:
    """spp_layer.cpp GetPoolingParam: 2^level bins, kernel = ceil(side / bins) (also the stride),
    pad = (kernel * bins - side + 1) / 2; output size as pooling_layer.cpp computes it (ceil
    rounding, dropping a last window that starts in the padding)."""
    bins = 2 ** level
    kernel = tuple(math.ceil(side / bins) for side in (height, width))
    pad = tuple((k * bins - side + 1) // 2 for k, side in zip(kernel, (height, width)))
    out = [int(math.ceil(np.float32(side + 2 * p - k) / np.float32(k))) + 1
           for side, k, p in zip((height, width), kernel, pad)]
    if any(pad):
        out = [o - 1 if (o - 1) * k >= side + p else o for o, k, p, side in zip(out, kernel, pad, (height, width))]
    return PyramidLevel(kernel, pad, (out[0], out[1]))  # type: ignore[arg-type]


def check_spp(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.spp_param
    if p.pool == p.STOCHASTIC:
        return "stochastic pooling has no TensorRT equivalent"
    if p.pyramid_height < 1:
        return "pyramid_height must be at least 1"
    return _four_d(layer, graph)


@register_lowering("SPP", check=check_spp)
def lower_spp(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Spatial pyramid pooling: one Caffe-exact pooling per level (``emit_pool``), each flattened
    to (N, C*h*w) and concatenated in level order; a one-level pyramid is the bare pooling output."""
    p = layer.param.spp_param
    method = "MAX" if p.pool == p.MAX else "AVE"
    in_hw = ctx.shape(inputs[0])[2:]
    levels = [spp_level(i, *in_hw) for i in range(p.pyramid_height)]
    if len(levels) == 1:
        level = levels[0]
        emit_pool(ctx, layer.name, method, inputs[0], outputs[0], level.kernel, level.kernel, level.pad,
                  in_hw, level.out)
        return
    channels = ctx.shape(inputs[0])[1]
    if sum(channels * lv.out[0] * lv.out[1] for lv in levels) != ctx.shape(outputs[0])[1]:
        raise ctx.error(layer.name, "the pyramid's pooled sizes do not add up to Caffe's output size")
    flat = []
    for i, level in enumerate(levels):
        pooled = ctx.fresh(f"{layer.name}/level{i}")
        emit_pool(ctx, layer.name, method, inputs[0], pooled, level.kernel, level.kernel, level.pad,
                  in_hw, level.out)
        flat.append(emit_reshape(ctx, layer.name, pooled, [0, -1]))
    ctx.node("Concat", flat, outputs, layer=layer.name, axis=1)
