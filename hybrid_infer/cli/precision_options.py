"""``--calibration CALIB`` and ``--keep-fp32 NAME_OR_TYPE ...``: the options that run the
TensorRT segments in a calibrated reduced precision (run, build, compare, export, diff),
and what ``run`` says about them."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Optional

from ..api import HybridNet
from ..inputs import Preprocessing

#: ``run --check``'s tolerance without a calibration.
FP32_TOLERANCE = 1e-4


def add_precision_options(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """``several``: compare measures one variant per calibration file."""
    g = parser.add_argument_group("reduced precision (files from hybrid-infer calibrate)")
    if several:
        g.add_argument("--calibration", type=Path, nargs="+", default=[], metavar="CALIB",
                       help="also measure the default partition in each file's precision (INT8 by method, "
                            "FP16), in the same table")
    else:
        g.add_argument("--calibration", type=Path, metavar="CALIB",
                       help="run the TensorRT segments in this calibration's precision (INT8 Q/DQ or FP16); "
                            "a file made for another model, weights or partition is refused")
    g.add_argument("--keep-fp32", nargs="+", default=[], metavar="NAME_OR_TYPE",
                   help="layers (names or types) that stay FP32 under --calibration")


def precision_input_checks(net: HybridNet, prep: Preprocessing, specs: Iterable[str]) -> list[str]:
    """Before inputs are read: refuse images preprocessed otherwise than the INT8 calibration's
    (OptionError); notes to print."""
    from ..precision.checks import check_preprocessing
    if net.precision is None or net.precision.calibration.precision != "int8":
        return []
    note = check_preprocessing(net.precision.calibration, prep, specs)
    return [note] if note else []


def check_tolerance(net: HybridNet, given: Optional[float]) -> tuple[float, str]:
    """``run --check``'s tolerance and, when a calibration chose it, why: twice the relative
    L2 that ``calibrate`` measured against Caffe FP32 (stored in the file), at least 1e-4; a
    reduced-precision run cannot meet FP32's 1e-4, and failing it says nothing."""
    if given is not None:
        return given, ""
    accuracy = (net.precision.calibration.accuracy or {}) if net.precision is not None else {}
    measured = accuracy.get("rel_l2")
    if net.precision is None or not isinstance(measured, (int, float)):
        return FP32_TOLERANCE, ("" if net.precision is None else
                                f"tolerance {FP32_TOLERANCE:g} (FP32's): {net.precision.calibration.path} holds no "
                                "measured error; expect reduced-precision rows ABOVE it, or pass --tolerance")
    tolerance = max(FP32_TOLERANCE, float(f"{2 * float(measured):.3g}"))
    return tolerance, (f"tolerance {tolerance:.3g}: twice the relative L2 that calibrate measured for "
                       f"{net.precision.label} ({measured:.3g} on {accuracy.get('inputs', '?')} "
                       f"{accuracy.get('on', 'inputs')}); --tolerance overrides it")


def precision_lines(net: HybridNet) -> list[str]:
    """What ``run`` prints about the calibration: the file, its measured error, and per
    segment what really runs reduced (``precision.report``)."""
    from ..precision.report import applied_lines
    plan = net.precision
    if plan is None:
        return []
    accuracy = plan.calibration.accuracy or {}
    measured = ""
    if isinstance(accuracy.get("rel_l2"), (int, float)):
        measured = (f"; calibrate measured relative L2 {accuracy['rel_l2']:.3g}"
                    + (f", top-1 agreement {accuracy['top1']:.1%}" if isinstance(accuracy.get("top1"), float) else "")
                    + (f", {accuracy['detections']:g} detection(s) differing" if isinstance(
                        accuracy.get("detections"), (int, float)) else "")
                    + f" against Caffe FP32 on {accuracy.get('inputs', '?')} {accuracy.get('on', 'inputs')}")
    return [f"  precision {plan.label} from {plan.calibration.path}{measured}",
            *applied_lines(net, integer_kernels=True)]
