"""Build the engine for each segment, and fall back to Caffe when an engine refuses one.

A segment that ONNX lowering, ONNX Runtime, OpenVINO or TensorRT rejects runs in Caffe: the
user gets Caffe's answer more slowly, never a wrong one. Where the refusal names Caffe
layers, the caller can move just those to Caffe and partition again.
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
from .engine_choice import AUTO, CANDIDATES, CandidateEngines, available_candidates

#: ONNX Runtime's CUDA execution provider: a GPU engine for TensorRT segments where no
#: TensorRT runtime supports the GPU (``engines/onnxruntime_cuda_engine.py``).
ONNXRUNTIME_CUDA = "onnxruntime-cuda"
#: "auto": TensorRT where it can run, else ONNX Runtime CUDA where onnxruntime-gpu and a GPU
#: are present, else the fastest CPU engine per segment (measured); then the CPU engines
#: (``engine_choice.CANDIDATES``) by name, ONNX Runtime CUDA and TensorRT. "caffe" runs
#: every segment in Caffe, on the same cut: it isolates what the engines contribute from
#: what the cut and the hand-offs cost.
ENGINES = (AUTO, *CANDIDATES, ONNXRUNTIME_CUDA, "tensorrt", "caffe")

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
    #: For ``--engine auto`` on a CPU: which engine was chosen and why (measured medians).
    choice_note: Optional[str] = None


def segment_onnx(graph: LayerGraph, model: CaffeModel, segment: Segment, *,
                 check: bool = False) -> "onnx.ModelProto":
    from ..lowering.segment_to_onnx import lower_segment  # keeps `partition` free of the lowering
    return lower_segment(graph, segment.layers, segment.inputs, segment.outputs, model.weights,
                         name=f"segment{segment.id}", check=check)


def resolve_engine(engine: str, tensorrt_module: Optional[str] = None) -> tuple[str, str]:
    """Turn "auto" into what runs supported segments here, and say why: TensorRT if a runtime
    supports the GPU, else ONNX Runtime's CUDA provider if onnxruntime-gpu and a GPU are
    present, else the only CPU engine installed, else ``AUTO`` (the fastest CPU engine per
    segment, measured by ``engine_choice.CandidateEngines``). A named engine that cannot run
    here is an ``OptionError``."""
    from ..engines.onnxruntime_cuda_engine import runtime_available as cuda_available
    if engine not in ENGINES:
        raise OptionError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    if engine == "caffe":
        return engine, "asked for"
    if engine in CANDIDATES:
        ok, reason = CANDIDATES[engine].available()
        if not ok:
            raise OptionError(f"--engine {engine} cannot run here: {reason}")
        return engine, "asked for"
    if engine == ONNXRUNTIME_CUDA:
        ok, reason = cuda_available()
        if not ok:
            raise OptionError(f"--engine {ONNXRUNTIME_CUDA} cannot run here: {reason}; use --engine "
                              f"{' or '.join(available_candidates())} (runs the same segments' ONNX on the CPU)")
        return engine, "asked for"
    from ..engines.tensorrt_engine import runtime_available
    ok, reason = runtime_available(tensorrt_module)
    if ok:
        return "tensorrt", reason
    if engine == "tensorrt":
        raise OptionError(f"--engine tensorrt cannot run here: {reason}; use --engine "
                          f"{' or '.join(available_candidates())} (runs the same segments' ONNX on the CPU)")
    cuda_ok, cuda_reason = cuda_available()
    if cuda_ok:
        return ONNXRUNTIME_CUDA, f"TensorRT cannot run here: {reason}; {cuda_reason}: segments run on the GPU"
    names = available_candidates()
    if len(names) == 1:
        return names[0], f"TensorRT cannot run here: {reason}; nor ONNX Runtime CUDA: {cuda_reason}"
    return AUTO, (f"TensorRT cannot run here: {reason}; nor ONNX Runtime CUDA: {cuda_reason}; each segment "
                  f"runs in the fastest of {', '.join(names)}, measured on its shapes")


def build_engines(graph: LayerGraph, model: CaffeModel, segments: list[Segment], engine: str,
                  tensorrt_factory: Optional[TensorRTFactory] = None,
                  caffe_device: Optional[GpuDevice] = None,
                  candidate_engines: Optional[CandidateEngines] = None,
                  batch: Optional[int] = None,
                  transform: Optional[SegmentTransform] = None,
                  cuda_device: int = 0, cuda_graphs: bool = True) -> list[SegmentEngine]:
    """One engine per segment; ``engine`` is already resolved: a CPU engine's name, ``AUTO``
    (the fastest CPU engine per segment, measured at ``batch``, else the prototxt's),
    ``ONNXRUNTIME_CUDA`` (on GPU ``cuda_device``, with CUDA graphs unless ``cuda_graphs``
    is False), "tensorrt" or "caffe". Caffe segments run on ``caffe_device`` when given,
    else on the CPU.
    ``transform`` replaces each TensorRT segment's FP32 ONNX before its engine is built."""
    candidate_engines = candidate_engines or CandidateEngines()
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
        value_checked = {name: embed_requirement(graph.layers[name]) for name in segment.layers
                         if graph.layers[name].type == "Embed"}
        segment_engine, forced_note = engine, None
        if engine == AUTO and (transform is not None or value_checked):
            # Calibrated Q/DQ placement is made for ONNX Runtime's CPU kernels, and random
            # feeds cannot time a segment that reads index values: no measured choice there.
            segment_engine = "onnxruntime"
            forced_note = ("onnxruntime, without measuring: " +
                           ("the calibration's Q/DQ placement is made for ONNX Runtime" if transform is not None
                            else f"{', '.join(value_checked)} read(s) index values, which random inputs cannot "
                                 "time, and only ONNX Runtime stops on an index outside the table"))
        try:
            onnx_model = segment_onnx(graph, model, segment)
            if transform is not None:
                onnx_model = transform(onnx_model, segment, segment_engine)
            choice_note = None
            if engine == "tensorrt":
                assert tensorrt_factory is not None
                runner: Engine = tensorrt_factory(onnx_model, segment)
            elif engine == ONNXRUNTIME_CUDA:
                from ..engines.onnxruntime_cuda_engine import OnnxRuntimeCudaEngine
                runner = OnnxRuntimeCudaEngine(onnx_model, device=cuda_device, cuda_graph=cuda_graphs,
                                               label=f"segment {segment.id}")
            else:
                shapes = {v: (batch or graph.values[v].shape[0], *graph.values[v].shape[1:])
                          for v in segment.inputs}
                runner, choice_note = candidate_engines.build(segment_engine, onnx_model, shapes,
                                                              alone=len(segments) == 1, value_checked=value_checked)
            built.append(SegmentEngine(segment, runner, choice_note=choice_note or forced_note))
        except (EngineRejected, LoweringError) as exc:
            layers = tuple(exc.layers if isinstance(exc, LoweringError) else exc.caffe_layers)
            note = f"segment {segment.id} runs in Caffe instead: {exc}"
            refused_by = ("the lowering" if isinstance(exc, LoweringError)
                          else " and ".join(exc.engines) if exc.engines
                          else " and ".join(available_candidates()) if segment_engine == AUTO else segment_engine)
            built.append(SegmentEngine(segment, caffe_engine(), note, layers, refused_by))
    return built
