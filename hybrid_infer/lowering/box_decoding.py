"""SSD box decoding (``DecodeBBox`` of the bundled Caffe's src/caffe/util/bbox_util.cpp) as
ONNX element-wise nodes, step for step in float32 as Caffe computes it.

Caffe decodes every location prediction against its prior box and variances:

- CORNER: ``prior + variance * loc`` per coordinate;
- CENTER_SIZE: centre ``variance * loc * prior_size + prior_centre``, size
  ``exp(variance * loc) * prior_size``, corners ``centre -/+ size / 2``;
- CORNER_SIZE: ``prior + variance * loc * prior_size``;

with the variances left out when ``variance_encoded_in_target``. DetectionOutput calls it
with ``clip_bbox = false``, so decoded boxes are not clipped to the image.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from .emitter import Emitter

CORNER, CENTER_SIZE, CORNER_SIZE = 1, 2, 3  # PriorBoxParameter.CodeType
CODE_TYPES = {CORNER: "CORNER", CENTER_SIZE: "CENTER_SIZE", CORNER_SIZE: "CORNER_SIZE"}


@dataclass(frozen=True)
class Boxes:
    """Four coordinate tensors of the same shape: xmin, ymin, xmax, ymax."""
    xmin: str
    ymin: str
    xmax: str
    ymax: str

    def stacked(self, e: Emitter, axis: int) -> str:
        return e("Concat", self.xmin, self.ymin, self.xmax, self.ymax, axis=axis)


def decode_boxes(e: Emitter, loc: Boxes, prior: Boxes, variance: Boxes, code_type: int,
                 variance_encoded_in_target: bool) -> Boxes:
    """Decoded boxes; ``loc`` broadcasts against ``prior`` and ``variance`` (per prior).

    The order of the float32 operations is Caffe's, e.g. CENTER_SIZE's centre is
    ``(variance * loc) * prior_width + prior_centre_x``.
    """
    def scaled(value: str, var: str) -> str:
        return value if variance_encoded_in_target else e("Mul", var, value)

    if code_type == CORNER:
        return Boxes(*(e("Add", p, scaled(l, v)) for p, l, v in zip(
            (prior.xmin, prior.ymin, prior.xmax, prior.ymax), (loc.xmin, loc.ymin, loc.xmax, loc.ymax),
            (variance.xmin, variance.ymin, variance.xmax, variance.ymax))))
    width = e("Sub", prior.xmax, prior.xmin)
    height = e("Sub", prior.ymax, prior.ymin)
    if code_type == CORNER_SIZE:
        return Boxes(e("Add", prior.xmin, e("Mul", scaled(loc.xmin, variance.xmin), width)),
                     e("Add", prior.ymin, e("Mul", scaled(loc.ymin, variance.ymin), height)),
                     e("Add", prior.xmax, e("Mul", scaled(loc.xmax, variance.xmax), width)),
                     e("Add", prior.ymax, e("Mul", scaled(loc.ymax, variance.ymax), height)))
    assert code_type == CENTER_SIZE
    half = e.const(np.float32(0.5), "half")
    centre_x = e("Add", e("Mul", scaled(loc.xmin, variance.xmin), width),
                 e("Mul", e("Add", prior.xmin, prior.xmax), half))
    centre_y = e("Add", e("Mul", scaled(loc.ymin, variance.ymin), height),
                 e("Mul", e("Add", prior.ymin, prior.ymax), half))
    half_w = e("Mul", e("Mul", e("Exp", scaled(loc.xmax, variance.xmax)), width), half)
    half_h = e("Mul", e("Mul", e("Exp", scaled(loc.ymax, variance.ymax)), height), half)
    return Boxes(e("Sub", centre_x, half_w), e("Sub", centre_y, half_h),
                 e("Add", centre_x, half_w), e("Add", centre_y, half_h))
