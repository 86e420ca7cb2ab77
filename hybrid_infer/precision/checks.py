"""Checks of a run's inputs against what its calibration was made on.

INT8 clips every value outside its calibrated range, so inputs preprocessed otherwise than
the calibration inputs (another ``--scale`` or ``--mean``, another channel order) give
wrong answers without any error. The calibration file records the image preprocessing
(``inputs.preprocessing``, only when images were read) and the range of every net input
that a TensorRT segment reads; a run that reads images with other preprocessing is refused,
and inputs far outside the calibrated range are reported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

from ..errors import OptionError
from ..inputs import IMAGE_SUFFIXES, Preprocessing
from .calibration_file import Calibration

#: Preprocessing fields and the options that set them.
_OPTIONS = {"scale": "--scale", "mean": "--mean", "channel_order": "--channel-order", "resize": "--resize"}


def reads_images(specs: Iterable[str]) -> bool:
    """Whether any ``--input`` spec ([NAME=]FILE) names an image (preprocessing applies)."""
    return any(Path(spec.partition("=")[2] or spec).suffix.lower() in IMAGE_SUFFIXES for spec in specs)


def _option_text(field: str, value: object) -> str:
    if value is None or value == [] or value == ():
        return f"no {_OPTIONS[field]}"
    if isinstance(value, (list, tuple)):
        return f"{_OPTIONS[field]} {' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value)}"
    return f"{_OPTIONS[field]} {value:g}" if isinstance(value, float) else f"{_OPTIONS[field]} {value}"


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        a, b = list(a or []), list(b or [])  # type: ignore[call-overload]
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-6 * max(abs(float(a)), abs(float(b)), 1e-30)
    return a == b


def check_preprocessing(calibration: Calibration, prep: Preprocessing, specs: Iterable[str]) -> Optional[str]:
    """Refuse (OptionError naming each differing option) a run that reads images with other
    preprocessing than the calibration's images had; a note (or None) where one side read
    ``.npy`` arrays, whose preprocessing cannot be compared."""
    if not reads_images(specs):
        return None
    stored = calibration.inputs.get("preprocessing")
    if not isinstance(stored, dict):
        return (f"note: {calibration.path} was calibrated on .npy arrays; these images are preprocessed with "
                f"{', '.join(_option_text(f, getattr(prep, f)) for f in _OPTIONS)}: make sure the arrays were "
                "prepared the same way (INT8 clips values outside the calibrated range)")
    differ = [(f, stored.get(f), getattr(prep, f)) for f in _OPTIONS if not _same(stored.get(f), getattr(prep, f))]
    if differ:
        raise OptionError(
            f"{calibration.path} was calibrated on images preprocessed with "
            f"{', '.join(_option_text(f, a) for f, a, _ in differ)}, this run uses "
            f"{', '.join(_option_text(f, b) for f, _, b in differ)}: INT8 ranges hold only for inputs prepared the "
            "same way; pass the same options, or calibrate again with these")
    return None


def out_of_range(calibration: Calibration, feeds: Mapping[str, np.ndarray], factor: float = 2.0,
                 sliver: float = 16.0) -> list[str]:
    """Warnings for net inputs (value id -> array) of an INT8 calibration reaching beyond
    ``factor`` times the largest magnitude of their calibrated range (most of such an input
    clips), or staying within 1/``sliver`` of it (it quantizes to a few levels: 0..1 inputs on
    a 0..255 calibration turned LeNet's 97.8% into 50-75%, found in review)."""
    if calibration.precision != "int8":
        return []
    warnings = []
    for name, array in feeds.items():
        ranges = [s.ranges[name] for s in calibration.segments if name in s.ranges]
        if not ranges or not array.size:
            continue
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        bound = max(-lo, hi)
        seen_lo, seen_hi = float(np.min(array)), float(np.max(array))
        seen = max(-seen_lo, seen_hi)
        if seen > factor * bound:
            warnings.append(f"input '{name}' spans [{seen_lo:.4g}, {seen_hi:.4g}], but {calibration.path} "
                            f"was calibrated on inputs within [{lo:.4g}, {hi:.4g}]: values outside clip in INT8 "
                            "(other preprocessing than the calibration inputs'?)")
        elif 0 < seen < bound / sliver:
            warnings.append(f"input '{name}' spans only [{seen_lo:.4g}, {seen_hi:.4g}], but {calibration.path} "
                            f"was calibrated on inputs within [{lo:.4g}, {hi:.4g}]: it falls on a few INT8 levels "
                            "(other preprocessing than the calibration inputs'?)")
    return warnings
