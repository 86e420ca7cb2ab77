"""SSD's PriorBox, folded to a constant: its output depends only on shapes and parameters.

``prior_boxes`` reproduces the bundled Caffe's ``PriorBoxLayer::Forward_cpu``
(src/caffe/layers/prior_box_layer.cpp) in numpy with the same arithmetic, bit for bit:
min and max sizes are truncated to int, aspect ratios are float32 (a flipped ratio is
``1./ar`` rounded to float32, and a ratio within 1e-6 of one already listed is dropped),
box sides are ``min_size * sqrt(ar)`` and ``min_size / sqrt(ar)`` in float32 and
``sqrt(min_size * max_size)`` in double, centres ``(w + offset) * step`` in float32, and
each coordinate ``(centre -/+ side / 2.) / image_size`` in double, stored as float32.

The lowering emits that array as an initializer for the static shapes of the graph, which
come from Caffe's own shape probe and so already reflect ``--input-shape``: another input
size gives another constant. The top has batch axis 1 whatever the batch, as Caffe's
(all images of a batch share one set of priors).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..graph.layer_graph import Layer, LayerGraph
from .context import LoweringContext
from .registry import register_lowering

Shape = tuple[int, ...]


def _legacy_hw(shape: Shape) -> tuple[int, int]:
    """Blob::height() and width(): axes 2 and 3, 1 where the blob has fewer axes."""
    padded = tuple(shape) + (1,) * (4 - len(shape))
    return padded[2], padded[3]


def aspect_ratios(param) -> list[np.float32]:
    """Caffe's list: 1 first, then each new ratio (and 1/ratio when flip), duplicates dropped."""
    ratios = [np.float32(1.0)]
    for value in param.aspect_ratio:
        ar = np.float32(value)
        if any(abs(float(ar) - float(known)) < 1e-6 for known in ratios):
            continue
        ratios.append(ar)
        if param.flip:
            ratios.append(np.float32(1.0 / float(ar)))
    return ratios


def _box_sides(param) -> list[tuple[np.float32, np.float32]]:
    """(width, height) of every prior of one cell, in Caffe's order: per min size, the square
    of min_size, the square of sqrt(min_size * max_size), then one box per other ratio."""
    ratios = aspect_ratios(param)
    sides = []
    for s, min_size in enumerate(param.min_size):
        m = int(np.float32(min_size))  # Caffe: int min_size_ = min_sizes_[s]
        sides.append((np.float32(m), np.float32(m)))
        if len(param.max_size):
            side = np.float32(np.sqrt(float(m * int(np.float32(param.max_size[s])))))
            sides.append((side, side))
        for ar in ratios:
            if abs(float(ar) - 1.0) < 1e-6:
                continue
            root = np.sqrt(ar)  # float32 sqrt, as Caffe's sqrt(float)
            sides.append((np.float32(m) * root, np.float32(m) / root))
    return sides


def _image_size(param, image_shape: Optional[Shape]) -> tuple[int, int]:
    """(height, width) of the image: img_h/img_w, else img_size, else the second bottom's."""
    if param.HasField("img_h") or param.HasField("img_w"):
        return int(param.img_h), int(param.img_w)
    if param.HasField("img_size"):
        return int(param.img_size), int(param.img_size)
    assert image_shape is not None, "checked by check_prior_box"
    return _legacy_hw(image_shape)


def _steps(param, layer_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[np.float32, np.float32]:
    """(step_h, step_w): given, or image size / layer size in float32."""
    if param.HasField("step_h") or param.HasField("step_w"):
        step_h, step_w = np.float32(param.step_h), np.float32(param.step_w)
    elif param.HasField("step"):
        step_h = step_w = np.float32(param.step)
    else:
        step_h = step_w = np.float32(0)
    if step_h == 0 or step_w == 0:
        step_h = np.float32(image_hw[0]) / np.float32(layer_hw[0])
        step_w = np.float32(image_hw[1]) / np.float32(layer_hw[1])
    return step_h, step_w


def prior_boxes(param, feature_shape: Shape, image_shape: Optional[Shape]) -> np.ndarray:
    """PriorBox's top for a feature map and an image of the given shapes (N-first; only the
    spatial axes matter): float32, shape (1, 2, H * W * priors * 4). Row 0 holds the boxes
    (xmin, ymin, xmax, ymax per prior, normalised to the image, clipped to [0, 1] when
    ``clip``), row 1 the four variances of each prior."""
    layer_h, layer_w = _legacy_hw(feature_shape)
    image_h, image_w = _image_size(param, image_shape)
    step_h, step_w = _steps(param, (layer_h, layer_w), (image_h, image_w))
    offset = np.float32(param.offset)
    centre_x = ((np.arange(layer_w, dtype=np.float32) + offset) * step_w).astype(np.float64)
    centre_y = ((np.arange(layer_h, dtype=np.float32) + offset) * step_h).astype(np.float64)
    sides = np.array(_box_sides(param), dtype=np.float64)  # (priors, 2): float32 values
    half_w, half_h = sides[:, 0] / 2.0, sides[:, 1] / 2.0
    cx = centre_x[None, :, None]  # (1, W, 1) against (H, 1, 1) and (priors,)
    cy = centre_y[:, None, None]
    shape = (layer_h, layer_w, len(sides))
    boxes = np.stack([np.broadcast_to((cx - half_w) / image_w, shape),
                      np.broadcast_to((cy - half_h) / image_h, shape),
                      np.broadcast_to((cx + half_w) / image_w, shape),
                      np.broadcast_to((cy + half_h) / image_h, shape)], axis=-1).astype(np.float32).ravel()
    if param.clip:
        boxes = np.minimum(np.maximum(boxes, np.float32(0)), np.float32(1))
    variances = [np.float32(v) for v in param.variance] or [np.float32(0.1)]
    variance = np.tile(np.array(variances, dtype=np.float32), boxes.size // len(variances))
    return np.stack([boxes, variance])[None]


def check_prior_box(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.prior_box_param
    sized = p.HasField("img_h") or p.HasField("img_w") or p.HasField("img_size")
    if not sized and len(layer.bottoms) < 2:
        return "without img_size or img_h/img_w PriorBox reads the image size from a second bottom, which is missing"
    return None


@register_lowering("PriorBox", check=check_prior_box)
def lower_prior_box(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """The priors for the graph's static shapes, as one initializer (the bottoms are not read)."""
    image = ctx.shape(inputs[1]) if len(inputs) > 1 else None
    priors = prior_boxes(layer.param.prior_box_param, ctx.shape(inputs[0]), image)
    ctx.node("Identity", [ctx.const(priors, f"{layer.name}/priors")], outputs, layer=layer.name)
    ctx.declare_dims(outputs[0], priors.shape)
