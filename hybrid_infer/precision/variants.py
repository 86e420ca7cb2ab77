"""Precision variants for ``compare``: the calibration's partition, in its precision, measured
against pure Caffe FP32 in the same table as the FP32 partitions."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..analysis.compare import PartitionResult, measure_partition
from ..analysis.partition_spec import PartitionSpec
from ..api import HybridNet
from ..model.caffe_model import CaffeModel
from .calibration_file import load_calibration


def spec_of(partition: Mapping[str, object]) -> PartitionSpec:
    """The partition a calibration file was made with, as a compare spec."""
    return PartitionSpec(profile=str(partition.get("profile", "tensorrt")),
                         min_segment_size=int(partition.get("min_segment_size", 3)),  # type: ignore[arg-type]
                         fallback=tuple(partition.get("fallback", ())))  # type: ignore[arg-type]


def measure_precisions(model: CaffeModel, calibrations: Sequence[Path], inputs: Mapping[str, np.ndarray],
                       reference: Mapping[str, np.ndarray], *, engine: str = "auto", outputs: Sequence[str] = (),
                       keep_fp32: Sequence[str] = (), runs: int = 20, warmup: int = 3,
                       tolerance: float = math.inf,
                       tick: Optional[Callable[[], None]] = None) -> list[PartitionResult]:
    """One result per calibration file: its partition with its precision, timed unless its
    error against ``reference`` (pure Caffe FP32) exceeds ``tolerance`` (default: always timed).
    A stale file raises ``CalibrationError`` before anything is measured."""
    nets = []
    for path in calibrations:
        calibration = load_calibration(path)
        spec = spec_of(calibration.partition)
        nets.append((spec, calibration.label,
                     HybridNet(model, engine=engine, profile=spec.profile, min_segment_size=spec.min_segment_size,
                               fallback=spec.fallback, outputs=outputs, calibration=calibration,
                               keep_fp32=keep_fp32)))
    results = []
    for spec, label, net in nets:
        with net:
            result = measure_partition(net, spec, inputs, reference, tolerance=tolerance, runs=runs,
                                       warmup=warmup, tick=tick)
        result.variant = label
        results.append(result)
    return results
