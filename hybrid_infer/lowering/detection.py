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
Caffe's stable sort does) and a Slice keeps only as many as the run's busiest class has
above the confidence threshold; NMS is ``nms.greedy_nms`` (exactly Caffe's greedy
result); a second TopK applies keep_top_k; a cumulative sum, a scatter and a Slice
compact the rows. The top's row count N is data-dependent (declared
``[1, 1, "detections", 7]``).

Refused (the layer then runs in Caffe): ``visualize``; ``share_location`` with
``background_label_id: -1`` (this Caffe aborts on it); a TopK K above TensorRT's 3840
(``top_k``, ``keep_top_k``, or every prior without ``nms_param`` when keep_top_k sorts
them; K is fixed when the engine is built); more than ``MAX_PAIRS`` overlap tests per run
(batch x classes x top_k^2: the NMS Loop's worst case, top_k steps of batch x classes x
top_k tests; set nms_param.top_k). Ties that engines may order differently from Caffe:
equal scores across classes where keep_top_k cuts or orders more than 16 detections
(Caffe's std::sort leaves the order of equal elements unspecified there), and TopK ties on
TensorRT, whose tie rule is not documented.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from onnx import TensorProto

from ..graph.layer_graph import Layer, LayerGraph
from .box_decoding import CENTER_SIZE, CODE_TYPES, CORNER_SIZE, Boxes, decode_boxes
from .context import LoweringContext
from .emitter import Emitter
from .nms import ROUNDS, greedy_nms, uses_matrix
from .prior_box import folded_priors
from .reductions import TENSORRT_MAX_TOP_K
from .registry import register_lowering

FLT_MAX = np.float32(np.finfo(np.float32).max)
NEG_INF = np.float32(-np.inf)
#: The declared row count of DetectionOutput's top: known only after the run.
DETECTIONS = "detections"
#: Overlap tests per run (batch x classes x per_class^2, NMS's worst case) above which the
#: lowering refuses: about 3 s of ONNX Runtime on one CPU core (see README, "SSD detectors").
MAX_PAIRS = 1 << 28


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
        """NMS's overlap tests per image in the worst case (every candidate valid)."""
        return len(self.classes) * self.per_class ** 2 if self.nms else 0

    @property
    def top_k_sizes(self) -> dict[str, int]:
        """The K of each TopK the lowering emits, by what sets it."""
        sizes = {}
        if self.nms or self.keep_top_k is not None:
            sizes["nms_param.top_k" if self.nms else "the number of priors (sorted for keep_top_k)"] = self.per_class
        if self.keep_top_k is not None:
            sizes["keep_top_k"] = self.keep_top_k
        return sizes

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
    """None, or why this DetectionOutput stays in Caffe (see the module docstring)."""
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
    for what, k in plan.top_k_sizes.items():
        if k > TENSORRT_MAX_TOP_K:
            return (f"{what} is {k}: TensorRT's TopK takes K up to {TENSORRT_MAX_TOP_K} (the limit is on K, "
                    f"fixed when the engine is built, not on the input size); set it to at most {TENSORRT_MAX_TOP_K}")
    batch = graph.values[layer.bottoms[1]].shape[0]
    if batch * plan.overlaps_per_image > MAX_PAIRS:
        return (f"NMS would make up to {batch * plan.overlaps_per_image:,} overlap tests per run (batch {batch} x "
                f"{len(plan.classes)} classes x top_k {plan.per_class}^2), above {MAX_PAIRS:,}; set a smaller "
                "nms_param.top_k")
    return None


def cost_note(layer: Layer, graph: LayerGraph) -> Optional[str]:
    """What the lowered layer's NMS costs, for the partition report (None without NMS)."""
    plan = DetectionPlan.of(layer, graph)
    if not plan.nms or plan.finds_nothing:
        return None
    batch = graph.values[layer.bottoms[1]].shape[0]
    groups = batch * len(plan.classes)
    k, classes = plan.per_class, len(plan.classes)
    if uses_matrix(plan.nms_threshold, plan.eta, groups, k):
        way = (f"a suppression matrix of {classes} classes x {k}^2 candidate pairs per image, then up to {ROUNDS} "
               f"rounds (and, for long chains of overlapping boxes, up to {k} Loop steps)")
    else:
        way = f"up to {k} Loop steps, one per candidate position, each testing batch x {classes} x {k} pairs"
    return (f"NMS over up to {k} candidates per class (top_k; only those above confidence_threshold count): {way}; "
            "on ONNX Runtime (CPU) the lowered layer took 0.4x to 4x the time of Caffe's own, 8x on a long chain of "
            "overlapping boxes (README, \"SSD detectors\"), the most for large top_k with most candidates above the "
            "threshold")


def caffe_abort(layer: Layer, graph: LayerGraph) -> Optional[str]:
    """Why this Caffe's DetectionOutput would abort the process on the net's own priors (a
    PriorBox constant), or None. DecodeBBox (bbox_util.cpp) CHECK-fails for CENTER_SIZE and
    CORNER_SIZE unless every prior has a positive width and height; PriorBox's ``clip`` makes
    priors centred outside the image zero-wide, and Caffe decodes every prior of every image."""
    p = layer.param.detection_output_param
    if p.code_type not in (CENTER_SIZE, CORNER_SIZE) or len(layer.bottoms) < 3:
        return None
    priors = folded_priors(graph, layer.bottoms[2])
    if priors is None or priors.ndim < 3 or priors.shape[2] % 4:
        return None
    boxes = priors[0, 0].reshape(-1, 4)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]  # float32, as Caffe
    bad = np.flatnonzero(~(width > 0) | ~(height > 0))
    if not len(bad):
        return None
    i = int(bad[0])
    return (f"DetectionOutput '{layer.name}' makes Caffe abort (DecodeBBox checks prior_width > 0 and prior_height > 0 "
            f"for {CODE_TYPES[p.code_type]}): {len(bad)} of the {len(boxes)} priors of "
            f"'{graph.values[layer.bottoms[2]].blob}' are empty, the first (prior {i}) is "
            f"({', '.join(f'{v:.6g}' for v in boxes[i])}) (PriorBox clip: true cuts boxes centred outside the image "
            "to nothing)")


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
    """Each class's candidates [B, classes, K]: scores, prior indices, and validity (None: all
    valid). Without NMS every prior is one (K = priors), in prior order unless keep_top_k will
    sort them. With NMS, K is the run's largest number of scores above the confidence
    threshold in any image and class, at most per_class: TopK takes per_class (a static K,
    as TensorRT needs), and a Slice keeps the first K, so that NMS works only on candidates
    that can be kept (on trained nets most priors score below the threshold)."""
    k = e.const(np.array([plan.per_class]), "top_k")
    if not plan.nms:
        if plan.keep_top_k is None:
            return scores, e.const(np.arange(plan.num_priors).reshape(1, 1, -1), "prior_index"), None
        values, indices = e.many("TopK", [scores, k], 2, axis=2, largest=1, sorted=1)
        return values, indices, None
    threshold = e.const(plan.confidence_threshold, "confidence_threshold")
    above = e("Greater", scores, threshold)
    values, indices = e.many("TopK", [e("Where", above, scores, e.const(NEG_INF, "neg_inf")), k], 2,
                             axis=2, largest=1, sorted=1)
    if plan.confidence_threshold > -FLT_MAX:  # every score passes -FLT_MAX: K stays per_class
        counts = e("ReduceSum", e("Cast", above, to=TensorProto.INT64), e.const(np.array([2]), "axis2"), keepdims=0)
        most = e("Min", e("ReduceMax", counts, keepdims=1), k)
        axis = e.const(np.array([2]), "axis2")
        start = e.const(np.array([0]), "zero")
        values, indices = (e("Slice", t, start, e("Reshape", most, e.const(np.array([1]), "one")), axis)
                           for t in (values, indices))
    return values, indices, e("Greater", values, threshold)


def _candidate_boxes(e: Emitter, decoded: str, indices: str, batch: str, plan: DetectionPlan) -> str:
    """The decoded boxes of the candidates, [B, classes, K, 4]."""
    images = e("Range", e.const(np.int64(0), "i0"), batch, e.const(np.int64(1), "i1"))
    first_row = e("Mul", e("Unsqueeze", images, e.const(np.array([1, 2]), "axes12")),
                  e.const(np.int64(plan.loc_classes), "loc_classes"))
    loc_class = np.array(plan.classes if not plan.share_location else [0] * len(plan.classes))
    rows = e("Add", e("Mul", e("Add", first_row, e.const(loc_class.reshape(1, -1, 1), "loc_class")),
                      e.const(np.int64(plan.num_priors), "priors")), indices)
    return e("Gather", decoded, rows, axis=0)


def _keep_top_k(e: Emitter, values: str, kept: Optional[str], plan: DetectionPlan) -> Optional[str]:
    """Per image, the detections that survive keep_top_k, flattened [B, classes * K] (bool;
    None: all). Kept scores (the others -inf) are padded with keep_top_k -inf so that TopK's
    static K never exceeds a run-time K that the confidence threshold made small."""
    per_image = e.const(np.array([0, -1]), "per_image")
    flat_kept = e("Reshape", kept, per_image) if kept is not None else None
    if plan.keep_top_k is None:
        return flat_kept
    scores = e("Reshape", values, per_image)
    if flat_kept is not None:
        scores = e("Where", flat_kept, scores, e.const(NEG_INF, "neg_inf"))
    width = e("Slice", e("Shape", scores), e.const(np.array([1]), "one"), e.const(np.array([2]), "two"))
    padded = scores
    if plan.nms:
        padding = e("Expand", e.const(np.full((1, plan.keep_top_k), NEG_INF), "padding"),
                    e("Concat", e("Slice", e("Shape", scores), e.const(np.array([0]), "zero"),
                                  e.const(np.array([1]), "one")), e.const(np.array([plan.keep_top_k]), "keep"), axis=0))
        padded = e("Concat", scores, padding, axis=1)
    _, best = e.many("TopK", [padded, e.const(np.array([plan.keep_top_k]), "keep_top_k")], 2,
                     axis=1, largest=1, sorted=1)
    chosen = e("Greater", e("ScatterElements", e.fill(padded, 0), best, e.fill(best, 1), axis=1),
               e.const(np.float32(0.5), "half_mark"))
    if plan.nms:
        chosen = e("Slice", chosen, e.const(np.array([0]), "zero"), width, e.const(np.array([1]), "one"))
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
    kept = greedy_nms(e, boxes, valid, plan.nms_threshold, plan.eta, ctx.shape(conf)[0] * len(plan.classes),
                      plan.per_class) if plan.nms else valid
    final = _keep_top_k(e, values, kept, plan)
    grid = e("Concat", e("Shape", values), e.const(np.array([1]), "one"), axis=0)
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

