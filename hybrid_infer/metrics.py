"""How far hybrid outputs are from Caffe's: the numbers every check and report uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected||, in float64; NaN/Inf in the same places count as equal."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    same_nonfinite = (~np.isfinite(a)) & (~np.isfinite(b)) & ((a == b) | (np.isnan(a) & np.isnan(b)))
    a = np.where(same_nonfinite, 0.0, a)
    b = np.where(same_nonfinite, 0.0, b)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    denom = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return float(diff / denom) if denom > 0 else float(diff)


@dataclass(frozen=True)
class OutputDifference:
    name: str
    max_abs: float
    rel_l2: float
    top1_agreement: Optional[float]
    #: For SSD detection outputs: detections found on one side only (see ``detections_differ``).
    detections_differ: Optional[int] = None


def is_detection_output(array: np.ndarray) -> bool:
    """SSD's DetectionOutput top: 1 x 1 x K x 7 rows of (image, label, score, xmin, ymin, xmax,
    ymax), K varying with what was found (ssd/src/caffe/layers/detection_output_layer.cpp)."""
    return array.ndim == 4 and array.shape[:2] == (1, 1) and array.shape[3] == 7


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def detections_differ(actual: np.ndarray, expected: np.ndarray, *, score: float = 0.5, iou: float = 0.5) -> int:
    """Detections with confidence >= ``score`` on one side that no detection of the same image
    and label overlaps by IoU >= ``iou`` on the other side, counted on both sides."""
    a = [r for r in actual.reshape(-1, 7) if r[2] >= score and r[0] >= 0]
    b = [r for r in expected.reshape(-1, 7) if r[2] >= score and r[0] >= 0]
    unmatched = 0
    free = list(b)
    for row in a:
        match = next((other for other in free if other[0] == row[0] and other[1] == row[1]
                      and _iou(row[3:7], other[3:7]) >= iou), None)
        if match is None:
            unmatched += 1
        else:
            free = [other for other in free if other is not match]
    return unmatched + len(free)


def compare_outputs(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> list[OutputDifference]:
    rows = []
    for name, ref in expected.items():
        got = actual[name]
        detections = detections_differ(got, ref) if is_detection_output(ref) and is_detection_output(got) else None
        if got.shape != ref.shape:  # a detector that found a different number of boxes
            rows.append(OutputDifference(name, float("inf"), float("inf"), None, detections))
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        finite = diff[np.isfinite(diff)]
        top1 = None
        if ref.ndim >= 2 and all(d == 1 for d in ref.shape[2:]) and ref.shape[1] > 1:
            top1 = float(np.mean(np.argmax(got.reshape(len(got), -1), 1) == np.argmax(ref.reshape(len(ref), -1), 1)))
        rows.append(OutputDifference(name, float(finite.max()) if finite.size else 0.0,
                                     relative_l2(got, ref), top1, detections))
    return rows
