"""Which differences between two DetectionOutput results near-equal numbers can explain.

The rows Caffe writes (src/caffe/layers/detection_output_layer.cpp, ApplyNMSFast and
GetMaxScoreIndex in src/caffe/util/bbox_util.cpp) follow from a few decisions that compare
two numbers: a score against ``confidence_threshold`` (kept if strictly above), the scores
of one class against each other (sorted, cut to ``nms_param.top_k``, and visited in that
order by NMS), an overlap against the NMS threshold (a box is dropped when it overlaps an
earlier kept box by more), and the scores of one image against each other (cut to
``keep_top_k``). When the two numbers of such a decision are within rounding of each other,
an engine that rounds differently may decide the other way; everything downstream of that
decision then differs too. Nothing else can make a correct implementation's rows differ,
so each row on one side only (``missing``: Caffe has it; ``extra``: the hybrid has it) is
explained here only by one of these, with its partner named:

- ``confidence``: its score is within the tolerance of ``confidence_threshold``;
- ``nms``: its overlap with a box kept on the other side (and visited earlier: a score at
  least as high) is within the tolerance of the NMS threshold (any value the adaptive
  threshold takes when ``eta`` < 1);
- ``nms tie``: it and a row of the same class on the other side only have tied scores and
  overlap above the NMS threshold: the order NMS visits them decides which survives;
- ``top_k``: it and a row of the same class on the other side only have tied scores and
  are the lowest of their class on both sides: the per-class cut took one or the other;
- ``keep_top_k``: it and a row of the same image on the other side only have tied scores at
  the image's ``keep_top_k`` boundary (both sides have exactly keep_top_k rows there);
- knock-ons: a box that an explained row suppressed on one side, or that it no longer
  suppresses, and a row pushed over (or back under) the keep_top_k boundary by explained
  rows of its image, as many as those rows make room for.

A row's partner is never its own counterpart (the same image and label with an overlap of
at least ``MATCH_IOU``, or the same box and score under another label): a moved box or a
changed label is a difference of that detection, never a tie. Rows holding NaN, or an
infinite score, are never explained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from .detection_rows import BOX, IMAGE, LABEL, SCORE, VALUES, close, group_ids, groups, margin, overlaps

if TYPE_CHECKING:
    from .detections import Thresholds

#: Rows whose boxes overlap at least this much (same image and label) are one detection.
MATCH_IOU = 0.5
#: Largest overlap matrix (rows x rows) computed at once.
_CHUNK = 1 << 22


def _row(values: np.ndarray) -> str:
    return (f"image {values[IMAGE]:g} label {values[LABEL]:g} score {values[SCORE]:.7g} box "
            f"({', '.join(f'{v:.4f}' for v in values[BOX])})")


def adaptive_thresholds(nms: float, eta: float) -> np.ndarray:
    """Every value ApplyNMSFast's threshold takes: ``nms``, then times ``eta`` (float32) after
    each kept box while above 0.5."""
    values = [np.float32(nms)]
    while eta < 1 and values[-1] > 0.5:
        values.append(np.float32(values[-1] * np.float32(eta)))
    return np.array(values, dtype=np.float64)


@dataclass
class _Side:
    """One side's detection rows and what is known about each."""
    rows: np.ndarray
    matched: np.ndarray
    #: No NaN, a finite score and not known to be real: the only rows a near-tie may explain.
    usable: np.ndarray
    why: list[Optional[str]]
    explained: np.ndarray
    #: Explained by a decision before or in NMS (so it can suppress, or free, other boxes).
    grounded: np.ndarray

    @staticmethod
    def of(rows: np.ndarray, matched: np.ndarray, real: np.ndarray) -> "_Side":
        usable = ~np.isnan(rows).any(axis=1) & np.isfinite(rows[:, SCORE]) & ~real
        return _Side(rows, matched, usable, [None] * len(rows), np.zeros(len(rows), dtype=bool),
                     np.zeros(len(rows), dtype=bool))

    @property
    def scores(self) -> np.ndarray:
        return self.rows[:, SCORE]

    def open(self, positions: np.ndarray) -> np.ndarray:
        """Those of ``positions`` on this side only, explainable and not explained yet."""
        return positions[~self.matched[positions] & self.usable[positions] & ~self.explained[positions]]

    def explain(self, position: int, why: str, grounded: bool) -> None:
        self.why[position] = why
        self.explained[position] = True
        self.grounded[position] = grounded


def _counterparts(a: np.ndarray, b: np.ndarray, tolerance: float) -> np.ndarray:
    """[len(a), len(b)]: whether each pair of rows is one detection changed (see module doc)."""
    same_image = a[:, None, IMAGE] == b[None, :, IMAGE]
    same_label = a[:, None, LABEL] == b[None, :, LABEL]
    moved = same_label & (overlaps(a[:, BOX], b[:, BOX]) >= MATCH_IOU)
    relabelled = ~same_label & close(b[None, :, VALUES], a[:, None, VALUES], tolerance).all(axis=2)
    return same_image & (moved | relabelled)


class Explainer:
    """Explains the unmatched rows of Caffe's (``expected``) and the hybrid's (``actual``)
    detections; ``why_expected``/``why_actual`` hold a reason per unmatched row, or None.

    ``matched_*``: rows present on both sides; ``real_*``: rows on one side only that are
    known to be real (one detection under another label on the other side: the same image,
    score and box), which neither are explained nor explain anything. ``thresholds`` is a
    ``detections.Thresholds``; ``tolerance`` is the margin (absolute, or relative above 1,
    see ``detection_rows.margin``) within which two numbers are near-equal."""

    def __init__(self, expected: np.ndarray, actual: np.ndarray, matched_expected: np.ndarray,
                 matched_actual: np.ndarray, real_expected: np.ndarray, real_actual: np.ndarray,
                 thresholds: "Thresholds", tolerance: float):
        self.caffe = _Side.of(expected, matched_expected, real_expected)
        self.hybrid = _Side.of(actual, matched_actual, real_actual)
        self.t = thresholds
        self.tolerance = tolerance
        self.nms = (adaptive_thresholds(thresholds.nms, thresholds.eta) if thresholds.nms is not None else None)
        self._confidence()
        if self.nms is not None:
            ids_c, ids_h = group_ids(expected[:, :2], actual[:, :2])
            for in_c, in_h in groups(ids_c, ids_h):
                self._class_group(in_c, in_h)
        if thresholds.keep_top_k is not None:
            ids_c, ids_h = group_ids(expected[:, :1], actual[:, :1])
            for in_c, in_h in groups(ids_c, ids_h):
                self._image(in_c, in_h)

    @property
    def why_expected(self) -> list[Optional[str]]:
        return self.caffe.why

    @property
    def why_actual(self) -> list[Optional[str]]:
        return self.hybrid.why

    def _near(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Element-wise: scores ``a`` and ``b`` within the margin of each other."""
        return np.abs(a - b) <= margin(b, self.tolerance)

    # -- confidence_threshold -------------------------------------------------------------
    def _confidence(self) -> None:
        if self.t.confidence is None:
            return
        limit = float(margin(np.array(self.t.confidence), self.tolerance))
        why = f"score within {self.tolerance:g} of confidence_threshold {self.t.confidence:g} (kept only above it)"
        for side in (self.caffe, self.hybrid):
            rows = side.open(np.arange(len(side.rows)))
            for p in rows[np.abs(side.scores[rows] - self.t.confidence) <= limit]:
                side.explain(int(p), why, grounded=True)

    # -- one image and class: top_k and NMS -----------------------------------------------
    def _class_group(self, in_c: np.ndarray, in_h: np.ndarray) -> None:
        missing, extra = self.caffe.open(in_c), self.hybrid.open(in_h)
        if not len(missing) and not len(extra):
            return
        self._swaps(missing, extra, in_c, in_h)
        self._suppression(in_c, in_h)

    def _swaps(self, missing: np.ndarray, extra: np.ndarray, in_c: np.ndarray, in_h: np.ndarray) -> None:
        """Pairs of tied rows of one class, one on each side only: at the top_k cut (both the
        lowest of the class on both sides) or visited in either order by NMS (they overlap
        above the threshold, so the first suppresses the other)."""
        if not len(missing) or not len(extra):
            return
        c, h = self.caffe.rows, self.hybrid.rows
        tied = self._near(h[extra, SCORE][None, :], c[missing, SCORE][:, None])
        tied &= ~_counterparts(c[missing], h[extra], self.tolerance)
        iou = overlaps(c[missing, BOX], h[extra, BOX])
        conflict = iou > self.nms.min() - self.tolerance
        if self.t.top_k is not None:
            lowest = min(c[in_c, SCORE].min(), h[in_h, SCORE].min())
            at_cut = (c[missing, SCORE][:, None] <= lowest + margin(lowest, self.tolerance)) & \
                     (h[extra, SCORE][None, :] <= lowest + margin(lowest, self.tolerance))
        else:
            at_cut = np.zeros_like(tied)
        for i, j in zip(*np.nonzero(tied & (conflict | at_cut))):
            m, x = missing[i], extra[j]
            if self.caffe.explained[m] or self.hybrid.explained[x]:
                continue
            if at_cut[i, j]:
                why = f"tied with {{}} at the top_k ({self.t.top_k}) cut of its class: one side kept each"
            else:
                why = (f"tied with {{}}, which it overlaps by IoU {iou[i, j]:.4g} > nms_threshold: NMS keeps "
                       "whichever it visits first")
            self.caffe.explain(m, why.format(_row(h[x])), grounded=True)
            self.hybrid.explain(x, why.format(_row(c[m])), grounded=True)

    def _suppression(self, in_c: np.ndarray, in_h: np.ndarray) -> None:
        """Rows one side's NMS dropped and the other's kept: a box kept on both sides (and
        visited earlier: a score at least as high) overlaps them within the tolerance of the
        threshold, or an explained row on one side only overlaps them above it (knock-on).
        Repeated until a round explains nothing more."""
        while self._suppressed(self.caffe, self.hybrid, in_c, in_h) | \
                self._suppressed(self.hybrid, self.caffe, in_h, in_c):
            pass

    def _suppressed(self, side: _Side, other: _Side, mine: np.ndarray, theirs: np.ndarray) -> bool:
        rows = side.open(mine)
        if not len(rows) or not len(theirs):
            return False
        tol, low, high = self.tolerance, self.nms.min(), self.nms.max()
        kept_both, grounded = other.matched[theirs], other.grounded[theirs]
        shifts = np.concatenate([side.scores[mine][side.grounded[mine]], other.scores[theirs][grounded]])
        found = False
        step = max(1, _CHUNK // len(theirs))
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            iou = overlaps(side.rows[part, BOX], other.rows[theirs, BOX])
            floor = (side.scores[part] - margin(side.scores[part], tol))[:, None]
            earlier = other.scores[theirs][None, :] >= floor
            near = (np.abs(iou[..., None] - self.nms).min(axis=2) <= tol) & kept_both
            knock_on = (iou > low - tol) & grounded
            if len(self.nms) > 1 and len(shifts):  # eta < 1: an earlier explained row shifts the threshold
                shifted = (shifts[None, :] >= floor).any(axis=1)[:, None]
                near |= shifted & (iou >= low - tol) & (iou <= high + tol) & (kept_both | grounded)
            hit = (near | knock_on) & earlier
            for i in np.flatnonzero(hit.any(axis=1)):
                j = int(np.flatnonzero(hit[i])[0])
                o = _row(other.rows[theirs[j]])
                if near[i, j]:
                    why = (f"overlaps {o} (kept on both sides) by IoU {iou[i, j]:.6g}, within {tol:g} of the NMS "
                           "threshold: whether NMS drops it is a near-tie")
                else:
                    why = (f"knock-on: overlaps {o} by IoU {iou[i, j]:.4g}, a near-tie difference kept by NMS on "
                           "one side only")
                side.explain(int(part[i]), why, grounded=True)
                found = True
        return found

    # -- one image: keep_top_k ------------------------------------------------------------
    def _image(self, in_c: np.ndarray, in_h: np.ndarray) -> None:
        keep = self.t.keep_top_k
        c, h = self.caffe, self.hybrid
        full_c, full_h = len(in_c) == keep, len(in_h) == keep
        edge_c = c.scores[in_c].min() if full_c else None
        edge_h = h.scores[in_h].min() if full_h else None
        # rows that the other side's cut could have dropped: at or below its lowest kept score
        cut_m = [m for m in c.open(in_c) if full_h and c.scores[m] <= edge_h + margin(edge_h, self.tolerance)]
        cut_x = [x for x in h.open(in_h) if full_c and h.scores[x] <= edge_c + margin(edge_c, self.tolerance)]
        if cut_m and cut_x:  # two rows tied at the cut: which of them std::sort puts first is unspecified
            tied = self._near(h.scores[cut_x][None, :], c.scores[cut_m][:, None])
            tied &= ~_counterparts(c.rows[cut_m], h.rows[cut_x], self.tolerance)
            for i, j in zip(*np.nonzero(tied)):
                m, x = cut_m[i], cut_x[j]
                if not c.explained[m] and not h.explained[x]:
                    why = f"tied with {{}} at this image's keep_top_k ({keep}) cut: one side kept each"
                    c.explain(m, why.format(_row(h.rows[x])), grounded=False)
                    h.explain(x, why.format(_row(c.rows[m])), grounded=False)
        explained = lambda side, rows: int(side.explained[rows].sum())
        # explained rows on one side only change how many detections the image had before the cut
        surplus = explained(h, in_h) - explained(c, in_c)
        for side, rows, room, edge in ((c, [m for m in cut_m if not c.explained[m]], surplus, edge_h),
                                       (h, [x for x in cut_x if not h.explained[x]], -surplus, edge_c)):
            for p in sorted(rows, key=lambda p: side.scores[p])[:max(room, 0)]:
                side.explain(p, f"knock-on of keep_top_k ({keep}): at or below the other side's lowest kept score "
                                f"{edge:.7g}, and near-tie rows above it on one side only moved the cut",
                             grounded=False)
