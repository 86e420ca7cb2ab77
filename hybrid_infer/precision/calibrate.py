"""Calibration: run the FP32 hybrid on the user's inputs and record each TensorRT segment's ranges.

A TensorRT segment's inputs may be produced by Caffe segments upstream (an SSD head after
a Caffe layer, a backbone after a Python layer), so they are taken from the hybrid itself:
each batch of calibration inputs runs through the FP32 hybrid (``HybridNet.run_values``),
and every TensorRT segment's input tensors are handed to that segment's range collector.
Batches are processed one at a time, so memory follows one batch, not the set.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..api import HybridNet
from ..errors import InputError, OptionError
from ..executor.engine_factory import segment_onnx
from ..partition.partitioner import TENSORRT, Segment
from .calibration_file import (METHODS, PRECISIONS, Calibration, SegmentCalibration, as_layer_list, model_identity,
                               range_problem, widened)
from .plan import CPU_INTEGER_TYPES, FP32_ALWAYS_TYPES, body_digest, onnx_digest, resolve_layers
from .qdq import prepare
from .ranges import NonFiniteTensor, RangeCollector

log = logging.getLogger("hybrid_infer.precision")

Batch = Mapping[str, np.ndarray]


def batches_of(inputs: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """Split input arrays (blob -> N x ...) into batches of at most ``size`` items."""
    if size < 1:
        raise OptionError(f"calibration batch size must be at least 1, not {size}")
    count = next(iter(inputs.values())).shape[0]
    return [{name: array[start:start + size] for name, array in inputs.items()}
            for start in range(0, count, size)]


def tensorrt_segments(net: HybridNet) -> list[Segment]:
    """The segments that run on TensorRT (or ONNX Runtime in its place) after engines are built:
    an engine that refused layers may have re-cut the partition."""
    return [se.segment for se in net.segment_engines
            if se.segment.backend == TENSORRT and se.fallback_note is None]


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("hybrid_infer", "onnxruntime", "onnx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def check_finite(arrays: Mapping[str, np.ndarray], what: str, where: str = "") -> None:
    """Raise ``InputError`` naming the first array of ``arrays`` (name -> N x ...) holding NaN
    or Inf, and its first such item (``where``: more about where it came from): calibration
    would fail on it later without saying where."""
    for name, array in arrays.items():
        bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1) if array.ndim else ~np.isfinite(array)
        if bad.any():
            item = int(np.flatnonzero(bad)[0])
            raise InputError(f"{what} '{name}' holds NaN or Inf (item {item}{where}): calibration needs "
                             "finite values; remove that input or fix its preprocessing")


def _calibrated_nodes(net: HybridNet, segment: Segment, precision: str, prepared) -> list[str]:
    """Nodes whose tensors get ranges: those of layers the CPU placement may run on 8 bits
    (INT8), or every layer but SSD's box decoding and NMS (FP16: to find overflows); an
    SSD's NMS holds infinities, which the histogram calibrators reject."""
    if precision == "int8":
        layers = {n for n in segment.layers if net.graph.layers[n].type in CPU_INTEGER_TYPES}
    else:
        layers = {n for n in segment.layers if net.graph.layers[n].type not in FP32_ALWAYS_TYPES}
    return [node.name for node in prepared.graph.node if node.doc_string in layers]


def calibrate(net: HybridNet, batches: Iterable[Batch], *, precision: str = "int8", method: str = "entropy",
              keep_fp32: Sequence[str] = (), partition_options: Optional[Mapping[str, object]] = None,
              input_note: Optional[Mapping[str, object]] = None,
              tick: Optional[Callable[[], None]] = None,
              search_tick: Optional[Callable[[int], Callable[[], None]]] = None) -> Calibration:
    """Calibrate ``net`` (an FP32 hybrid) on ``batches`` (blob -> N x C x H x W FP32 arrays).

    INT8 records the ranges ``method`` finds (ONNX Runtime's calibrators); FP16 records the
    min/max of every tensor, which says where a value leaves the FP16 range (65504). Ranges
    are widened to contain 0. ``keep_fp32`` (layer names or types) is stored in the file.
    ``tick`` follows each batch; ``search_tick(n)`` is called before the threshold search
    with the number of tensors and returns the callable to tick after each.
    Raises OptionError for an unknown precision or method, or a model without TensorRT
    segments; InputError for calibration inputs (or segment inputs made from them upstream,
    or tensors inside a segment) holding NaN or Inf, naming it.
    """
    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and method not in METHODS:
        raise OptionError(f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}")
    if net.precision is not None:
        raise OptionError("calibration runs the FP32 hybrid: load the model without a calibration")
    keep_fp32 = as_layer_list(keep_fp32, "keep_fp32")
    resolve_layers(net.graph, keep_fp32)  # names checked before the long part
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise OptionError("calibration needs at least one input")
    segments = tensorrt_segments(net)  # builds the engines first
    if not segments:
        raise OptionError(f"{net.model.prototxt}: no TensorRT segment to calibrate (every layer runs in Caffe)")
    wanted = sorted({v for s in segments for v in s.inputs})
    collectors, digests = {}, {}
    effective = method if precision == "int8" else "minmax"
    for segment in segments:
        fp32 = segment_onnx(net.graph, net.model, segment)
        digests[segment.id] = (onnx_digest(fp32), body_digest(fp32))
        prepared = prepare(fp32)
        collectors[segment.id] = RangeCollector(prepared, effective,
                                                _calibrated_nodes(net, segment, precision, prepared))
    input_digest = hashlib.sha256()
    count = 0
    try:
        batch: Optional[Batch] = first
        while batch is not None:
            checked = net.check_inputs(batch)
            check_finite(checked, "calibration input")
            for name in sorted(checked):
                input_digest.update(name.encode() + checked[name].tobytes())
            count += next(iter(checked.values())).shape[0]
            values = net.run_values(checked, wanted)
            for segment in segments:
                feeds = {v: values[v] for v in segment.inputs}
                check_finite(feeds, f"segment {segment.id}'s input (computed from the calibration inputs)")
                try:
                    collectors[segment.id].add(feeds)
                except NonFiniteTensor as exc:
                    raise InputError(f"tensor '{exc.tensor}' of segment {segment.id} holds NaN or Inf on the "
                                     "calibration inputs (the FP32 net overflows there): calibration needs finite "
                                     "values; check the weights and the inputs' preprocessing") from None
            if tick:
                tick()
            batch = next(iterator, None)
        entries = [_entry(s, digests[s.id], collectors[s.id], search_tick) for s in segments]
    finally:
        for collector in collectors.values():
            collector.close()
    model = net.model
    identity = model_identity(model.net, model.weights, net.input_shapes())
    return Calibration(
        precision=precision, method=method if precision == "int8" else None,
        model={"prototxt": str(model.prototxt),
               "weights": str(model.weights_path) if model.weights_path else None, **identity},
        partition=dict(partition_options or {"profile": net.partition.profile,
                                             "min_segment_size": net.partition.min_segment_size}),
        inputs={"count": count, "sha256": input_digest.hexdigest(), **(input_note or {})},
        segments=entries, keep_fp32=list(keep_fp32), tools=_versions())


def _entry(segment: Segment, digests: tuple[str, str], collector: RangeCollector,
           search_tick: Optional[Callable[[int], Callable[[], None]]]) -> SegmentCalibration:
    """The segment's file entry: its ranges, widened to contain 0 and checked."""
    tick = search_tick(collector.tensor_count) if search_tick and collector.method == "entropy" else None
    ranges = {name: widened(lo, hi) for name, (lo, hi) in collector.ranges(tick).items()}
    for name, value in ranges.items():
        problem = range_problem(value)
        if problem:
            raise InputError(f"tensor '{name}' of segment {segment.id}: its calibrated range {problem}; the FP32 net's "
                             "values there cannot be quantized (check the weights and the inputs' preprocessing)")
    return SegmentCalibration(segment.id, list(segment.layers), digests[0], ranges, digests[1])


def fp16_overflow(calibration: Calibration, limit: float = 65504.0) -> list[str]:
    """Tensors whose calibrated range leaves FP16's finite range (they would become inf)."""
    return [name for s in calibration.segments for name, (lo, hi) in s.ranges.items()
            if max(abs(lo), abs(hi)) > limit]
