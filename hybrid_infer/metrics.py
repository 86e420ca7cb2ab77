"""How far hybrid outputs are from Caffe's: the numbers every check and report uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from .errors import HybridInferError


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


def compare_outputs(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> list[OutputDifference]:
    """One row per blob of ``expected`` (Caffe's); raises HybridInferError naming the blob
    when the hybrid's array has another shape (a lowering computed a wrong shape)."""
    rows = []
    for name, ref in expected.items():
        got = actual[name]
        if got.shape != ref.shape:
            raise HybridInferError(f"'{name}' has shape {tuple(got.shape)} in the hybrid but {tuple(ref.shape)} in "
                                   "Caffe: a lowering computes a wrong shape ('hybrid-infer diff' shows which layer; "
                                   "--fallback NAME runs it in Caffe)")
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        finite = diff[np.isfinite(diff)]
        top1 = None
        if ref.ndim >= 2 and all(d == 1 for d in ref.shape[2:]) and ref.shape[1] > 1:
            top1 = float(np.mean(np.argmax(got.reshape(len(got), -1), 1) == np.argmax(ref.reshape(len(ref), -1), 1)))
        rows.append(OutputDifference(name, float(finite.max()) if finite.size else 0.0,
                                     relative_l2(got, ref), top1))
    return rows
