"""OpenVINO runs a TensorRT segment's ONNX on the CPU (the alternative to ONNX Runtime there).

OpenVINO reads ONNX itself (its ONNX front end), so the segment's ONNX is handed over as
bytes and compiled for the "CPU" device. Two settings are made explicit rather than left
to OpenVINO's defaults:

- precision: on CPUs with BF16 support (avx512_bf16, AMX) OpenVINO's CPU plugin runs FP32
  models in BF16 unless told otherwise (``INFERENCE_PRECISION_HINT`` defaults to bf16
  there), which would break the 1e-5 agreement with Caffe. FP32 is set unless the caller
  asks for BF16, and the engine says which one it runs (``precision``).
- threads: ``INFERENCE_NUM_THREADS`` is the thread count the user allows (default: every
  CPU this process may run on), one stream, latency mode: one request at a time, as the
  executor runs segments.

One deviation of OpenVINO's ONNX reader is corrected before compiling: it makes ONNX TopK an
unstable sort, while ONNX puts the lower index first among equal values (and Caffe's ArgMax
lowering relies on that order; see ``_stable_top_k``).

The batch axis stays dynamic (the lowering names it "batch"), so one compiled model serves
every batch size. A segment OpenVINO cannot read or compile raises ``EngineRejected``
naming the Caffe layers of the ONNX nodes it complained about, so the executor moves
those (or the whole segment) to Caffe.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import numpy as np
import onnx

from ..errors import EngineRejected, OptionError
from ..lowering.segment_to_onnx import layers_named_in
from .host_cpu import allowed_threads

#: Precisions the engine offers: FP32 (matches Caffe) and BF16 (reduced precision).
PRECISIONS = ("f32", "bf16")


def runtime_available() -> tuple[bool, str]:
    """Whether the ``openvino`` package imports and has a CPU device, and why (not)."""
    try:
        core = _core()
    except ImportError:
        return False, "the openvino package is not installed (pip install 'hybrid_infer[openvino]')"
    if "CPU" not in core.available_devices:
        return False, f"OpenVINO {version()} has no CPU device here"
    return True, f"OpenVINO {version()}"


def version() -> str:
    """OpenVINO's release, e.g. "2026.4.1" (the build suffix dropped)."""
    import openvino
    return openvino.get_version().split("-")[0]


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin can compute in BF16 on this CPU (avx512_bf16 or AMX)."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@functools.lru_cache(maxsize=1)
def _core() -> Any:
    """One ``openvino.Core`` per process: each Core loads its own copy of the CPU plugin."""
    import openvino
    return openvino.Core()


def _message(exc: Exception) -> str:
    """OpenVINO's error without its source-location lines ("Exception from src/...")."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Exception from ", "Check '"))
            and not line.startswith("To facilitate")]
    return " ".join(kept) or (lines[0] if lines else exc.__class__.__name__)


def _unconverted_layers(message: str, model: onnx.ModelProto) -> list[str]:
    """The Caffe layers (ONNX ``doc_string``) of the nodes whose operator OpenVINO's ONNX reader
    has no conversion for: it names operators, not nodes ("No conversion rule found for
    operations: NoSuchOp-17")."""
    unconverted = set(re.findall(r"([A-Za-z][\w.]*)-\d+", message.partition("operations:")[2]))
    return list(dict.fromkeys(n.doc_string for n in model.graph.node if n.op_type in unconverted and n.doc_string))


def _stable_top_k(model: Any) -> None:
    """Make every TopK of an OpenVINO model a stable sort, in place.

    ONNX TopK returns, among equal values, the lower index first; OpenVINO's ONNX reader
    emits TopK (opset 11) with ``stable`` false, so ties come back in any order (measured:
    eight equal values gave indices 1, 2, 0 for k = 3). ``stable`` true restores ONNX's order.
    """
    for op in model.get_ordered_ops():
        if op.get_type_name() == "TopK" and "stable" in op.get_attributes():
            op.set_attribute("stable", True)


class OpenVinoEngine:
    """One compiled OpenVINO model and one infer request per segment, reused for every run.

    ``model``: the segment's ONNX (inputs and outputs FP32, NCHW or whatever layout Caffe's
    blobs have, named by value id). ``threads``: 0 means every CPU this process may use.
    ``precision``: "f32" (default) or "bf16"; BF16 on a CPU without BF16 support is refused
    with an ``OptionError`` rather than silently run in FP32.

    Raises ``EngineRejected`` (with ``caffe_layers``) when OpenVINO cannot read or compile
    the segment.
    """

    kind = "openvino"

    def __init__(self, model: onnx.ModelProto, *, threads: int = 0, precision: str = "f32"):
        import openvino
        import openvino.properties as props
        import openvino.properties.hint as hints
        if precision not in PRECISIONS:
            raise OptionError(f"OpenVINO precision '{precision}': choose one of {', '.join(PRECISIONS)}")
        if precision == "bf16" and not bf16_supported():
            raise OptionError("BF16 was asked for, but OpenVINO cannot compute in BF16 on this CPU "
                              "(it needs avx512_bf16 or AMX); run without --bf16")
        #: "f32" or "bf16": what the segment computes in (inputs and outputs are FP32 either way).
        self.precision = precision
        self.threads = threads or allowed_threads()
        config = {
            hints.inference_precision(): openvino.Type.bf16 if precision == "bf16" else openvino.Type.f32,
            hints.performance_mode(): hints.PerformanceMode.LATENCY,
            props.inference_num_threads(): self.threads,
            props.streams.num(): 1,
        }
        core = _core()
        try:
            ov_model = core.read_model(model.SerializeToString())
            _stable_top_k(ov_model)
            compiled = core.compile_model(ov_model, "CPU", config)
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for every read/compile failure
            message = _message(exc)
            named = layers_named_in(message, model) + _unconverted_layers(message, model)
            raise EngineRejected(f"OpenVINO rejected the segment: {message}", list(dict.fromkeys(named))) from exc
        self._compiled = compiled
        self._model = model  # its node names trace a run-time failure back to a Caffe layer
        self._request = compiled.create_infer_request()
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = [o.name for o in model.graph.output]
        # Ports by the ONNX names: a port may carry several tensor names (an output that
        # OpenVINO folded into another value), so it is looked up, not asked for its name.
        # An input only read for its shape (Crop's reference) is dropped by OpenVINO, which
        # has the shape already; it is accepted and ignored.
        used = {name for port in compiled.inputs for name in port.get_names()}
        self._inputs = [(name, compiled.input(name)) for name in self.input_names if name in used]
        self._outputs = [(name, compiled.output(name)) for name in self.output_names]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Outputs are views of the request's buffers, overwritten by the next run (the
        # executor copies what it keeps); inputs are read in place.
        try:
            results = self._request.infer({port: feeds[name] for name, port in self._inputs},
                                          share_inputs=True, share_outputs=True)
        except RuntimeError as exc:  # a shape a node cannot take at this batch, memory, ...
            message = _message(exc)
            named = layers_named_in(message, self._model)
            raise EngineRejected(f"OpenVINO failed running{f' layer {named[0]!r}' if named else ' the segment'}: "
                                 f"{message}", named) from exc
        return {name: results[port] for name, port in self._outputs}

    def close(self) -> None:
        self._request = None
        self._compiled = None
