"""Tensor ranges of one segment over the calibration inputs, by ONNX Runtime's calibrators.

``onnxruntime.quantization.calibrate`` does the statistics: ``minmax`` keeps the smallest
and largest value seen; ``entropy`` builds a histogram of each tensor and picks the
clipping threshold that minimises the KL divergence between the FP32 distribution and its
8-bit quantization (TensorRT's classic entropy calibrator, 2048 bins onto 128 levels);
``percentile`` clips at the 99.99th percentile of absolute values. Batches arrive one at a
time (``add``), so a large calibration set never sits in memory whole; only the histograms
(or running min/max) grow.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Collection, Mapping, Optional

import numpy as np
import onnx

#: Extra settings per method, in the calibrators' own keys.
_METHOD_OPTIONS: dict[str, dict[str, object]] = {
    "minmax": {},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.99, "symmetric": True},
}


def _quiet() -> contextlib.AbstractContextManager:
    """The histogram calibrators print their progress to stdout; ours is on stderr."""
    return contextlib.redirect_stdout(io.StringIO())


class _OneBatch:
    """A CalibrationDataReader that hands out one feed dict, once."""

    def __init__(self, feeds: Mapping[str, np.ndarray]):
        self._feeds: Optional[dict[str, np.ndarray]] = dict(feeds)

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        feeds, self._feeds = self._feeds, None
        return feeds


class RangeCollector:
    """Collects ranges of the float tensors of ``prepared`` (see ``qdq.prepare``) that the
    nodes named in ``nodes`` read or write (all nodes when None: an SSD's NMS tensors hold
    infinities, and nothing quantizes them).

    ``add(feeds)`` runs the segment on one batch of its inputs (value id -> FP32 array);
    ``ranges()`` returns tensor name -> (lowest, highest). Raises ValueError for an
    unknown method.
    """

    def __init__(self, prepared: onnx.ModelProto, method: str, nodes: Optional[Collection[str]] = None):
        from onnxruntime.quantization.calibrate import EntropyCalibrater, MinMaxCalibrater, PercentileCalibrater
        if method not in _METHOD_OPTIONS:
            raise ValueError(f"unknown calibration method '{method}'; choose one of {', '.join(_METHOD_OPTIONS)}")
        self._tmp = tempfile.TemporaryDirectory(prefix="hybrid_infer_calibrate_")
        path = Path(self._tmp.name) / "segment.onnx"
        onnx.save(prepared, str(path))
        classes = {"minmax": MinMaxCalibrater, "entropy": EntropyCalibrater, "percentile": PercentileCalibrater}
        # What onnxruntime.quantization.create_calibrator does, with the tensor selection
        # narrowed to the nodes that may be quantized before the graph is augmented.
        calibrator = classes[method](path, sorted({node.op_type for node in prepared.graph.node}),
                                     str(Path(self._tmp.name) / "augmented.onnx"), **_METHOD_OPTIONS[method])
        if nodes is not None:
            wanted = {name for node in prepared.graph.node if node.name in set(nodes)
                      for name in (*node.input, *node.output)}
            select = calibrator.select_tensors_to_calibrate

            def narrowed(model: onnx.ModelProto) -> tuple[set[str], dict]:
                tensors, value_infos = select(model)
                return tensors & wanted, value_infos
            calibrator.select_tensors_to_calibrate = narrowed
        calibrator.augment_graph()
        calibrator.create_inference_session()
        self._calibrator = calibrator
        self.batches = 0

    def add(self, feeds: Mapping[str, np.ndarray]) -> None:
        with _quiet():
            self._calibrator.collect_data(_OneBatch(feeds))
        self.batches += 1

    def ranges(self) -> dict[str, tuple[float, float]]:
        if not self.batches:
            raise ValueError("no calibration batch was added")
        with _quiet():
            data = self._calibrator.compute_data()
        result = {}
        for name, tensor in data.data.items():
            lo, hi = tensor.range_value
            result[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
        return result

    def close(self) -> None:
        self._calibrator = None
        self._tmp.cleanup()
