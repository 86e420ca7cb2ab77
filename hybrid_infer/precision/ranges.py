"""Tensor ranges of one segment over the calibration inputs, by ONNX Runtime's calibrators.

``onnxruntime.quantization.calibrate`` does the statistics: ``minmax`` keeps the smallest
and largest value seen; ``entropy`` builds a histogram of each tensor and picks the
clipping threshold that minimises the KL divergence between the FP32 distribution and its
quantization. Exactly: ONNX Runtime histograms the *signed* values over [-max|x|, max|x|] in
2048 bins (1024 per sign; widened when a later batch reaches further), tries every
symmetric window of 64 to 1024 bins per side, merges each into 128 levels (64 per sign) and
keeps the window with the least KL divergence, clipped to the values seen (a ReLU output's
range starts at 0). TensorRT's own entropy calibrator histograms |x| in 2048 bins and merges
onto 128 levels per sign, so ONNX Runtime's search models half TensorRT's resolution and
tends to clip harder;
``percentile`` clips at the 99.99th percentile of absolute values. Batches arrive one at a
time (``add``), so a large calibration set never sits in memory whole; only the histograms
(or running min/max) grow.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Callable, Collection, Mapping, Optional

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


class NonFiniteTensor(ValueError):
    """A tensor to calibrate held NaN or Inf on a calibration batch (``tensor`` names it)."""

    def __init__(self, tensor: str):
        super().__init__(f"tensor '{tensor}' holds NaN or Inf")
        self.tensor = tensor


class _CheckedSession:
    """The calibrator's inference session, refusing a batch where a tensor to calibrate is
    not finite: the calibrators would fail later without naming it (min/max: "scale issue";
    histograms: "supplied range ... is not finite"). ``tensors`` maps the session's output
    names to the tensors they show (min/max outputs are ``T_ReduceMin``/``T_ReduceMax``)."""

    def __init__(self, session, tensors: Mapping[str, str]):
        self._session = session
        self._tensors = dict(tensors)

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    def run(self, output_names, feeds):
        results = self._session.run(output_names, feeds)
        names = output_names or [o.name for o in self._session.get_outputs()]
        for name, array in zip(names, results):
            if name in self._tensors and not np.isfinite(array).all():
                raise NonFiniteTensor(self._tensors[name])
        return results


class RangeCollector:
    """Collects ranges of the float tensors of ``prepared`` (see ``qdq.prepare``) that the
    nodes named in ``nodes`` read or write (all nodes when None: an SSD's NMS tensors hold
    infinities, and nothing quantizes them).

    ``add(feeds)`` runs the segment on one batch of its inputs (value id -> FP32 array) and
    raises ``NonFiniteTensor`` when a tensor to calibrate holds NaN or Inf; ``ranges()``
    returns tensor name -> (lowest, highest), calling ``tick`` after each tensor's threshold
    search (the entropy method's is slow: about 0.4 s per tensor). Raises ValueError for an
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
        selected = calibrator.select_tensors_to_calibrate(calibrator.model)[0]
        calibrator.augment_graph()
        calibrator.create_inference_session()
        if method == "minmax":
            shown = {f"{t}_{op}": t for t in selected for op in ("ReduceMin", "ReduceMax")}
        else:
            shown = {t: t for t in selected}
        calibrator.infer_session = _CheckedSession(calibrator.infer_session, shown)
        self.method = method
        #: How many tensors get a range (``ranges`` ticks once per tensor for entropy).
        self.tensor_count = len(set(shown.values()))
        self._calibrator = calibrator
        self.batches = 0

    def add(self, feeds: Mapping[str, np.ndarray]) -> None:
        with _quiet():
            self._calibrator.collect_data(_OneBatch(feeds))
        self.batches += 1

    def ranges(self, tick: Optional[Callable[[], None]] = None) -> dict[str, tuple[float, float]]:
        if not self.batches:
            raise ValueError("no calibration batch was added")
        collector = getattr(self._calibrator, "collector", None)
        if tick is not None and collector is not None and self.method == "entropy":
            search = collector.get_entropy_threshold

            def searched(*args, **kwargs):
                found = search(*args, **kwargs)
                tick()
                return found
            collector.get_entropy_threshold = searched
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
