"""A precision plan: a calibration file plus the layers kept in FP32, applied per segment.

``HybridNet(calibration=...)`` builds one and hands ``segment_model`` to the engine
factory, which passes every TensorRT segment's FP32 ONNX through it before the engine is
built: TensorRT gets the symmetric Q/DQ ONNX (or the FP16 one) and builds an INT8 (FP16)
engine, ONNX Runtime gets the CPU placement of the same ranges. The plan refuses, with a
``CalibrationError`` that says to re-run ``hybrid-infer calibrate``, a calibration made for
another prototxt, other weights, or a segment whose ONNX is not the one calibrated.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable, Optional

from ..errors import CalibrationError, OptionError
from ..graph.layer_graph import LayerGraph
from .calibration_file import Calibration, check_model, model_identity, sha256_bytes
from .qdq import ONNXRUNTIME, TENSORRT, prepare, quantize

if TYPE_CHECKING:
    import onnx

    from ..model.caffe_model import CaffeModel
    from ..partition.partitioner import Segment

log = logging.getLogger("hybrid_infer.precision")

#: Layer types whose nodes carry Q/DQ (or FP16 math) worth keeping in FP32 by name.
QUANTIZABLE_TYPES = ("Convolution", "Deconvolution", "InnerProduct", "Eltwise")
#: Layers the CPU placement also runs on 8-bit tensors, passing them between the quantized
#: ones without a round trip through float (ONNX Runtime has integer kernels for them).
#: Everything else in a TensorRT segment stays float there: Softmax, LRN, Power, PriorBox
#: and DetectionOutput's decoding and NMS (box coordinates in 8 bits move whole pixels).
CPU_INTEGER_TYPES = QUANTIZABLE_TYPES + ("ReLU", "Pooling", "Concat", "Flatten", "Reshape", "Permute",
                                         "BatchNorm", "Scale", "Split", "Dropout")


def resolve_layers(graph: LayerGraph, names_or_types: Iterable[str], option: str = "--keep-fp32") -> set[str]:
    """Caffe layer names for a list of layer names or types; an unknown one is an OptionError."""
    layers: set[str] = set()
    for item in names_or_types:
        matched = {name for name, layer in graph.layers.items() if name == item or layer.type == item}
        if not matched:
            raise OptionError(f"{option} {item}: no layer of {graph.model.prototxt} has that name or type")
        layers |= matched
    return layers


def onnx_digest(model: "onnx.ModelProto") -> str:
    return sha256_bytes(model.SerializeToString(deterministic=True))


def body_digest(model: "onnx.ModelProto") -> str:
    """Digest of ``model`` without its output list (same nodes, weights and inputs)."""
    import onnx
    body = onnx.ModelProto()
    body.CopyFrom(model)
    del body.graph.output[:]
    return onnx_digest(body)


def quantizable_layers(graph: LayerGraph, layers: Iterable[str]) -> list[str]:
    """The layers among ``layers`` (in order) that reduced precision changes, by name."""
    return [name for name in layers if graph.layers[name].type in QUANTIZABLE_TYPES]


class PrecisionPlan:
    """How TensorRT segments run in reduced precision, for one loaded model: the
    calibration and the Caffe layers kept in FP32 (``create`` checks and resolves them)."""

    def __init__(self, calibration: Calibration, graph: LayerGraph, keep_layers: Iterable[str] = ()):
        self.calibration = calibration
        self.graph = graph
        #: Caffe layer names whose nodes stay FP32.
        self.keep_fp32 = set(keep_layers)

    @classmethod
    def create(cls, calibration: Calibration, model: "CaffeModel", graph: LayerGraph,
               keep_fp32: Iterable[str] = ()) -> "PrecisionPlan":
        """Check that ``calibration`` belongs to ``model`` (prototxt and weights) and resolve
        the layer names or types to keep in FP32 (the file's own, plus ``keep_fp32``)."""
        check_model(calibration, model_identity(model.net.SerializeToString(deterministic=True), model.weights),
                    str(model.prototxt))
        keep = resolve_layers(graph, calibration.keep_fp32, "the calibration's keep_fp32") | \
            resolve_layers(graph, keep_fp32)
        return cls(calibration, graph, keep)

    @property
    def label(self) -> str:
        return self.calibration.label

    def with_keep_fp32(self, layers: Iterable[str]) -> "PrecisionPlan":
        """The same calibration with exactly ``layers`` (names) kept in FP32 (sensitivity search)."""
        return PrecisionPlan(self.calibration, self.graph, layers)

    def segment_model(self, fp32: "onnx.ModelProto", segment: "Segment", engine: str) -> "onnx.ModelProto":
        """The ONNX ``engine`` ("tensorrt" or "onnxruntime") runs for ``segment`` instead of ``fp32``."""
        entry = self.calibration.segment_for(onnx_digest(fp32), body_digest(fp32))
        if entry is None:
            same_layers = any(s.layers == list(segment.layers) for s in self.calibration.segments)
            why = ("the same layers, but its ONNX differs (other output blobs or input shapes)" if same_layers
                   else "the partition differs")
            raise CalibrationError(
                f"{self.calibration.path} is stale: TensorRT segment {segment.id} ({len(segment.layers)} layers, "
                f"{segment.layers[0]} .. {segment.layers[-1]}) is not one it was calibrated for ({why}); run "
                f"hybrid-infer calibrate again with the options you run with (it was made with "
                f"{self._partition_text()})")
        kept = self.keep_fp32 & set(segment.layers)
        if self.calibration.precision == "int8":
            target = TENSORRT if engine == "tensorrt" else ONNXRUNTIME
            types = QUANTIZABLE_TYPES if target == TENSORRT else CPU_INTEGER_TYPES
            allowed = [name for name in segment.layers if self.graph.layers[name].type in types]
            try:
                model = quantize(prepare(fp32), entry.ranges, target, kept, allowed)
            except ValueError as exc:  # ONNX Runtime's quantizer: a tensor without a calibrated range
                raise CalibrationError(
                    f"{self.calibration.path} is stale for segment {segment.id}: {exc} (the segment asks for "
                    "other outputs than it was calibrated with); run hybrid-infer calibrate again with the "
                    f"options you run with (it was made with {self._partition_text()})") from None
        else:
            model = to_half(fp32, kept)
        log.info("segment %d: %s for %s (%d layer(s) kept in FP32)", segment.id, self.label, engine, len(kept))
        return model

    def _partition_text(self) -> str:
        p = self.calibration.partition
        return (f"--profile {p.get('profile')} --min-segment-size {p.get('min_segment_size')}"
                + (f" --fallback {' '.join(p['fallback'])}" if p.get("fallback") else "")
                + "".join(f" --output-blob {blob}" for blob in p.get("outputs", ())))


def to_half(fp32: "onnx.ModelProto", kept_layers: Iterable[str]) -> "onnx.ModelProto":
    """FP16 copy of ``fp32`` with FP32 inputs and outputs, by ONNX Runtime's float16
    converter; nodes of ``kept_layers`` stay FP32 (the converter casts around them)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    kept = set(kept_layers)
    blocked = [node.name for node in fp32.graph.node if node.doc_string in kept]
    return convert_float_to_float16(fp32, keep_io_types=True, node_block_list=blocked)


def plan_for(calibration: Optional[object], model: "CaffeModel", graph: LayerGraph,
             keep_fp32: Iterable[str] = ()) -> Optional[PrecisionPlan]:
    """A plan from a path, a loaded ``Calibration`` or a plan (None: FP32); ``--keep-fp32``
    alone is an error."""
    from .calibration_file import load_calibration
    keep = list(keep_fp32)
    if calibration is None:
        if keep:
            raise OptionError("--keep-fp32 chooses layers to leave out of reduced precision: it needs "
                              "--calibration CALIB (made by hybrid-infer calibrate)")
        return None
    if isinstance(calibration, PrecisionPlan):
        return calibration.with_keep_fp32(calibration.keep_fp32 | resolve_layers(graph, keep))
    loaded = calibration if isinstance(calibration, Calibration) else load_calibration(calibration)  # type: ignore[arg-type]
    return PrecisionPlan.create(loaded, model, graph, keep)
