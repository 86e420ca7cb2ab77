"""How far hybrid outputs are from Caffe's: the numbers every check and report uses.

A verdict must never pass what was not compared: NaN or Inf where Caffe has a number is an
infinite error, and an output with no finite value in Caffe's own result (all NaN, say)
cannot vouch for anything, so it is an infinite error too. NaN and Inf in the same places on
both sides, next to finite values that match, count as agreement (a Log layer of a
negative number gives NaN in both). Arrays of different shapes are infinitely apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

import numpy as np

if TYPE_CHECKING:
    from .detections import DetectionComparison, Thresholds


def _as_float64(actual: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both arrays in float64, plus where they hold the same non-finite value (both NaN, or
    the same infinity): such places count as equal."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    same_nonfinite = (~np.isfinite(a)) & (~np.isfinite(b)) & ((a == b) | (np.isnan(a) & np.isnan(b)))
    return a, b, same_nonfinite


def nonfinite_mismatches(actual: np.ndarray, expected: np.ndarray) -> int:
    """How many places hold NaN or Inf on one side and something else on the other."""
    a, b, same_nonfinite = _as_float64(actual, expected)
    return int(np.count_nonzero((~np.isfinite(a) | ~np.isfinite(b)) & ~same_nonfinite))


def max_abs_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| in float64; the same NaN/Inf on both sides counts as equal, a
    NaN/Inf on one side only makes it Inf (never hidden behind the finite places)."""
    a, b, same_nonfinite = _as_float64(actual, expected)
    if a.size == 0:
        return 0.0
    diff = np.abs(np.where(same_nonfinite, 0.0, a) - np.where(same_nonfinite, 0.0, b))
    return float("inf") if not np.isfinite(diff).all() else float(diff.max())


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected||, in float64; NaN/Inf in the same places count as
    equal, NaN/Inf on one side only give Inf. Against an all-zero reference it is the
    absolute ||actual - expected|| (0 when both are zero). Against a reference with no finite
    value at all, or of another shape, it is Inf: nothing was compared."""
    if np.shape(actual) != np.shape(expected):
        return float("inf")
    a, b, same_nonfinite = _as_float64(actual, expected)
    if b.size and not np.isfinite(b).any():
        return float("inf")
    a = np.where(same_nonfinite, 0.0, a)
    b = np.where(same_nonfinite, 0.0, b)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    denom = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return float(diff / denom) if denom > 0 else float(diff)


@dataclass(frozen=True)
class OutputDifference:
    """One output against Caffe's: ``max_abs_error``, ``relative_l2``, the share of items
    whose top-1 class agrees (classifier-shaped outputs only), and in ``nonfinite`` how many
    places are NaN or Inf on one side only (``nonfinite_mismatches``). For a DetectionOutput
    blob, ``detections`` compares its rows as detections, and ``max_abs``/``rel_l2`` cover the
    matched detections only."""
    name: str
    max_abs: float
    rel_l2: float
    top1_agreement: Optional[float]
    nonfinite: int = 0
    detections: Optional["DetectionComparison"] = None
    #: Why the error is infinite, when NaN/Inf or a shape rather than distance made it so ("").
    note: str = ""

    def within(self, tolerance: float) -> bool:
        """Relative L2 within ``tolerance``; for detections: no difference other than those
        near-equal numbers explain (``tolerance`` then bounds scores and coordinates)."""
        return self.detections.ok if self.detections is not None else self.rel_l2 <= tolerance


def nonfinite_note(got: np.ndarray, ref: np.ndarray) -> str:
    """Why ``relative_l2(got, ref)`` is infinite other than by distance ("" if it is not)."""
    if got.shape != ref.shape:
        return f"shape {got.shape} where Caffe gives {ref.shape}"
    if ref.size and not np.isfinite(ref).any():
        return "Caffe's output has no finite value (all NaN/Inf): nothing to check against"
    stray = int(np.count_nonzero(~np.isfinite(got) & np.isfinite(ref)))
    return f"{stray} value(s) NaN/Inf where Caffe has numbers" if stray else ""


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
            rows.append(OutputDifference(name, found.max_abs, found.rel_l2, None, detections=found))
            continue
        if got.shape != ref.shape:
            rows.append(OutputDifference(name, float("inf"), float("inf"), None, note=nonfinite_note(got, ref)))
            continue
        top1 = None
        if ref.ndim >= 2 and all(d == 1 for d in ref.shape[2:]) and ref.shape[1] > 1:
            top1 = float(np.mean(np.argmax(got.reshape(len(got), -1), 1) == np.argmax(ref.reshape(len(ref), -1), 1)))
        rows.append(OutputDifference(name, max_abs_error(got, ref), relative_l2(got, ref), top1,
                                     nonfinite_mismatches(got, ref), note=nonfinite_note(got, ref)))
    return rows
