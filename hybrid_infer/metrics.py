"""How far hybrid outputs are from Caffe's: the numbers every check and report uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

import numpy as np

if TYPE_CHECKING:
    from .detections import DetectionComparison, Thresholds


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
    """One output against Caffe's. For a DetectionOutput blob, ``detections`` compares rows as
    detections and ``max_abs``/``rel_l2`` cover the matched detections only."""
    name: str
    max_abs: float
    rel_l2: float
    top1_agreement: Optional[float]
    detections: Optional["DetectionComparison"] = None

    def within(self, tolerance: float) -> bool:
        """Relative L2 within ``tolerance``; for detections: no difference other than those
        near-equal numbers explain (``tolerance`` then bounds scores and coordinates)."""
        return self.detections.ok if self.detections is not None else self.rel_l2 <= tolerance


def compare_outputs(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], *,
                    detections: Mapping[str, "Thresholds"] = {}, tolerance: float = 1e-4) -> list[OutputDifference]:
    """Each of ``expected``'s outputs (Caffe's) against ``actual``'s. Outputs named in
    ``detections`` (DetectionOutput blobs, see ``detections.detection_outputs``) are compared
    as detections with ``tolerance``; an output of another shape than Caffe's is infinitely off."""
    rows = []
    for name, ref in expected.items():
        got = actual[name]
        if name in detections:
            from .detections import compare_detections
            found = compare_detections(got, ref, detections[name], tolerance)
            rows.append(OutputDifference(name, found.max_abs, found.rel_l2, None, found))
            continue
        if got.shape != ref.shape:
            rows.append(OutputDifference(name, float("inf"), float("inf"), None))
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        finite = diff[np.isfinite(diff)]
        top1 = None
        if ref.ndim >= 2 and all(d == 1 for d in ref.shape[2:]) and ref.shape[1] > 1:
            top1 = float(np.mean(np.argmax(got.reshape(len(got), -1), 1) == np.argmax(ref.reshape(len(ref), -1), 1)))
        rows.append(OutputDifference(name, float(finite.max()) if finite.size else 0.0,
                                     relative_l2(got, ref), top1))
    return rows
