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
from ..detections import DETECTION_TOLERANCE
from ..executor.engine_factory import segment_onnx
from ..model.caffe_model import CaffeModel
from ..partition.partitioner import TENSORRT
from .calibration_file import load_calibration

Variant = tuple[PartitionSpec, str, HybridNet]


def spec_of(partition: Mapping[str, object]) -> PartitionSpec:
    """The partition a calibration file was made with, as a compare spec."""
    return PartitionSpec(profile=str(partition.get("profile", "tensorrt")),
                         min_segment_size=int(partition.get("min_segment_size", 3)),  # type: ignore[arg-type]
                         fallback=tuple(partition.get("fallback", ())))  # type: ignore[arg-type]


def open_precisions(model: CaffeModel, calibrations: Sequence[Path], *, engine: str = "auto",
                    outputs: Sequence[str] = (), keep_fp32: Sequence[str] = ()) -> list[Variant]:
    """One hybrid per calibration file, in the file's partition and precision, with every
    file checked now (``CalibrationError``: unreadable, other model, or a TensorRT segment it
    has no ranges for), before anything is measured."""
    variants = []
    for path in calibrations:
        calibration = load_calibration(path)
        spec = spec_of(calibration.partition)
        net = HybridNet(model, engine=engine, profile=spec.profile, min_segment_size=spec.min_segment_size,
                        fallback=spec.fallback, outputs=outputs, calibration=calibration, keep_fp32=keep_fp32,
                        keep_logits=True)
        assert net.precision is not None
        net.precision.check_segments([s for s in net.partition.segments if s.backend == TENSORRT],
                                     lambda segment: segment_onnx(net.graph, model, segment))
        variants.append((spec, calibration.label, net))
    return variants


def measure_precisions(variants: Sequence[Variant], inputs: Mapping[str, np.ndarray],
                       reference: Mapping[str, np.ndarray], *, runs: int = 20, warmup: int = 3,
                       tolerance: float = math.inf,
                       tick: Optional[Callable[[], None]] = None) -> list[PartitionResult]:
    """One result per variant (``open_precisions``), timed unless its error against
    ``reference`` (pure Caffe FP32's ``HybridNet.reference_values``: outputs and Softmax
    inputs, by value id) exceeds ``tolerance`` (default: always timed)."""
    results = []
    for spec, label, net in variants:
        with net:
            result = measure_partition(net, spec, inputs, reference, tolerance=tolerance, runs=runs,
                                       warmup=warmup, tick=tick, detection_tolerance=DETECTION_TOLERANCE)
        result.variant = label
        results.append(result)
    return results
