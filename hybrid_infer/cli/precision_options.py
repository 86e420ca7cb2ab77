"""``--calibration CALIB`` and ``--keep-fp32 NAME_OR_TYPE ...``: the options that run the
TensorRT segments in a calibrated reduced precision (run, build, compare)."""
from __future__ import annotations

import argparse
from pathlib import Path


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
