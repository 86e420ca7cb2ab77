"""How far hybrid outputs are from Caffe's: the numbers every check and report uses.

A verdict must never pass what was not compared: NaN or Inf where Caffe has a number is an
infinite error, and an output with no finite value in Caffe's own result (all NaN, say)
cannot vouch for anything, so it is an infinite error too. NaN and Inf in the same places on
both sides, next to finite values that match, count as agreement (a Log layer of a
negative number gives NaN in both).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected||, in float64; see the module docstring for NaN/Inf.

    Arrays of different shapes are infinitely far apart (never broadcast)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape or (b.size and not np.isfinite(b).any()):
        return float("inf")
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
    #: Why the error is infinite, when it is for a reason other than plain distance ("" otherwise).
    note: str = ""


def nonfinite_note(got: np.ndarray, ref: np.ndarray) -> str:
    """Why ``relative_l2(got, ref)`` is infinite other than by distance ("" if it is not)."""
    if got.shape != ref.shape:
        return f"shape {got.shape} where Caffe gives {ref.shape}"
    if ref.size and not np.isfinite(ref).any():
        return "Caffe's output has no finite value (all NaN/Inf): nothing to check against"
    stray = int(np.count_nonzero(~np.isfinite(got) & np.isfinite(ref)))
    return f"{stray} value(s) NaN/Inf where Caffe has numbers" if stray else ""


def compare_outputs(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> list[OutputDifference]:
    rows = []
    for name, ref in expected.items():
        got = actual[name]
        note = nonfinite_note(got, ref)
        top1 = None
        max_abs = float("inf")
        if got.shape == ref.shape:
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            finite = diff[np.isfinite(diff)]
            max_abs = float(finite.max()) if finite.size else 0.0
            if ref.ndim >= 2 and all(d == 1 for d in ref.shape[2:]) and ref.shape[1] > 1 and len(ref):
                top1 = float(np.mean(np.argmax(got.reshape(len(got), -1), 1)
                                     == np.argmax(ref.reshape(len(ref), -1), 1)))
        rows.append(OutputDifference(name, max_abs, relative_l2(got, ref), top1, note))
    return rows
