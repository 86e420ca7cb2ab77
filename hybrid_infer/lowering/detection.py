"""SSD's DetectionOutput in ONNX (opset 13+): decoding, per-class NMS, keep_top_k, Caffe's rows.

Semantics are those of the bundled Caffe's ``DetectionOutputLayer::Forward_cpu``
(src/caffe/layers/detection_output_layer.cpp) and ``ApplyNMSFast`` / ``DecodeBBox`` /
``JaccardOverlap`` (src/caffe/util/bbox_util.cpp). Per image and per class other than
``background_label_id``:

1. candidates: scores strictly above ``confidence_threshold``, sorted by descending score
   (a stable sort: equal scores keep prior order), cut to ``nms_param.top_k``;
2. greedy NMS in that order: a candidate is kept unless its IoU with a kept box is above
   ``nms_threshold`` (Caffe's IoU for normalised boxes, no +1; 0 for boxes that do not
   overlap, including boxes with xmax < xmin or ymax < ymin). With ``eta`` < 1 the
   threshold is multiplied by eta after each kept box while it is above 0.5;
3. ``keep_top_k``: when the image has more detections than that, the highest-scoring
   ``keep_top_k`` over all classes;
4. rows ``[image, label, score, xmin, ymin, xmax, ymax]`` of all images in one blob
   ``[1, 1, N, 7]``: images in order, labels ascending, then by descending score; the boxes
   are the decoded ones, not clipped (Caffe passes clip_bbox = false). When no image has a
   detection, one row ``[i, -1, -1, -1, -1, -1, -1]`` per image. Without ``nms_param``
   every prior of every class is a detection (no threshold, no NMS).

In ONNX, with nodes that TensorRT-RTX builds (it has neither NonMaxSuppression nor
NonZero): TopK picks each class's candidates (ONNX breaks ties by the lower index, as
Caffe's stable sort does); NMS is the pairwise IoU of the candidates of each class
([K, K] per image and class) and a Loop that repeats ``kept = valid and not any(earlier
kept box overlaps too much)`` until nothing changes, which is exactly Caffe's greedy
result (see ``_nms_kept``); a second TopK applies keep_top_k; a cumulative sum, a
scatter and a Slice compact the rows. Every shape is static except the top's row count
N, which is data-dependent (declared ``[1, 1, "detections", 7]``).

Refused (the layer then runs in Caffe): ``visualize``; ``share_location`` with
``background_label_id: -1`` (this Caffe aborts on it); more than ``MAX_OVERLAPS`` IoU
pairs per image (classes x top_k^2: set nms_param.top_k). Ties that engines may order
differently from Caffe: equal scores across classes where keep_top_k cuts or orders
more than 16 detections (Caffe's std::sort leaves the order of equal elements
unspecified there), and TopK ties on TensorRT, whose tie rule is not documented.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from onnx import TensorProto

from ..graph.layer_graph import Layer, LayerGraph
from .box_decoding import CODE_TYPES, Boxes, decode_boxes
from .context import LoweringContext
from .emitter import Emitter, LoopBody
from .registry import register_lowering

FLT_MAX = np.float32(np.finfo(np.float32).max)
NEG_INF = np.float32(-np.inf)
#: The declared row count of DetectionOutput's top: known only after the run.
DETECTIONS = "detections"
#: IoU pairs per image (classes x per_class^2) above which the lowering refuses: each
#: pairwise tensor of NMS then takes 64 MiB per image.
MAX_OVERLAPS = 1 << 24


@dataclass(frozen=True)
class DetectionPlan:
    """The static facts of one DetectionOutput layer, from its parameters and Caffe's shapes."""
    num_priors: int
    num_classes: int
    share_location: bool
    #: Classes searched (all but the background), ascending: the row order of labels.
    classes: tuple[int, ...]
    #: Candidates per class: top_k (or every prior), at most the number of priors.
    per_class: int
    nms: bool
    nms_threshold: np.float32
    eta: np.float32
    confidence_threshold: np.float32
    #: keep_top_k, or None where it can never cut (-1, or at least every candidate).
    keep_top_k: Optional[int]

    @property
    def loc_classes(self) -> int:
        return 1 if self.share_location else self.num_classes

    @property
    def detections_per_image(self) -> int:
        return len(self.classes) * self.per_class

    @property
    def finds_nothing(self) -> bool:
        return self.detections_per_image == 0 or self.keep_top_k == 0

    @property
    def overlaps_per_image(self) -> int:
        return len(self.classes) * self.per_class ** 2 if self.nms else 0

    @staticmethod
    def of(layer: Layer, graph: LayerGraph) -> "DetectionPlan":
        p = layer.param.detection_output_param
        num_priors = graph.values[layer.bottoms[2]].shape[2] // 4
        classes = tuple(c for c in range(p.num_classes) if c != p.background_label_id)
        nms = p.HasField("nms_param")
        top_k = p.nms_param.top_k if nms and p.nms_param.HasField("top_k") else -1
        per_class = min(top_k, num_priors) if top_k > -1 else num_priors
        total = len(classes) * per_class
        keep = p.keep_top_k if -1 < p.keep_top_k < total else None
        threshold = np.float32(p.confidence_threshold) if p.HasField("confidence_threshold") else -FLT_MAX
        return DetectionPlan(num_priors, p.num_classes, p.share_location, classes, per_class, nms,
                             np.float32(p.nms_param.nms_threshold), np.float32(p.nms_param.eta), threshold, keep)


def check_detection_output(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.detection_output_param
    if len(layer.bottoms) < 3 or len(graph.values[layer.bottoms[2]].shape) < 3:
        return "needs location, confidence and a prior blob of at least 3 axes"
    if p.visualize:
        return "visualize draws the detections with OpenCV inside Caffe"
    if p.share_location and p.background_label_id == -1:
        return "share_location with background_label_id -1 makes this Caffe abort (no location predictions)"
    if p.code_type not in CODE_TYPES:
        return f"unknown code_type {p.code_type}"
    plan = DetectionPlan.of(layer, graph)
    if plan.overlaps_per_image > MAX_OVERLAPS:
        return (f"NMS would compare {plan.overlaps_per_image} box pairs per image ({len(plan.classes)} classes x "
                f"{plan.per_class}^2 candidates), above {MAX_OVERLAPS}; set a smaller nms_param.top_k")
    return None


def _batch(e: Emitter, x: str) -> tuple[str, str]:
    """The batch size of ``x`` as a 1-D int64 tensor [B] and as a scalar."""
    size = e("Slice", e("Shape", x), e.const(np.array([0]), "zero"), e.const(np.array([1]), "one"))
    return size, e("Squeeze", size, e.const(np.array([0]), "axis0"))


def _priors(e: Emitter, prior: str, num_priors: int) -> tuple[Boxes, Boxes]:
    """Prior boxes and variances, each coordinate shaped [P, 1]: the first 4P values of the
    prior blob are the boxes, the next 4P the variances (Caffe's GetPriorBBoxes)."""
    flat = e("Reshape", prior, e.const(np.array([-1]), "flat"))
    shape = e.const(np.array([num_priors, 4]), "prior_shape")
    parts = []
    for start in (0, 4 * num_priors):
        part = e("Slice", flat, e.const(np.array([start]), "start"), e.const(np.array([start + 4 * num_priors]), "end"))
        parts.append(Boxes(*e.columns(e("Reshape", part, shape), axis=1)))
    return parts[0], parts[1]


def _decoded(e: Emitter, loc: str, prior: str, plan: DetectionPlan, layer: Layer) -> str:
    """All decoded boxes as rows [B * loc_classes * P, 4], (image, loc class, prior)-major."""
    p = layer.param.detection_output_param
    shaped = e("Reshape", loc, e.const(np.array([0, plan.num_priors, plan.loc_classes, 4]), "loc_shape"))
    by_class = e("Transpose", shaped, perm=[0, 2, 1, 3])
    prior_boxes, variances = _priors(e, prior, plan.num_priors)
    boxes = decode_boxes(e, Boxes(*e.columns(by_class, axis=3)), prior_boxes, variances, p.code_type,
                         p.variance_encoded_in_target)
    return e("Reshape", boxes.stacked(e, axis=3), e.const(np.array([-1, 4]), "rows4"))


def _scores(e: Emitter, conf: str, plan: DetectionPlan) -> str:
    """Confidences [B, classes searched, P]."""
    shaped = e("Reshape", conf, e.const(np.array([0, plan.num_priors, plan.num_classes]), "conf_shape"))
    by_class = e("Transpose", shaped, perm=[0, 2, 1])
    if len(plan.classes) == plan.num_classes:
        return by_class
    return e("Gather", by_class, e.const(np.array(plan.classes), "classes"), axis=1)


def _candidates(e: Emitter, scores: str, plan: DetectionPlan) -> tuple[str, str, Optional[str]]:
    """Each class's candidates [B, classes, per_class]: scores, prior indices, and validity
    (None: all valid). Without NMS every prior is one, in prior order unless keep_top_k
    will sort them."""
    k = e.const(np.array([plan.per_class]), "top_k")
    if not plan.nms:
        if plan.keep_top_k is None:
            return scores, e.const(np.arange(plan.num_priors).reshape(1, 1, -1), "prior_index"), None
        values, indices = e.many("TopK", [scores, k], 2, axis=2, largest=1, sorted=1)
        return values, indices, None
    threshold = e.const(plan.confidence_threshold, "confidence_threshold")
    above = e("Where", e("Greater", scores, threshold), scores, e.const(NEG_INF, "neg_inf"))
    values, indices = e.many("TopK", [above, k], 2, axis=2, largest=1, sorted=1)
    return values, indices, e("Greater", values, threshold)


def _candidate_boxes(e: Emitter, decoded: str, indices: str, batch: str, plan: DetectionPlan) -> str:
    """The decoded boxes of the candidates, [B, classes, per_class, 4]."""
    images = e("Range", e.const(np.int64(0), "i0"), batch, e.const(np.int64(1), "i1"))
    first_row = e("Mul", e("Unsqueeze", images, e.const(np.array([1, 2]), "axes12")),
                  e.const(np.int64(plan.loc_classes), "loc_classes"))
    loc_class = np.array(plan.classes if not plan.share_location else [0] * len(plan.classes))
    rows = e("Add", e("Mul", e("Add", first_row, e.const(loc_class.reshape(1, -1, 1), "loc_class")),
                      e.const(np.int64(plan.num_priors), "priors")), indices)
    return e("Gather", decoded, rows, axis=0)


def _overlaps(e: Emitter, boxes: str, plan: DetectionPlan) -> tuple[str, str]:
    """For each (image, class): which candidate pairs overlap at all, and their IoU, both
    [N, K, K] with N = B * classes, K = per_class. Caffe's JaccardOverlap for normalised
    boxes: intersection sides min(xmax) - max(xmin) must both be positive, then
    intersection / (size_i + size_j - intersection), sizes (xmax - xmin) * (ymax - ymin)."""
    k = plan.per_class
    x1, y1, x2, y2 = e.columns(e("Reshape", boxes, e.const(np.array([-1, k, 4]), "nms_boxes")), axis=2)
    across = lambda t: e("Transpose", t, perm=[0, 2, 1])  # [N, K, 1] -> [N, 1, K]
    width = e("Sub", e("Min", x2, across(x2)), e("Max", x1, across(x1)))
    height = e("Sub", e("Min", y2, across(y2)), e("Max", y1, across(y1)))
    zero = e.const(np.float32(0), "zero")
    overlap = e("And", e("Greater", width, zero), e("Greater", height, zero))
    inter = e("Mul", width, height)
    size = e("Mul", e("Sub", x2, x1), e("Sub", y2, y1))
    iou = e("Div", inter, e("Sub", e("Add", size, across(size)), inter))
    return overlap, iou


def adaptive_thresholds(nms_threshold: np.float32, eta: np.float32, count: int) -> np.ndarray:
    """The NMS threshold Caffe's ApplyNMSFast uses after m kept boxes, m = 0 .. count - 1:
    multiplied by eta (in float32) after each kept box while it is above 0.5."""
    values = [np.float32(nms_threshold)]
    for _ in range(count - 1):
        last = values[-1]
        values.append(np.float32(last * eta) if eta < 1 and last > 0.5 else last)
    return np.array(values, dtype=np.float32)


def _nms_kept(e: Emitter, boxes: str, valid: str, plan: DetectionPlan) -> str:
    """Which candidates greedy NMS keeps, [B, classes, per_class] (bool).

    Candidate i is kept when valid and no kept j < i overlaps it by more than the threshold
    (``not iou <= threshold``, as Caffe tests it). That defines each position from the
    ones before it, so iterating ``kept = valid and not suppressed(kept)`` from ``valid``
    settles on Caffe's greedy result, position by position; an ONNX Loop repeats it until
    nothing changes (usually two or three rounds, at most per_class + 1).
    """
    k = plan.per_class
    overlap, iou = _overlaps(e, boxes, plan)
    earlier = e.const(np.tril(np.ones((k, k), dtype=bool), -1)[None], "earlier")  # j < i
    candidates_valid = e("Reshape", valid, e.const(np.array([-1, k]), "nms_valid"))
    pairs = e("And", overlap, earlier)
    body = LoopBody(e.ctx, e.layer)
    iteration = body.value("iteration", TensorProto.INT64, [])
    again = body.value("again", TensorProto.BOOL, [])
    kept_in = body.value("kept", TensorProto.BOOL, None)
    kept_column = body("Unsqueeze", body("Cast", kept_in.name, to=TensorProto.FLOAT), e.const(np.array([2]), "axis2"))
    thresholds = adaptive_thresholds(plan.nms_threshold, plan.eta, k)
    if np.all(thresholds == thresholds[0]):
        suppressing = e("Cast", e("And", pairs, e("Not", e("LessOrEqual", iou, e.const(thresholds[0], "nms_threshold")))),
                        to=TensorProto.FLOAT)
    else:  # the threshold for candidate i depends on how many were kept before it
        before = body("MatMul", e.const(np.tril(np.ones((k, k), np.float32), -1)[None], "count_before"), kept_column)
        threshold = body("Gather", e.const(thresholds, "adaptive_thresholds"), body("Cast", before, to=TensorProto.INT64))
        suppressing = body("Cast", body("And", pairs, body("Not", body("LessOrEqual", iou, threshold))),
                           to=TensorProto.FLOAT)
    suppressed = body("Greater", body("Squeeze", body("MatMul", suppressing, kept_column), e.const(np.array([2]), "axis2")),
                      e.const(np.float32(0.5), "half_mark"))
    kept_out = body("And", candidates_valid, body("Not", suppressed))
    changed = body("Greater", body("ReduceMax", body("Cast", body("Xor", kept_out, kept_in.name), to=TensorProto.FLOAT),
                                   keepdims=0), e.const(np.float32(0.5), "half_mark"))
    kept = e("Loop", e.const(np.int64(k + 1), "rounds"), e.const(np.bool_(True), "start"), candidates_valid,
             body=body.graph([iteration, again, kept_in], [(changed, TensorProto.BOOL), (kept_out, TensorProto.BOOL)]))
    return e("Reshape", kept, e.const(np.array([-1, len(plan.classes), k]), "kept_shape"))


def _keep_top_k(e: Emitter, values: str, kept: Optional[str], plan: DetectionPlan) -> Optional[str]:
    """Per image, the detections that survive keep_top_k, flattened [B, classes * per_class]
    (bool; None: all)."""
    total = e.const(np.array([-1, plan.detections_per_image]), "per_image")
    flat_kept = e("Reshape", kept, total) if kept is not None else None
    if plan.keep_top_k is None:
        return flat_kept
    scores = e("Reshape", values, total)
    if flat_kept is not None:
        scores = e("Where", flat_kept, scores, e.const(NEG_INF, "neg_inf"))
    _, best = e.many("TopK", [scores, e.const(np.array([plan.keep_top_k]), "keep_top_k")], 2,
                     axis=1, largest=1, sorted=1)
    chosen = e("Greater", e("ScatterElements", e.fill(scores, 0), best, e.fill(best, 1), axis=1),
               e.const(np.float32(0.5), "half_mark"))
    return chosen if flat_kept is None else e("And", chosen, flat_kept)


def _placeholders(e: Emitter, images: str, batch: str) -> str:
    """Caffe's rows when nothing is detected: [i, -1, -1, -1, -1, -1, -1] for each image i, [B, 7]."""
    minus_ones = e("Expand", e.const(np.full((1, 6), -1, np.float32), "minus_ones"),
                   e("Concat", batch, e.const(np.array([6]), "six"), axis=0))
    return e("Concat", e("Unsqueeze", images, e.const(np.array([1]), "axis1")), minus_ones, axis=1)


def _compact(e: Emitter, rows: str, keep: str) -> str:
    """The rows [R, 7] where ``keep`` [R] is true, in order: [M, 7] with M data-dependent.

    Without NonZero (TensorRT-RTX has none): a stable partition puts kept rows first (row r
    goes to position cumsum(keep)[r] - 1, the others after all kept ones), ScatterElements
    inverts that permutation, and a Slice of length sum(keep) gathers the kept rows.
    """
    flags = e("Cast", keep, to=TensorProto.INT64)
    axis = e.const(np.int64(0), "axis0")
    one = e.const(np.array([1]), "one")
    count = e("ReduceSum", flags, keepdims=1)
    position = e("Where", keep, e("Sub", e("CumSum", flags, axis), one),
                 e("Sub", e("Add", count, e("CumSum", e("Sub", one, flags), axis)), one))
    order = e("Range", e.const(np.int64(0), "i0"), e("Squeeze", e("Shape", flags), e.const(np.array([0]), "axis0v")),
              e.const(np.int64(1), "i1"))
    source = e("ScatterElements", order, position, order, axis=0)
    return e("Gather", rows, e("Slice", source, e.const(np.array([0]), "zero"), count), axis=0)


@register_lowering("DetectionOutput", check=check_detection_output)
def lower_detection_output(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Top ``[1, 1, N, 7]`` with N known only after the run (see the module docstring)."""
    e = Emitter(ctx, layer.name)
    plan = DetectionPlan.of(layer, ctx.graph)
    loc, conf, prior = inputs[:3]
    batch, batch_scalar = _batch(e, conf)
    images = e("Cast", e("Range", e.const(np.int64(0), "i0"), batch_scalar, e.const(np.int64(1), "i1")), to=TensorProto.FLOAT)
    top_shape = e.const(np.array([1, 1, -1, 7]), "top_shape")
    ctx.declare_dims(outputs[0], (1, 1, DETECTIONS, 7))
    if plan.finds_nothing:
        ctx.node("Reshape", [_placeholders(e, images, batch), top_shape], outputs, layer=layer.name)
        return
    values, indices, valid = _candidates(e, _scores(e, conf, plan), plan)
    boxes = _candidate_boxes(e, _decoded(e, loc, prior, plan, layer), indices, batch_scalar, plan)
    kept = _nms_kept(e, boxes, valid, plan) if plan.nms else valid
    final = _keep_top_k(e, values, kept, plan)
    grid = e("Concat", batch, e.const(np.array([len(plan.classes), plan.per_class, 1]), "grid"), axis=0)
    rows = e("Concat", e("Expand", e("Reshape", images, e.const(np.array([-1, 1, 1, 1]), "image_col")), grid),
             e("Expand", e.const(np.array(plan.classes, np.float32).reshape(1, -1, 1, 1), "labels"), grid),
             e("Unsqueeze", values, e.const(np.array([3]), "axis3")), boxes, axis=3)
    rows = e("Reshape", rows, e.const(np.array([-1, 7]), "rows7"))
    if final is None:  # every candidate of every image is a detection
        ctx.node("Reshape", [rows, top_shape], outputs, layer=layer.name)
        return
    final = e("Reshape", final, e.const(np.array([-1]), "flat"))
    found = e("ReduceMax", e("Cast", final, to=TensorProto.FLOAT), keepdims=0)
    nothing = e("Expand", e("Less", found, e.const(np.float32(0.5), "half_mark")), batch)
    every_row = e("Concat", rows, _placeholders(e, images, batch), axis=0)
    ctx.node("Reshape", [_compact(e, every_row, e("Concat", final, nothing, axis=0)), top_shape], outputs,
             layer=layer.name)

