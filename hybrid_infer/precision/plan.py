"""A precision plan: a calibration file plus the layers kept in FP32, applied per segment.

``HybridNet(calibration=...)`` builds one and hands ``segment_model`` to the engine
factory, which passes every TensorRT segment's FP32 ONNX through it before the engine is
built: TensorRT gets the symmetric Q/DQ ONNX (or the FP16 one) and builds an INT8 (FP16)
engine, ONNX Runtime gets the CPU placement of the same ranges (or FP16 emulated, see
``qdq.emulate_half``). The plan refuses, with a ``CalibrationError`` that says to re-run
``hybrid-infer calibrate``, a calibration made for another prototxt, other weights, or a
segment whose ONNX is not the one calibrated, and it records per segment what it did
(``applied``), so that reports say which segments really run in reduced precision.

Which layers stay FP32, beyond those the user keeps:

- grouped Deconvolutions (INT8): per-output-channel weight scales do not fit ONNX's one
  quantization axis there (see ``qdq.py``);
- on the CPU (INT8) and in FP16, the *neighbours* of kept layers: a ReLU, pooling, Concat
  or reshape that reads a kept layer's output runs in FP32 too, so a kept layer's result
  is not rounded to 8 (16) bits on its way to the next layer; one between a reduced layer
  and a kept one reads the reduced layer's own output;
- in FP16, every layer that reads or writes a tensor whose calibrated range leaves FP16's
  finite range (65504): such a tensor would become inf, and with it everything after it;
- PriorBox and DetectionOutput (box decoding, NMS) in FP16; in INT8 they are never quantized.
"""
from __future__ import annotations

import collections
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from ..errors import CalibrationError, OptionError
from ..graph.layer_graph import LayerGraph
from .calibration_file import Calibration, as_layer_list, check_model, model_identity, sha256_bytes
from .qdq import ONNXRUNTIME, TENSORRT, MissingRange, emulate_half, prepare, quantize, to_half

if TYPE_CHECKING:
    import onnx

    from ..model.caffe_model import CaffeModel
    from ..partition.partitioner import Segment

log = logging.getLogger("hybrid_infer.precision")

#: Layer types whose nodes carry Q/DQ (or FP16 math) worth keeping in FP32 by name.
QUANTIZABLE_TYPES = ("Convolution", "Deconvolution", "InnerProduct", "Eltwise")
#: Layers TensorRT's placement quantizes (Q/DQ on their inputs); Eltwise only as a residual Add.
WEIGHTED_TYPES = ("Convolution", "Deconvolution", "InnerProduct")
#: Layers the CPU placement also runs on 8-bit tensors, passing them between the quantized
#: ones without a round trip through float (ONNX Runtime has integer kernels for them).
#: Everything else in a TensorRT segment computes in float there: Softmax, LRN, PReLU, Power,
#: PriorBox and DetectionOutput's decoding and NMS (box coordinates in 8 bits move whole pixels).
CPU_INTEGER_TYPES = QUANTIZABLE_TYPES + ("ReLU", "Pooling", "Concat", "Flatten", "Reshape", "Permute",
                                         "BatchNorm", "Scale", "Split", "Dropout")
#: Layers that read their inputs in full precision on the CPU, even after an 8-bit layer:
#: Softmax's logits (an 8-bit logit moves probabilities and the top-1 among near-ties).
FLOAT_INPUT_TYPES = ("Softmax",)
#: Layers that stay FP32 under FP16 too: SSD's box decoding and NMS.
FP32_ALWAYS_TYPES = ("PriorBox", "DetectionOutput")
#: FP16's largest finite value.
FP16_MAX = 65504.0
#: ONNX Runtime's integer kernels for weighted layers, after its graph optimizations.
INTEGER_WEIGHTED_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                        "QGemm", "DynamicQuantizeMatMul", "QLinearConvTranspose")
#: The same layers in float kernels (ORT's fused and NCHWc variants included).
FLOAT_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


def resolve_layers(graph: LayerGraph, names_or_types: Iterable[str], option: str = "--keep-fp32") -> set[str]:
    """Caffe layer names for a list of layer names or types; an unknown one is an OptionError."""
    layers: set[str] = set()
    for item in as_layer_list(names_or_types if not isinstance(names_or_types, (set, frozenset))
                              else sorted(names_or_types), option):
        matched = {name for name, layer in graph.layers.items() if name == item or layer.type == item}
        if not matched:
            raise OptionError(f"{option} {item}: no layer of {graph.model.prototxt} has that name or type")
        layers |= matched
    return layers


def _without_name(model: "onnx.ModelProto", outputs: bool) -> bytes:
    """``model`` serialized without its graph's name (the lowering puts the segment's number
    there, which shifts when other segments move) and, unless ``outputs``, its output list."""
    import onnx
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.name = ""
    if not outputs:
        del copy.graph.output[:]
    return copy.SerializeToString(deterministic=True)


def onnx_digest(model: "onnx.ModelProto") -> str:
    """SHA-256 identifying a segment's FP32 ONNX whatever the segment's number."""
    return sha256_bytes(_without_name(model, outputs=True))


def body_digest(model: "onnx.ModelProto") -> str:
    """Digest of ``model`` without its output list (same nodes, weights and inputs)."""
    return sha256_bytes(_without_name(model, outputs=False))


def quantizable_layers(graph: LayerGraph, layers: Iterable[str]) -> list[str]:
    """The layers among ``layers`` (in order) that reduced precision changes, by name."""
    return [name for name in layers if graph.layers[name].type in QUANTIZABLE_TYPES]


def unquantizable_layers(graph: LayerGraph, layers: Iterable[str]) -> dict[str, str]:
    """Layers INT8 cannot quantize correctly -> why (they stay FP32): grouped Deconvolutions,
    whose ConvTranspose weights (C_in x C_out/group x k...) have no axis holding one slice
    per output channel, so per-channel scales would be shared across output channels."""
    found = {}
    for name in layers:
        layer = graph.layers[name]
        if layer.type == "Deconvolution" and layer.param.convolution_param.group > 1:
            found[name] = (f"grouped Deconvolution (group {layer.param.convolution_param.group}): its weights "
                           "have no axis with one slice per output channel for per-channel INT8 scales")
    return found


def residual_sums(graph: LayerGraph, layers: Iterable[str]) -> set[str]:
    """Eltwise SUM layers without coefficients (other than 1): candidates for residual Adds.
    A weighted sum (``coeff``) combines results, e.g. logits, and stays in high precision."""
    found = set()
    for name in layers:
        layer = graph.layers[name]
        p = layer.param.eltwise_param
        if layer.type == "Eltwise" and p.operation == p.SUM and all(c == 1 for c in p.coeff) and len(layer.bottoms) > 1:
            found.add(name)
    return found


def reduced_neighbours(graph: LayerGraph, layers: Iterable[str], kept: set[str], weighted: Iterable[str],
                       passing: Optional[Iterable[str]] = None) -> dict[str, str]:
    """Pass-through layers (types in ``passing``; None: every type not in ``weighted``) of
    ``layers`` that stay FP32 beside the kept ones -> why, so that a kept layer's output is
    not rounded on its way on (see the module docstring): those reached (through other
    pass-through layers) from a kept weighted layer upstream, and those with no reduced
    weighted layer upstream whose readers are kept or not reduced at all (nothing to gain)."""
    inside = list(layers)
    members = set(inside)
    weighted = set(weighted)
    passing_types = None if passing is None else set(passing)

    def kind(name: str) -> str:
        layer_type = graph.layers[name].type
        if layer_type in weighted:
            return "kept" if name in kept else "reduced"
        if (passing_types is None or layer_type in passing_types) and name not in kept:
            return "pass"
        return "float"

    def neighbours(name: str, up: bool) -> list[Optional[str]]:
        layer = graph.layers[name]
        if up:
            found = [graph.values[v].producer for v in layer.bottoms]
        else:
            found = [c for v in layer.tops for c in graph.consumers.get(v, [])]
        return [n if n in members else None for n in found]  # None: outside the segment (float)

    def reach(name: str, up: bool) -> set[str]:
        kinds, seen, stack = set(), {name}, [name]
        while stack:
            for n in neighbours(stack.pop(), up):
                k = "float" if n is None else kind(n)
                if k == "pass":
                    if n not in seen:
                        seen.add(n)  # type: ignore[arg-type]
                        stack.append(n)  # type: ignore[arg-type]
                else:
                    kinds.add(k)
        return kinds

    result = {}
    for name in inside:
        if kind(name) != "pass":
            continue
        up, down = reach(name, True), reach(name, False)
        if "kept" in up:
            result[name] = "reads a layer kept in FP32"
        elif "reduced" not in up and "kept" in down:
            result[name] = "feeds a layer kept in FP32"
        elif "reduced" not in up and "reduced" not in down:
            result[name] = "only float layers around it"
    return result


@dataclass
class SegmentPrecision:
    """What the plan did to one segment's ONNX (``PrecisionPlan.applied``)."""
    segment_id: int
    engine: str
    label: str
    #: Layers the user (or the file) keeps in FP32, in this segment.
    kept: list[str] = field(default_factory=list)
    #: Layers kept in FP32 by the plan itself -> why.
    also_fp32: dict[str, str] = field(default_factory=dict)
    #: Layers whose weights (INT8) or math (FP16) are reduced.
    reduced: list[str] = field(default_factory=list)
    model: Optional["onnx.ModelProto"] = None

    def integer_kernels(self) -> tuple[collections.Counter, list[str]]:
        """For the CPU placement: ONNX Runtime's integer kernels for weighted layers after its
        graph optimizations (op type -> count), and the reduced layers it still runs in float
        weighted kernels (ConvTranspose has no integer kernel on the CPU; a convolution whose
        output is not quantized is not fused). Builds a throw-away session."""
        import onnx
        import onnxruntime as ort
        assert self.model is not None
        with tempfile.TemporaryDirectory(prefix="hybrid_infer_kernels_") as tmp:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            options.log_severity_level = 3
            ort.InferenceSession(self.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            optimized = onnx.load(options.optimized_model_filepath)
        integer = collections.Counter(n.op_type for n in optimized.graph.node if n.op_type in INTEGER_WEIGHTED_OPS)
        layers = {n.name: n.doc_string for n in self.model.graph.node if n.doc_string}

        def layer_of(node: "onnx.NodeProto") -> str:  # ORT renames nodes it rewrites by adding to the name
            if node.doc_string or node.name in layers:
                return node.doc_string or layers[node.name]
            starts = [name for name in layers if node.name.startswith(name)]
            return layers[max(starts, key=len)] if starts else node.name
        floating = sorted({layer_of(n) for n in optimized.graph.node if n.op_type in FLOAT_WEIGHTED_OPS}
                          & set(self.reduced))
        return integer, floating


class PrecisionPlan:
    """How TensorRT segments run in reduced precision, for one loaded model: the
    calibration and the Caffe layers kept in FP32 (``create`` checks and resolves them)."""

    def __init__(self, calibration: Calibration, graph: LayerGraph, keep_layers: Iterable[str] = ()):
        self.calibration = calibration
        self.graph = graph
        #: Caffe layer names whose nodes stay FP32.
        self.keep_fp32 = set(keep_layers)
        #: Segment id -> what ``segment_model`` made of it (the latest build).
        self.applied: dict[int, SegmentPrecision] = {}

    @classmethod
    def create(cls, calibration: Calibration, model: "CaffeModel", graph: LayerGraph,
               keep_fp32: Iterable[str] = ()) -> "PrecisionPlan":
        """Check that ``calibration`` belongs to ``model`` (prototxt, input shapes and weights)
        and resolve the layer names or types to keep in FP32 (the file's own, plus ``keep_fp32``)."""
        shapes = {graph.values[v].blob: graph.values[v].shape for v in graph.inputs}
        check_model(calibration, model_identity(model.net, model.weights,
                                                shapes), str(model.prototxt))
        keep = resolve_layers(graph, calibration.keep_fp32, "the calibration's keep_fp32") | \
            resolve_layers(graph, keep_fp32)
        return cls(calibration, graph, keep)

    @property
    def label(self) -> str:
        return self.calibration.label

    def with_keep_fp32(self, layers: Iterable[str]) -> "PrecisionPlan":
        """The same calibration with exactly ``layers`` (names) kept in FP32 (sensitivity search)."""
        return PrecisionPlan(self.calibration, self.graph, layers)

    def check_segments(self, segments: Iterable["Segment"], onnx_of) -> None:
        """Raise ``CalibrationError`` now, before any long work, for a TensorRT segment the file
        has no ranges for; ``onnx_of(segment)`` lowers it (FP32 ONNX)."""
        for segment in segments:
            self._entry(onnx_of(segment), segment)

    def _entry(self, fp32: "onnx.ModelProto", segment: "Segment"):
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
        return entry

    def segment_model(self, fp32: "onnx.ModelProto", segment: "Segment", engine: str) -> "onnx.ModelProto":
        """The ONNX ``engine`` ("tensorrt" or "onnxruntime") runs for ``segment`` instead of ``fp32``."""
        entry = self._entry(fp32, segment)
        prepared = prepare(fp32)
        self._check_tensors(prepared, entry.ranges, segment)
        layers = list(segment.layers)
        kept = self.keep_fp32 & set(layers)
        target = TENSORRT if engine == "tensorrt" else ONNXRUNTIME
        record = SegmentPrecision(segment.id, engine, self.label, sorted(kept))
        if self.calibration.precision == "int8":
            record.also_fp32 = unquantizable_layers(self.graph, layers)
            fp32_layers = kept | set(record.also_fp32)
            if target == TENSORRT:
                residual = residual_sums(self.graph, layers)
                quantized = {n for n in layers if self.graph.layers[n].type in WEIGHTED_TYPES or n in residual}
                quantized -= fp32_layers
                float_inputs: set[str] = set()
            else:
                neighbours = reduced_neighbours(self.graph, layers, fp32_layers, QUANTIZABLE_TYPES,
                                                set(CPU_INTEGER_TYPES) - set(QUANTIZABLE_TYPES))
                record.also_fp32.update(neighbours)
                residual = set()
                quantized = {n for n in layers if self.graph.layers[n].type in CPU_INTEGER_TYPES}
                quantized -= fp32_layers | set(neighbours)
                float_inputs = {n for n in layers if self.graph.layers[n].type in FLOAT_INPUT_TYPES}
            try:
                model = quantize(prepared, entry.ranges, target, quantized, float_inputs, residual,
                                 fp32_layers | set(record.also_fp32))
            except MissingRange as exc:
                raise CalibrationError(
                    f"{self.calibration.path}: segment {segment.id} needs a range for tensor '{exc.tensor}', which the "
                    "file lacks (edited by hand?); run hybrid-infer calibrate again") from None
            record.reduced = sorted(n for n in quantized if self.graph.layers[n].type in QUANTIZABLE_TYPES)
        else:
            model, record = self._half(prepared, entry.ranges, segment, target, record)
        record.model = model
        self.applied[segment.id] = record
        log.info("segment %d: %s for %s (%d layer(s) kept in FP32, %d more by the plan)", segment.id, self.label,
                 engine, len(kept), len(record.also_fp32))
        return model

    def _half(self, prepared: "onnx.ModelProto", ranges: dict, segment: "Segment", target: str,
              record: SegmentPrecision) -> tuple["onnx.ModelProto", SegmentPrecision]:
        """FP16 for TensorRT, or emulated FP16 for ONNX Runtime (see ``qdq.emulate_half``)."""
        layers = list(segment.layers)
        always = {n for n in layers if self.graph.layers[n].type in FP32_ALWAYS_TYPES}
        big = {name for name, (lo, hi) in ranges.items() if max(-lo, hi) > FP16_MAX}
        overflow = {node.doc_string for node in prepared.graph.node
                    if node.doc_string and big & {*node.input, *node.output}}
        kept = set(record.kept) | always | overflow
        neighbours = reduced_neighbours(self.graph, layers, kept, QUANTIZABLE_TYPES)
        record.also_fp32 = {**{n: "box decoding and NMS" for n in sorted(always)},
                            **{n: f"a tensor beyond FP16's range ({FP16_MAX:g})" for n in sorted(overflow - always)},
                            **neighbours}
        blocked = kept | set(neighbours)
        record.reduced = [n for n in quantizable_layers(self.graph, layers) if n not in blocked]
        half = to_half(prepared, [node.name for node in prepared.graph.node if node.doc_string in blocked])
        return (half if target == TENSORRT else emulate_half(half)), record

    def _check_tensors(self, prepared: "onnx.ModelProto", ranges: dict, segment: "Segment") -> None:
        """Warn about ranges of tensors the segment does not have (a hand-edited file); refuse
        a file where they outnumber the real ones many times over (not this segment's file)."""
        known = {name for node in prepared.graph.node for name in (*node.input, *node.output)}
        known |= {value.name for value in prepared.graph.input}
        unknown = sorted(set(ranges) - known)
        if len(unknown) > max(64, 4 * len(known)):
            raise CalibrationError(
                f"{self.calibration.path}: segment {segment.id} has {len(known)} tensors, but the file holds ranges "
                f"for {len(unknown)} others (e.g. {', '.join(unknown[:3])}): not a calibration of this model; run "
                "hybrid-infer calibrate again")
        if unknown:
            log.warning("%s: ignoring the ranges of %d tensor(s) that segment %d does not have: %s%s",
                        self.calibration.path, len(unknown), segment.id, ", ".join(unknown[:5]),
                        " ..." if len(unknown) > 5 else "")

    def _partition_text(self) -> str:
        p = self.calibration.partition
        return (f"--profile {p.get('profile')} --min-segment-size {p.get('min_segment_size')}"
                + (f" --fallback {' '.join(map(str, p['fallback']))}" if p.get("fallback") else "")
                + "".join(f" --output-blob {blob}" for blob in p.get("outputs", ())))


def plan_for(calibration: Optional[object], model: "CaffeModel", graph: LayerGraph,
             keep_fp32: Iterable[str] = ()) -> Optional[PrecisionPlan]:
    """A plan from a path, a loaded ``Calibration`` or a plan (None: FP32); ``--keep-fp32``
    alone, or a ``calibration`` of another type, is an OptionError."""
    import os

    from .calibration_file import load_calibration
    keep = as_layer_list(keep_fp32, "keep_fp32")
    if calibration is None:
        if keep:
            raise OptionError("--keep-fp32 chooses layers to leave out of reduced precision: it needs "
                              "--calibration CALIB (made by hybrid-infer calibrate)")
        return None
    if isinstance(calibration, PrecisionPlan):
        return calibration.with_keep_fp32(calibration.keep_fp32 | resolve_layers(graph, keep))
    if isinstance(calibration, Calibration):
        return PrecisionPlan.create(calibration, model, graph, keep)
    if not isinstance(calibration, (str, os.PathLike)):
        raise OptionError(f"calibration must be a calibration file's path (or a Calibration), not "
                          f"{type(calibration).__name__} {calibration!r:.40}")
    return PrecisionPlan.create(load_calibration(calibration), model, graph, keep)
