"""Compare DetectionOutput blobs as detections, not as arrays.

A DetectionOutput top (bundled Caffe: src/caffe/layers/detection_output_layer.cpp) is
``[1, 1, N, 7]``, one row ``[image, label, score, xmin, ymin, xmax, ymax]`` per detection
(rows ``[i, -1, ...]`` when no image has one). Its row count depends on the data, and a
score that lies within rounding of the confidence threshold, of another detection's
score (top_k, keep_top_k, the order NMS visits boxes) or an overlap within rounding of
the NMS threshold can flip whether a box is kept. A relative L2 over the rows says
nothing useful then. Here rows are matched by image, label and box overlap, every
detection that is missing, extra, moved or out of order is listed, and each difference
is classed:

- ``near-tie``: explained by near-equal numbers (within the tolerance): the detection's
  score and the confidence threshold, its score and another detection's, or its IoU
  with another box of its class and the NMS threshold; a knock-on of such a difference
  (a box suppressed by, or suppressing, a near-tie box) counts too;
- ``real``: anything else, i.e. a bug.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .metrics import relative_l2

if TYPE_CHECKING:
    from .graph.layer_graph import LayerGraph

#: Rows whose box overlap is at least this are taken for the same detection.
MATCH_IOU = 0.5
NEAR_TIE = "near-tie"
REAL = "real"


@dataclass(frozen=True)
class Thresholds:
    """What decides a DetectionOutput's rows besides the scores: its confidence threshold
    (None: not set) and NMS threshold (None: no NMS)."""
    confidence: Optional[float]
    nms: Optional[float]


def detection_outputs(graph: "LayerGraph") -> dict[str, Thresholds]:
    """The thresholds of each DetectionOutput top of ``graph``, keyed by value id and, where
    the blob still holds that value at the end of the net, by blob name."""
    found: dict[str, Thresholds] = {}
    for layer in graph.layers.values():
        if layer.type != "DetectionOutput":
            continue
        p = layer.param.detection_output_param
        thresholds = Thresholds(p.confidence_threshold if p.HasField("confidence_threshold") else None,
                                p.nms_param.nms_threshold if p.HasField("nms_param") else None)
        for value in layer.tops:
            found[value] = thresholds
            blob = graph.values[value].blob
            if graph.final_value.get(blob) == value:
                found[blob] = thresholds
    return found


@dataclass(frozen=True)
class Detection:
    """One row of a DetectionOutput blob; ``row`` is its index in the blob."""
    row: int
    image: int
    label: int
    score: float
    box: tuple[float, float, float, float]

    def describe(self) -> str:
        return (f"image {self.image} label {self.label} score {self.score:.6g} box "
                f"({', '.join(f'{v:.4f}' for v in self.box)})")


def parse(blob: np.ndarray) -> list[Detection]:
    """The detections of a DetectionOutput blob (N x 7 after flattening); placeholder rows
    (label -1) are left out. Raises ValueError when the blob does not have 7 columns."""
    array = np.asarray(blob, dtype=np.float64)
    if array.size % 7:
        raise ValueError(f"a DetectionOutput blob has 7 values per row; got shape {array.shape}")
    return [Detection(i, int(r[0]), int(r[1]), float(r[2]), (float(r[3]), float(r[4]), float(r[5]), float(r[6])))
            for i, r in enumerate(array.reshape(-1, 7)) if r[1] != -1]


def iou(a: Detection, b: Detection) -> float:
    """Caffe's JaccardOverlap of normalised boxes (0 when they do not overlap)."""
    width = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
    height = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
    if width <= 0 or height <= 0:
        return 0.0
    size = lambda d: max(d.box[2] - d.box[0], 0) * max(d.box[3] - d.box[1], 0)
    inter = width * height
    return inter / (size(a) + size(b) - inter)


@dataclass(frozen=True)
class DetectionDiff:
    """One difference: ``missing`` (Caffe has it, the hybrid not), ``extra`` (the other way),
    ``moved`` (matched, but score or box off by more than the tolerance) or ``order`` (both
    have it, at another place in the blob). ``cause`` is ``near-tie`` or ``real``."""
    kind: str
    expected: Optional[Detection]
    actual: Optional[Detection]
    cause: str
    why: str

    def describe(self) -> str:
        what = self.expected or self.actual
        assert what is not None
        detail = ""
        if self.kind == "moved" and self.expected and self.actual:
            detail = f" -> score {self.actual.score:.6g} box ({', '.join(f'{v:.4f}' for v in self.actual.box)})"
        return f"{self.kind:<7} {self.cause:<8} {what.describe()}{detail}: {self.why}"


@dataclass
class DetectionComparison:
    """How a hybrid's detections compare with Caffe's (counts exclude placeholder rows)."""
    expected: int
    actual: int
    matched: int
    tolerance: float
    #: Largest score or coordinate difference over matched detections.
    max_abs: float
    #: Relative L2 of the matched rows against Caffe's.
    rel_l2: float
    diffs: list[DetectionDiff] = field(default_factory=list)

    @property
    def real(self) -> list[DetectionDiff]:
        return [d for d in self.diffs if d.cause == REAL]

    @property
    def near_ties(self) -> list[DetectionDiff]:
        return [d for d in self.diffs if d.cause == NEAR_TIE]

    @property
    def ok(self) -> bool:
        """No difference that near-equal numbers fail to explain."""
        return not self.real

    def summary(self) -> str:
        text = (f"{self.actual} detection(s), Caffe {self.expected}; {self.matched} matched (max abs "
                f"{self.max_abs:.3g})")
        if not self.diffs:
            return text + ", same rows in the same order"
        return text + f"; {len(self.real)} real difference(s), {len(self.near_ties)} from near-equal numbers"

    def to_json(self) -> dict:
        return {"expected": self.expected, "actual": self.actual, "matched": self.matched,
                "max_abs": self.max_abs, "rel_l2": self.rel_l2, "real": len(self.real),
                "near_ties": len(self.near_ties), "differences": [d.describe() for d in self.diffs]}


def _match(expected: list[Detection], actual: list[Detection], tolerance: float) -> dict[int, int]:
    """Expected row -> actual row: same image and label, and box overlap at least MATCH_IOU
    or the same box within ``tolerance`` (an inverted box overlaps nothing, not even itself);
    greedily by overlap, then by score difference."""
    pairs = []
    for e in expected:
        for a in actual:
            if (e.image, e.label) == (a.image, a.label):
                same_box = max(abs(x - y) for x, y in zip(e.box, a.box)) <= tolerance
                overlap = 1.0 if same_box else iou(e, a)
                if overlap >= MATCH_IOU:
                    pairs.append((-overlap, abs(e.score - a.score), e.row, a.row))
    pairs.sort()
    matched: dict[int, int] = {}
    taken: set[int] = set()
    for _, _, e_row, a_row in pairs:
        if e_row not in matched and a_row not in taken:
            matched[e_row] = a_row
            taken.add(a_row)
    return matched


def _near_tie(d: Detection, partner: Optional[Detection], others: Sequence[Detection],
              thresholds: Thresholds, tolerance: float) -> Optional[str]:
    """Why near-equal numbers may explain a difference on ``d``, or None."""
    if thresholds.confidence is not None and abs(d.score - thresholds.confidence) <= tolerance:
        return f"score within {tolerance:g} of confidence_threshold {thresholds.confidence:g}"
    for o in others:
        if o is d or o is partner or o.image != d.image:
            continue
        if abs(o.score - d.score) <= tolerance and (o.label, o.box) != (d.label, d.box):
            return f"score within {tolerance:g} of another detection's ({o.describe()})"
        if thresholds.nms is not None and o.label == d.label and abs(iou(o, d) - thresholds.nms) <= tolerance:
            return f"IoU {iou(o, d):.6g} with {o.describe()} within {tolerance:g} of nms_threshold {thresholds.nms:g}"
    return None


def _knock_on(d: Detection, explained: Sequence[Detection], thresholds: Thresholds, tolerance: float) -> Optional[str]:
    """A box that a near-tie box may have suppressed (or that suppressed one)."""
    if thresholds.nms is None:
        return None
    for o in explained:
        if o is not d and o.image == d.image and o.label == d.label and iou(o, d) > thresholds.nms - tolerance:
            return f"overlaps near-tie detection ({o.describe()}) by IoU {iou(o, d):.3g}"
    return None


def compare_detections(actual: np.ndarray, expected: np.ndarray, thresholds: Thresholds,
                       tolerance: float) -> DetectionComparison:
    """Compare a hybrid's DetectionOutput blob with Caffe's (``expected``); ``tolerance`` is
    the largest score or coordinate difference taken as equal, and the margin for
    near-equal scores and thresholds."""
    want, got = parse(expected), parse(actual)
    matched = _match(want, got, tolerance)
    got_by_row = {d.row: d for d in got}
    everything = want + got
    diffs: list[DetectionDiff] = []
    errors: list[float] = []
    pairs: list[tuple[Detection, Detection]] = []
    for e in want:
        a = got_by_row.get(matched.get(e.row, -1))
        if a is None:
            continue
        pairs.append((e, a))
        error = max(abs(e.score - a.score), *(abs(x - y) for x, y in zip(e.box, a.box)))
        errors.append(error)
        if error > tolerance:
            why = _near_tie(e, a, everything, thresholds, tolerance) or _near_tie(a, e, everything, thresholds, tolerance)
            diffs.append(DetectionDiff("moved", e, a, NEAR_TIE if why else REAL,
                                       why or f"differs by {error:.3g}, beyond the tolerance {tolerance:g}"))
    paired_actual = set(matched.values())
    lone = [("missing", e, None) for e in want if e.row not in matched] + \
           [("extra", None, a) for a in got if a.row not in paired_actual]
    explained: list[Detection] = [d.expected or d.actual for d in diffs if d.cause == NEAR_TIE]  # type: ignore[misc]
    pending = []
    for kind, e, a in lone:
        d = e or a
        why = _near_tie(d, None, everything, thresholds, tolerance)
        if why:
            explained.append(d)
            diffs.append(DetectionDiff(kind, e, a, NEAR_TIE, why))
        else:
            pending.append((kind, e, a))
    for kind, e, a in pending:
        d = e or a
        why = _knock_on(d, explained, thresholds, tolerance)
        diffs.append(DetectionDiff(kind, e, a, NEAR_TIE if why else REAL,
                                   why or ("Caffe has it, the hybrid does not" if kind == "missing"
                                           else "the hybrid has it, Caffe does not")))
    diffs += _order_diffs(pairs, tolerance)
    expected_rows = np.array([[e.score, *e.box] for e, _ in pairs]).reshape(-1, 5)
    actual_rows = np.array([[a.score, *a.box] for _, a in pairs]).reshape(-1, 5)
    return DetectionComparison(len(want), len(got), len(pairs), tolerance, max(errors, default=0.0),
                               relative_l2(actual_rows, expected_rows) if pairs else 0.0, diffs)


def _order_diffs(pairs: list[tuple[Detection, Detection]], tolerance: float) -> list[DetectionDiff]:
    """Matched detections that the hybrid puts in another order than Caffe: an inversion
    between two rows whose scores are within the tolerance is a tie order (Caffe's own
    std::sort leaves it unspecified), any other is real."""
    diffs = []
    for i, (e1, a1) in enumerate(pairs):
        for e2, a2 in pairs[i + 1:]:
            if a2.row < a1.row:  # Caffe has e1 before e2, the hybrid the other way round
                tie = abs(e1.score - e2.score) <= tolerance
                diffs.append(DetectionDiff(
                    "order", e1, a1, NEAR_TIE if tie else REAL,
                    f"after {e2.describe()} in the hybrid, before it in Caffe"
                    + (" (equal scores: tie order)" if tie else "")))
    return diffs
