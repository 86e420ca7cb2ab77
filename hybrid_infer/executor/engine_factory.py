"""Build the engine for each segment, and fall back to Caffe when an engine refuses one.

A segment that ONNX lowering, ONNX Runtime or TensorRT rejects runs in Caffe: the user
gets Caffe's answer more slowly, never a wrong one. Where the refusal names Caffe layers,
the caller can move just those to Caffe and partition again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import onnx

from ..engines.base import Engine
from ..engines.caffe_engine import CaffeEngine
from ..engines.caffe_gpu_engine import CaffeGpuEngine, GpuDevice
from ..errors import EngineRejected, LoweringError, OptionError
from ..graph.layer_graph import LayerGraph
from ..index_inputs import embed_requirement
from ..model.caffe_model import CaffeModel
from ..partition.partitioner import CAFFE, Segment

#: "caffe" runs every segment in Caffe, on the same cut: it isolates what the engines
#: contribute from what the cut and the hand-offs cost.
ENGINES = ("auto", "onnxruntime", "tensorrt", "caffe")

TensorRTFactory = Callable[["onnx.ModelProto", Segment], Engine]
#: (FP32 ONNX, segment, resolved engine) -> the ONNX that engine builds instead (reduced precision).
SegmentTransform = Callable[["onnx.ModelProto", Segment, str], "onnx.ModelProto"]


@dataclass
class SegmentEngine:
    """A segment with the engine that runs it and, if it fell back, why."""
    segment: Segment
    engine: Engine
    fallback_note: Optional[str] = None
    #: The Caffe layers the refusing engine named (empty when it named none).
    rejected_layers: tuple[str, ...] = ()
    #: Who refused: "the lowering" or the engine's name.
    refused_by: str = ""


def segment_onnx(graph: LayerGraph, model: CaffeModel, segment: Segment, *,
                 check: bool = False) -> "onnx.ModelProto":
    from ..lowering.segment_to_onnx import lower_segment  # keeps `partition` free of the lowering
    return lower_segment(graph, segment.layers, segment.inputs, segment.outputs, model.weights,
                         name=f"segment{segment.id}", check=check)


def resolve_engine(engine: str, tensorrt_module: Optional[str] = None) -> tuple[str, str]:
    """Turn "auto" into the engine that can execute here (TensorRT if it can run, else ONNX
    Runtime), and say why."""
    if engine not in ENGINES:
        raise OptionError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    if engine in ("onnxruntime", "caffe"):
        return engine, "asked for"
    from ..engines.tensorrt_engine import runtime_available
    ok, reason = runtime_available(tensorrt_module)
    if ok:
        return "tensorrt", reason
    if engine == "tensorrt":
        raise OptionError(f"--engine tensorrt cannot run here: {reason}; use --engine onnxruntime "
                          "(runs the same segments' ONNX on the CPU)")
    return "onnxruntime", f"TensorRT cannot run here: {reason}"


def build_engines(graph: LayerGraph, model: CaffeModel, segments: list[Segment], engine: str,
                  tensorrt_factory: Optional[TensorRTFactory] = None,
                  caffe_device: Optional[GpuDevice] = None,
                  transform: Optional[SegmentTransform] = None) -> list[SegmentEngine]:
    """One engine per segment; ``engine`` is "onnxruntime", "tensorrt" or "caffe" (already
    resolved). Caffe segments run on ``caffe_device`` when given, else on the CPU.
    ``transform`` replaces each TensorRT segment's FP32 ONNX before its engine is built."""
    built: list[SegmentEngine] = []
    for segment in segments:
        def caffe_engine(segment: Segment = segment) -> Engine:
            args = (graph, segment.layers, segment.inputs, segment.outputs, model.weights)
            if caffe_device is not None:
                return CaffeGpuEngine(*args, device=caffe_device, name=f"segment{segment.id}")
            return CaffeEngine(*args, name=f"segment{segment.id}")
        if segment.backend == CAFFE or engine == "caffe":
            built.append(SegmentEngine(segment, caffe_engine()))
            continue
        try:
            onnx_model = segment_onnx(graph, model, segment)
            if transform is not None:
                onnx_model = transform(onnx_model, segment, engine)
            if engine == "tensorrt":
                assert tensorrt_factory is not None
                runner: Engine = tensorrt_factory(onnx_model, segment)
            else:
                from ..engines.onnxruntime_engine import OnnxRuntimeEngine
                # Alone, its threads may spin between runs; beside other engines they must not.
                runner = OnnxRuntimeEngine(onnx_model, idle_spin=len(segments) == 1,
                                           value_checked={name: embed_requirement(graph.layers[name])
                                                          for name in segment.layers
                                                          if graph.layers[name].type == "Embed"})
            built.append(SegmentEngine(segment, runner))
        except (EngineRejected, LoweringError) as exc:
            layers = tuple(exc.layers if isinstance(exc, LoweringError) else exc.caffe_layers)
            note = f"segment {segment.id} runs in Caffe instead: {exc}"
            refused_by = "the lowering" if isinstance(exc, LoweringError) else engine
            built.append(SegmentEngine(segment, caffe_engine(), note, layers, refused_by))
    return built
