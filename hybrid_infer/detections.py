"""Compare DetectionOutput blobs as detections, not as arrays.

A DetectionOutput top (bundled Caffe: src/caffe/layers/detection_output_layer.cpp) is
``[1, 1, N, 7]``, one row ``[image, label, score, xmin, ymin, xmax, ymax]`` per detection,
images ascending, then labels ascending, then scores descending; when no image has a
detection, one placeholder row ``[i, -1, -1, -1, -1, -1, -1]`` per image instead. Its row
count depends on the data, and a decision between two near-equal numbers (see
``detection_ties``) can flip whether a box is kept, so a relative L2 over the rows says
nothing useful. Here:

1. placeholder rows are compared value for value (count, image ids, the -1s);
2. detection rows are matched one to one: the same image and label, score and box equal
   within the tolerance (``detection_rows.margin``: absolute, relative above 1; the same
   infinity matches itself);
3. every row on one side only is ``missing`` (Caffe has it) or ``extra`` (the hybrid has
   it) and is either explained by a near-tie (``detection_ties``: the confidence threshold,
   tied scores at the top_k or keep_top_k cut or in NMS's visiting order, an overlap at the
   NMS threshold, and what those decisions knock on) or ``real``; real ones that are one
   detection changed are shown as ``moved`` (same image and label, box overlap at least
   ``MATCH_IOU``) or ``label`` (same image, score and box, another label);
4. the hybrid's rows must be in Caffe's order (image, label, descending score): rows out of
   it are ``real`` ``order`` differences; matched rows that only swap places among tied
   scores are ``near-tie`` ones.

Any real difference makes the comparison fail, and its ``max_abs``/``rel_l2`` Inf (as for
an output of another shape than Caffe's); otherwise they measure the matched rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .detection_rows import BOX, IMAGE, LABEL, SCORE, VALUES, close, group_ids, groups, margin, match, overlaps
from .detection_ties import MATCH_IOU, Explainer
from .metrics import relative_l2

if TYPE_CHECKING:
    from .graph.layer_graph import LayerGraph

NEAR_TIE = "near-tie"
REAL = "real"
__all__ = ["MATCH_IOU", "NEAR_TIE", "REAL", "Thresholds", "detection_outputs", "Detection", "parse",
           "DetectionDiff", "DetectionComparison", "compare_detections"]


#: How far (absolute) a detection's score and coordinates (0-1) may move under reduced precision
#: and still be the same detection: FP16 moves them by about 1e-3, INT8 by about 1e-2. At the
#: FP32 check's 1e-4 every row of an SSD counted as lost (120 of 120 on HyperLPR's plate net).
DETECTION_TOLERANCE = 0.02


@dataclass(frozen=True)
class Thresholds:
    """What decides a DetectionOutput's rows besides the scores: ``confidence`` (None: not
    set, or no nms_param, where this Caffe applies none), ``nms`` threshold (None: no NMS),
    ``top_k`` per class before NMS and ``keep_top_k`` per image (None: no cut), NMS's ``eta``."""
    confidence: Optional[float]
    nms: Optional[float]
    top_k: Optional[int] = None
    keep_top_k: Optional[int] = None
    eta: float = 1.0


def detection_outputs(graph: "LayerGraph") -> dict[str, Thresholds]:
    """The thresholds of each DetectionOutput top of ``graph``, keyed by value id and, where
    the blob still holds that value at the end of the net, by blob name."""
    found: dict[str, Thresholds] = {}
    for layer in graph.layers.values():
        if layer.type != "DetectionOutput":
            continue
        p = layer.param.detection_output_param
        nms = p.HasField("nms_param")
        prior_shape = graph.values[layer.bottoms[2]].shape if len(layer.bottoms) > 2 else None
        priors = prior_shape[2] // 4 if prior_shape is not None and len(prior_shape) > 2 else None
        top_k = p.nms_param.top_k if nms and p.nms_param.HasField("top_k") else -1
        classes = sum(c != p.background_label_id for c in range(p.num_classes))
        # without NMS every prior of every class is a detection: keep_top_k cuts only below that
        cuts = p.keep_top_k > -1 and (nms or priors is None or p.keep_top_k < classes * priors)
        thresholds = Thresholds(
            p.confidence_threshold if nms and p.HasField("confidence_threshold") else None,
            p.nms_param.nms_threshold if nms else None,
            top_k if top_k > -1 and (priors is None or top_k < priors) else None,
            p.keep_top_k if cuts else None,
            p.nms_param.eta if nms else 1.0)
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

    @staticmethod
    def at(rows: np.ndarray, row: int) -> "Detection":
        image, label, score, x1, y1, x2, y2 = rows[row].tolist()
        whole = lambda v: int(v) if v == v and abs(v) != float("inf") else v
        return Detection(row, whole(image), whole(label), score, (x1, y1, x2, y2))

    def describe(self) -> str:
        return (f"row {self.row}: image {self.image} label {self.label} score {self.score:.7g} box "
                f"({', '.join(f'{v:.4f}' for v in self.box)})")


def _rows(blob: np.ndarray) -> np.ndarray:
    array = np.asarray(blob, dtype=np.float64)
    if array.size % 7:
        raise ValueError(f"a DetectionOutput blob has 7 values per row; got shape {array.shape}")
    return array.reshape(-1, 7)


def parse(blob: np.ndarray) -> list[Detection]:
    """The detections of a DetectionOutput blob (N x 7 after flattening); placeholder rows
    (label -1) are left out. Raises ValueError when the blob does not have 7 columns."""
    rows = _rows(blob)
    return [Detection.at(rows, i) for i in np.flatnonzero(rows[:, LABEL] != -1)]


@dataclass(frozen=True)
class DetectionDiff:
    """One difference: ``missing`` (Caffe has it, the hybrid not), ``extra`` (the other way),
    ``moved`` or ``label`` (one detection whose box or score, or label, changed), ``order``
    (at another place in the hybrid's rows) or ``placeholder`` (the rows for "nothing
    found"). ``cause`` is ``near-tie`` or ``real``; ``why`` says which."""
    kind: str
    expected: Optional[Detection]
    actual: Optional[Detection]
    cause: str
    why: str

    def describe(self) -> str:
        if self.expected and self.actual and self.kind != "order":
            what = f"Caffe {self.expected.describe()} -> hybrid {self.actual.describe()}"
        else:
            what = (f"Caffe {self.expected.describe()}" if self.expected else
                    f"hybrid {self.actual.describe()}" if self.actual else "")
        return f"{self.kind:<11} {self.cause:<8} {what}: {self.why}"


@dataclass
class DetectionComparison:
    """How a hybrid's detections compare with Caffe's (counts exclude placeholder rows)."""
    expected: int
    actual: int
    matched: int
    tolerance: float
    #: Largest score or coordinate difference over matched detections; Inf if any real difference.
    max_abs: float
    #: Relative L2 of the matched rows against Caffe's; Inf if any real difference.
    rel_l2: float
    diffs: list[DetectionDiff] = field(default_factory=list)
    #: Rows on one side only that hold NaN or Inf.
    nonfinite: int = 0

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

    @property
    def lone_rows(self) -> int:
        """Detection rows on one side only (a moved box or a changed label is one such row on
        each side), near-ties included."""
        return _lone(self.diffs)

    @property
    def real_lone_rows(self) -> int:
        """``lone_rows`` without the near-ties: rows no near-equal number explains."""
        return _lone(self.real)

    def summary(self) -> str:
        text = (f"{self.actual} detection(s), Caffe {self.expected}; {self.matched} matched (max abs "
                f"{self.max_abs:.3g})")
        if not self.diffs:
            return text + ", same rows in the same order"
        return text + f"; {len(self.real)} real difference(s), {len(self.near_ties)} from near-equal numbers"

    def to_json(self) -> dict:
        return {"expected": self.expected, "actual": self.actual, "matched": self.matched,
                "max_abs": self.max_abs, "rel_l2": self.rel_l2, "real": len(self.real),
                "near_ties": len(self.near_ties), "nonfinite": self.nonfinite, "lone_rows": self.lone_rows,
                "differences": [d.describe() for d in self.diffs]}


def _finite(rows: np.ndarray) -> np.ndarray:
    return np.isfinite(rows).all(axis=1)


def _lone_why(rows: np.ndarray, row: int, side: str) -> str:
    if not np.isfinite(rows[row]).all():
        return f"{side} row holds NaN or Inf; the other side has no such row"
    return "Caffe has it, the hybrid does not" if side == "Caffe's" else "the hybrid has it, Caffe does not"


def _relabelled(want: np.ndarray, got: np.ndarray, missing: np.ndarray, extra: np.ndarray,
                tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows on one side only that are one detection under another label: the same image,
    score and box (positions into ``missing`` and ``extra``, paired)."""
    relabel_e, relabel_a = want[missing].copy(), got[extra].copy()
    relabel_e[:, LABEL] = relabel_a[:, LABEL] = 0
    return match(relabel_e, relabel_a, tolerance)


def _moved(want: np.ndarray, got: np.ndarray, missing: np.ndarray,
           extra: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Real rows on one side only that are one detection whose box or score changed (same
    image and label, overlap at least MATCH_IOU, greedily by overlap): the (Caffe row,
    hybrid row) pairs, and the rows left over."""
    ids_e, ids_a = group_ids(want[missing, :2], got[extra, :2])
    pairs, used_e, used_a = [], set(), set()
    for ge, ga in groups(ids_e, ids_a):
        if not len(ge) or not len(ga) or len(ge) * len(ga) > 1 << 22:
            continue
        iou = overlaps(want[missing[ge], BOX], got[extra[ga], BOX])
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            i, j = divmod(int(flat), len(ga))
            if not iou[i, j] >= MATCH_IOU:
                break
            if ge[i] not in used_e and ga[j] not in used_a:
                used_e.add(ge[i])
                used_a.add(ga[j])
                pairs.append((int(missing[ge[i]]), int(extra[ga[j]])))
    return pairs, np.delete(missing, list(used_e)), np.delete(extra, list(used_a))


def _overlap_diffs(got: np.ndarray, got_index: np.ndarray, got_all: np.ndarray, thresholds: Thresholds,
                   tolerance: float) -> list[DetectionDiff]:
    """Hybrid rows that overlap an earlier row of the same image and label by more than the
    NMS threshold: Caffe's NMS keeps a box only if it overlaps no kept one by more (and eta
    only lowers the threshold), so no two of its rows of a class overlap that much."""
    if thresholds.nms is None:
        return []
    diffs = []
    ids, _ = group_ids(got[:, :2], got[:0, :2])
    for rows, _ in groups(ids, np.zeros(0, np.int64)):
        rows = np.sort(rows)
        if len(rows) < 2:
            continue
        step = max(1, (1 << 22) // len(rows))
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            iou = overlaps(got[part, BOX], got[rows, BOX])
            earlier = rows[None, :] < part[:, None]
            hit = earlier & (iou > thresholds.nms + tolerance)
            for i in np.flatnonzero(hit.any(axis=1)):
                j = int(np.flatnonzero(hit[i])[0])
                diffs.append(DetectionDiff(
                    "overlap", None, Detection.at(got_all, int(got_index[part[i]])), REAL,
                    f"overlaps {Detection.at(got_all, int(got_index[rows[j]])).describe()} by IoU {iou[i, j]:.4g} > "
                    f"nms_threshold {thresholds.nms:g}: NMS keeps at most one of them"))
    return diffs


def _placeholder_diffs(want_all: np.ndarray, got_all: np.ndarray, detections_explained: bool,
                       tolerance: float) -> list[DetectionDiff]:
    """Caffe writes one row [i, -1, -1, -1, -1, -1, -1] per image when no image has a
    detection, and none otherwise; the hybrid's must be the same rows."""
    flag_e, flag_a = want_all[:, LABEL] == -1, got_all[:, LABEL] == -1
    ph_e, ph_a = np.flatnonzero(flag_e), np.flatnonzero(flag_a)
    det = lambda rows, i: Detection.at(rows, int(i))
    if len(got_all) == 0:
        return [DetectionDiff("placeholder", det(want_all, 0) if len(want_all) else None, None, REAL,
                              "the hybrid returned no rows at all; Caffe writes one placeholder row per image "
                              "when it finds nothing")]
    if len(ph_a) and not flag_a.all():
        return [DetectionDiff("placeholder", None, det(got_all, ph_a[0]), REAL,
                              "a placeholder row (label -1) among the hybrid's detections")]
    if len(ph_e) and len(ph_a):
        same = len(ph_e) == len(ph_a) and close(got_all[ph_a], want_all[ph_e], tolerance).all()
        if same:
            return []
        wrong = next((i for i in range(min(len(ph_e), len(ph_a)))
                      if not close(got_all[ph_a[i]], want_all[ph_e[i]], tolerance).all()), None)
        why = (f"the hybrid has {len(ph_a)} placeholder row(s), Caffe {len(ph_e)} (one per image)" if wrong is None else
               f"placeholder row {wrong} is {np.array2string(got_all[ph_a[wrong]], precision=4)}, Caffe's "
               f"{np.array2string(want_all[ph_e[wrong]], precision=4)}")
        return [DetectionDiff("placeholder", det(want_all, ph_e[0]), det(got_all, ph_a[0]), REAL, why)]
    if len(ph_a):  # the hybrid found nothing, Caffe found something
        images = len(ph_a)
        well_formed = np.array_equal(got_all[ph_a], np.column_stack([np.arange(images), -np.ones((images, 6))]))
        ok = well_formed and detections_explained
        return [DetectionDiff("placeholder", None, det(got_all, ph_a[0]), NEAR_TIE if ok else REAL,
                              "the hybrid found nothing; Caffe's detections are all near-ties" if ok else
                              "the hybrid's placeholder rows are not [i, -1, ...] for each image" if not well_formed
                              else "the hybrid found nothing, Caffe did")]
    if len(ph_e):  # Caffe found nothing, the hybrid found something
        return [DetectionDiff("placeholder", det(want_all, ph_e[0]), None, NEAR_TIE if detections_explained else REAL,
                              "Caffe found nothing; the hybrid's detections are all near-ties" if detections_explained
                              else "Caffe found nothing, the hybrid did")]
    return []


def _score_ordered(rows: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """Per row: whether Caffe orders its image's rows of a label by descending score (after
    NMS, or after a keep_top_k cut); otherwise (no nms_param, no cut) by prior index."""
    if thresholds.nms is not None:
        return np.ones(len(rows), dtype=bool)
    if thresholds.keep_top_k is None:
        return np.zeros(len(rows), dtype=bool)
    images, inverse, counts = np.unique(rows[:, IMAGE], return_inverse=True, return_counts=True)
    return (counts == thresholds.keep_top_k)[inverse.reshape(-1)]


def _order_diffs(got: np.ndarray, got_index: np.ndarray, want_index: np.ndarray, pe: np.ndarray, pa: np.ndarray,
                 got_all: np.ndarray, want_all: np.ndarray, thresholds: Thresholds,
                 tolerance: float) -> list[DetectionDiff]:
    """Rows the hybrid puts out of Caffe's order (images, then labels ascending; within a
    label descending scores, or prior order where Caffe does not sort them): real; matched
    rows in another order than Caffe's only among tied scores: near-tie (a tie order)."""
    key_before, key_after = got[:-1, :2], got[1:, :2]
    key_back = (key_after[:, 0] < key_before[:, 0]) | \
               ((key_after[:, 0] == key_before[:, 0]) & (key_after[:, 1] < key_before[:, 1]))
    sorted_rows = _score_ordered(got, thresholds)
    same_key = (key_after == key_before).all(axis=1) & sorted_rows[1:]
    with np.errstate(invalid="ignore"):
        score_up = same_key & (got[1:, SCORE] > got[:-1, SCORE] + margin(got[:-1, SCORE], tolerance))
    diffs = [DetectionDiff("order", None, Detection.at(got_all, int(got_index[i + 1])), REAL,
                           f"after {Detection.at(got_all, int(got_index[i])).describe()}; Caffe orders rows by image, "
                           "then label, then descending score") for i in np.flatnonzero(key_back | score_up)]
    if diffs or not len(pe):
        return diffs
    by_caffe = np.argsort(pe, kind="stable")
    ranks = np.argsort(np.argsort(pa[by_caffe], kind="stable"), kind="stable")
    for k in np.flatnonzero(ranks != np.arange(len(pe))):
        e, a = int(want_index[pe[by_caffe[k]]]), int(got_index[pa[by_caffe[k]]])
        tie = bool(sorted_rows[pa[by_caffe[k]]])
        diffs.append(DetectionDiff("order", Detection.at(want_all, e), Detection.at(got_all, a),
                                   NEAR_TIE if tie else REAL,
                                   "tied scores in another order than Caffe's" if tie else
                                   "another place than Caffe's, which keeps prior order here (no NMS, no cut)"))
    return diffs


def _lone_diffs(want_all: np.ndarray, got_all: np.ndarray, want_index: np.ndarray, got_index: np.ndarray,
                missing: np.ndarray, extra: np.ndarray, ties: Explainer,
                relabelled: tuple[np.ndarray, np.ndarray]) -> list[DetectionDiff]:
    """The rows on one side only: near-ties with their reasons, then the real ones, pairs
    that are one detection changed (``relabelled``: positions into ``missing``/``extra``
    under another label; moved boxes) first."""
    want, got = want_all[want_index], got_all[got_index]
    caffe_row = lambda e: Detection.at(want_all, int(want_index[e]))
    hybrid_row = lambda a: Detection.at(got_all, int(got_index[a]))
    diffs = [DetectionDiff("missing", caffe_row(e), None, NEAR_TIE, ties.why_expected[e])
             for e in missing if ties.why_expected[e] is not None]
    diffs += [DetectionDiff("extra", None, hybrid_row(a), NEAR_TIE, ties.why_actual[a])
              for a in extra if ties.why_actual[a] is not None]
    re, ra = missing[relabelled[0]], extra[relabelled[1]]
    paired_e, paired_a = set(re.tolist()), set(ra.tolist())
    real_e = np.array([e for e in missing if ties.why_expected[e] is None and e not in paired_e], dtype=np.int64)
    real_a = np.array([a for a in extra if ties.why_actual[a] is None and a not in paired_a], dtype=np.int64)
    moved, real_e, real_a = _moved(want, got, real_e, real_a)
    for e, a, kind in [(e, a, "label") for e, a in zip(re, ra)] + [(e, a, "moved") for e, a in moved]:
        nonfinite = "; the hybrid's row holds NaN or Inf" if not np.isfinite(got[a]).all() else ""
        diffs.append(DetectionDiff(kind, caffe_row(e), hybrid_row(a), REAL,
                                   ("another label for the same box and score" if kind == "label" else
                                    "score or box differ beyond the tolerance") + nonfinite))
    diffs += [DetectionDiff("missing", caffe_row(e), None, REAL, _lone_why(want, e, "Caffe's")) for e in real_e]
    diffs += [DetectionDiff("extra", None, hybrid_row(a), REAL, _lone_why(got, a, "the hybrid's")) for a in real_a]
    return diffs


def compare_detections(actual: np.ndarray, expected: np.ndarray, thresholds: Thresholds,
                       tolerance: float) -> DetectionComparison:
    """Compare a hybrid's DetectionOutput blob with Caffe's (``expected``), see the module
    docstring. ``tolerance`` is the largest score or coordinate difference taken as equal
    (relative above 1) and the margin for near-equal scores, overlaps and thresholds.
    Raises ValueError when a blob does not have 7 values per row."""
    want_all, got_all = _rows(expected), _rows(actual)
    want_index, got_index = np.flatnonzero(want_all[:, LABEL] != -1), np.flatnonzero(got_all[:, LABEL] != -1)
    want, got = want_all[want_index], got_all[got_index]
    pe, pa = match(want, got, tolerance)
    matched_e, matched_a = np.zeros(len(want), bool), np.zeros(len(got), bool)
    matched_e[pe], matched_a[pa] = True, True
    missing, extra = np.flatnonzero(~matched_e), np.flatnonzero(~matched_a)
    re, ra = _relabelled(want, got, missing, extra, tolerance)
    relabelled_e, relabelled_a = np.zeros(len(want), bool), np.zeros(len(got), bool)
    relabelled_e[missing[re]], relabelled_a[extra[ra]] = True, True
    ties = Explainer(want, got, matched_e, matched_a, relabelled_e, relabelled_a, thresholds, tolerance)
    diffs = _lone_diffs(want_all, got_all, want_index, got_index, missing, extra, ties, (re, ra))
    diffs += _overlap_diffs(got, got_index, got_all, thresholds, tolerance)
    lone_real = any(d.cause == REAL for d in diffs)
    diffs += _placeholder_diffs(want_all, got_all, not lone_real, tolerance)
    diffs += _order_diffs(got, got_index, want_index, pe, pa, got_all, want_all, thresholds, tolerance)
    nonfinite = int((~_finite(want[missing])).sum() + (~_finite(got[extra])).sum())
    if any(d.cause == REAL for d in diffs):
        max_abs = rel_l2 = float("inf")
    elif len(pe):
        both = np.isfinite(want[pe][:, VALUES]) & np.isfinite(got[pa][:, VALUES])
        max_abs = float(np.abs(got[pa][:, VALUES][both] - want[pe][:, VALUES][both]).max(initial=0.0))
        rel_l2 = relative_l2(got[pa][:, VALUES], want[pe][:, VALUES])
    else:
        max_abs = rel_l2 = 0.0
    return DetectionComparison(len(want), len(got), len(pe), tolerance, max_abs, rel_l2, diffs, nonfinite)


def _lone(diffs: Sequence["DetectionDiff"]) -> int:
    """Rows on one side only among ``diffs``: a moved box or changed label is one on each side."""
    return sum({"missing": 1, "extra": 1, "moved": 2, "label": 2}.get(d.kind, 0) for d in diffs)
