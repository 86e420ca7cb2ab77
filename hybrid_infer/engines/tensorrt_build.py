"""Build a TensorRT engine (a serialized plan) from one segment's ONNX model.

The lowering writes each Caffe layer's name into its ONNX nodes' ``doc_string``; this
module keeps that link alive through TensorRT so every message and report speaks in
Caffe layers: parser rejections name the Caffe layers to run in Caffe instead, and the
layer lists (the parsed network before fusion, and the engine inspector's after fusion)
say which Caffe layers each TensorRT layer covers.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EngineBuildError, OptionError
from . import trt_api
from .trt_api import TrtApi

log = logging.getLogger("hybrid_infer.tensorrt")

MIB = 1 << 20
FP16_MAX = float(np.finfo(np.float16).max)
#: Inputs that ONNX defines as float32 whatever the data type: they stay FP32 in FP16 models.
_FP32_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}
_ONNX_LAYER = re.compile(r"ONNX Layer: ([^\]\x1e]+)\]")


@dataclass(frozen=True)
class BuildSettings:
    """Everything that changes the plan; all of it goes into the engine cache key."""

    workspace_bytes: int = 1 << 30
    #: Optimization profile for the symbolic ``batch`` dimension of every input.
    batch_min: int = 1
    batch_opt: int = 1
    batch_max: int = 1
    fp16: bool = False
    #: Off by default: TF32 matrix products lose about 3 decimal digits against Caffe.
    tf32: bool = False
    optimization_level: Optional[int] = None
    timing_iterations: Optional[int] = None
    #: TensorRT-RTX targets, e.g. ("8.6", "12.0"), or ("current",); empty: RTX's default set.
    compute_capabilities: tuple[str, ...] = ()
    #: Debugging: every intermediate ONNX value becomes an engine output (blocks fusions).
    mark_all_outputs: bool = False

    def __post_init__(self) -> None:
        if self.workspace_bytes < 1:
            raise OptionError(f"TensorRT workspace must be positive, not {self.workspace_bytes} bytes")
        if not 1 <= self.batch_min <= self.batch_opt <= self.batch_max:
            raise OptionError(f"batch range must satisfy 1 <= min <= opt <= max; got "
                              f"{self.batch_min}/{self.batch_opt}/{self.batch_max}")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise OptionError(f"TensorRT optimization level is 0 to 5, not {self.optimization_level}")
        if self.timing_iterations is not None and self.timing_iterations < 1:
            raise OptionError(f"timing iterations must be at least 1, not {self.timing_iterations}")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compute_capabilities"] = list(self.compute_capabilities)
        return d


@dataclass
class BuiltEngine:
    """A plan and what a report needs to know about it."""

    plan: bytes
    build_seconds: float
    input_names: list[str]
    output_names: list[str]
    #: The parsed network before optimisation: one record per TensorRT layer.
    network_layers: list[dict[str, Any]]
    #: The engine inspector's layers after fusion; None where no GPU can load the plan here.
    engine_layers: Optional[list[dict[str, Any]]]
    #: Why ``engine_layers`` is missing (empty when present).
    engine_layers_note: str
    module: str
    module_version: str
    #: True when FP16 was obtained by converting the ONNX model (strongly typed builds).
    fp16_onnx: bool

    @property
    def plan_size(self) -> int:
        return len(self.plan)

    def metadata(self) -> dict[str, Any]:
        """Everything but the plan, as JSON-ready data (the engine cache's sidecar)."""
        d = dataclasses.asdict(self)
        del d["plan"]
        return d

    @classmethod
    def from_metadata(cls, plan: bytes, metadata: Any) -> BuiltEngine:
        """The engine whose ``metadata()`` this was; raises ``ValueError`` naming the first field
        that is missing or of the wrong type (the metadata comes from a file on disk)."""
        if not isinstance(metadata, dict):
            raise ValueError(f"engine metadata is a {type(metadata).__name__}, not an object")
        for name, check in _METADATA_FIELDS.items():
            if name not in metadata:
                raise ValueError(f"engine metadata has no '{name}'")
            if not check(metadata[name]):
                raise ValueError(f"engine metadata field '{name}' has the wrong type")
        return cls(plan=plan, **{name: metadata[name] for name in _METADATA_FIELDS})


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _layer_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


#: Every BuiltEngine field but the plan, with the check its value from JSON must pass.
_METADATA_FIELDS = {
    "build_seconds": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "input_names": _str_list,
    "output_names": _str_list,
    "network_layers": _layer_list,
    "engine_layers": lambda v: v is None or _layer_list(v),
    "engine_layers_note": lambda v: isinstance(v, str),
    "module": lambda v: isinstance(v, str),
    "module_version": lambda v: isinstance(v, str),
    "fp16_onnx": lambda v: isinstance(v, bool),
}


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 copy of ``model`` whose graph inputs and outputs stay FP32.

    TensorRT 11 and TensorRT-RTX have no FP16 builder flag: precision follows tensor
    types. Float initializers and constants become float16 (clipped to its range), Cast
    nodes at the graph inputs and outputs keep the FP32 interface the executor expects,
    and casts to FP32 inside the graph become casts to FP16 so types stay consistent, in the
    bodies of Loop and If nodes too. Inputs ONNX requires to be float32 (Resize/Upsample
    scales) are left alone.
    """
    model = _copy(model)
    graph = model.graph
    graphs = list(_graphs(graph))
    nodes_everywhere = [node for g in graphs for node in g.node]
    fp32_only = {node.input[idx] for node in nodes_everywhere for op, idx in _FP32_ONLY_INPUTS
                 if node.op_type == op and len(node.input) > idx}

    def to_fp16(tensor: TensorProto) -> None:
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in fp32_only:
            array = np.clip(numpy_helper.to_array(tensor), -FP16_MAX, FP16_MAX).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))

    for init in (init for g in graphs for init in g.initializer):
        to_fp16(init)
    for node in nodes_everywhere:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and not set(node.output) & fp32_only:
                to_fp16(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16

    def rename(old: str, new: str) -> None:
        for node in nodes_everywhere:
            node.input[:] = [new if name == old else name for name in node.input]
            node.output[:] = [new if name == old else name for name in node.output]

    casts_in, casts_out = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            rename(value.name, value.name + "__fp16")
            casts_in.append(helper.make_node("Cast", [value.name], [value.name + "__fp16"],
                                             name=value.name + "__to_fp16", to=TensorProto.FLOAT16))
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            rename(value.name, value.name + "__fp16")
            casts_out.append(helper.make_node("Cast", [value.name + "__fp16"], [value.name],
                                              name=value.name + "__to_fp32", to=TensorProto.FLOAT))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale float32 annotations would contradict the new types
    return model


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph nested in its nodes' attributes (Loop and If bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _reduced_precision(model: onnx.ModelProto) -> bool:
    """Q/DQ nodes (explicit quantization) or 16-bit float weights: the precision is in the
    tensors' types, which only a strongly typed network obeys (and TensorRT's explicit
    quantization requires one: no precision flags)."""
    return (any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)
            or any(init.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) for init in model.graph.initializer))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _name_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """Name unnamed nodes after their Caffe layer (TensorRT names its layers after ONNX
    nodes, so fused layers then read "conv1 + relu1"); return node name -> Caffe layer."""
    used = {node.name for node in model.graph.node if node.name}
    docs = {}
    for node in model.graph.node:
        if not node.name and node.doc_string:
            name, k = node.doc_string, 1
            while name in used:
                name, k = f"{node.doc_string}:{k}", k + 1
            node.name = name
            used.add(name)
        if node.name and node.doc_string:
            docs.setdefault(node.name, node.doc_string)
    return docs


def _caffe_layers(text: str, docs: dict[str, str]) -> list[str]:
    """Caffe layers behind a TensorRT layer, from its "[ONNX Layer: x]" metadata or, when
    there is none, from the " + "-joined node names of a fused layer's name."""
    nodes = _ONNX_LAYER.findall(text) or text.split(" + ")
    layers = []
    for node in nodes:
        doc = docs.get(node.strip())
        if doc and doc not in layers:
            layers.append(doc)
    return layers


class _Interrupts:
    """Ctrl-C (and SIGTERM) during a TensorRT build, held until the build has returned.

    TensorRT calls back into Python (its logger, the progress monitor) during a build, and
    its Python bindings swallow exceptions raised there: the KeyboardInterrupt that Python's
    own handler raises inside such a callback is lost and the build runs on. Here a signal
    only sets ``requested``; the progress monitor then cancels the build (its
    ``step_complete`` returns False), and on leaving the block the signal's own handler is
    run, so that the KeyboardInterrupt (or the CLI's SIGTERM exception) is raised there.
    Outside the main thread (where Python cannot handle signals) nothing is changed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _hold(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._hold)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self.requested is not None:
            handler = self._previous.get(self.requested)
            if callable(handler):
                handler(self.requested, None)
            raise KeyboardInterrupt


def _progress_monitor(api: TrtApi, label: str, interrupts: _Interrupts) -> Any:
    """An IProgressMonitor that logs build phases (two levels at INFO, deeper at DEBUG) and
    cancels the build once ``interrupts`` holds a Ctrl-C."""
    base = api.module.IProgressMonitor

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self._depth: dict[str, int] = {}
            self._lock = threading.Lock()

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            with self._lock:
                depth = 0 if parent_phase is None else self._depth.get(parent_phase, 0) + 1
                self._depth[phase_name] = depth
            log.log(logging.INFO if depth <= 1 else logging.DEBUG, "%s: %s%s (%d steps)",
                    label, "  " * depth, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return interrupts.requested is None  # False cancels the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._depth.pop(phase_name, None)

    return Monitor()


def _parse(api: TrtApi, network: Any, model: onnx.ModelProto, label: str) -> Any:
    """Parse into ``network``; a rejection names the Caffe layers of the failing nodes."""
    parser = api.module.OnnxParser(network, api.logger)
    with api.logger.capture() as said:
        ok = parser.parse(model.SerializeToString())
    if ok:
        return parser
    layers, problems = [], []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        index = error.node()
        node = model.graph.node[index] if 0 <= index < len(model.graph.node) else None
        op = error.node_operator() or (node.op_type if node else "")
        if node is not None and node.domain:
            op = f"{node.domain}:{op}"
        where = f"ONNX node {index} ({op})"
        if node is not None and node.doc_string:
            where = f"Caffe layer '{node.doc_string}' ({op})"
            if node.doc_string not in layers:
                layers.append(node.doc_string)
        code = str(error.code()).rsplit(".", 1)[-1]  # e.g. UNSUPPORTED_NODE
        desc = error.desc().strip()
        problems.append(f"{where}: {code}" + (f" ({desc})" if desc not in ("", "false") else ""))
    detail = "; ".join(problems) or said.summary() or "no reason given"
    if layers:
        raise EngineBuildError(
            f"TensorRT's ONNX parser ({api.describe()}) rejected {label}: {detail}. Run "
            f"layer(s) {', '.join(layers)} in Caffe instead (the rest of the segment can "
            "stay on TensorRT)", caffe_layers=layers)
    raise EngineBuildError(f"TensorRT's ONNX parser ({api.describe()}) rejected {label}: {detail}")


def _mark_all_outputs(network: Any, value_names: set[str]) -> None:
    """Make every intermediate tensor that is an ONNX value (a Caffe blob) an output."""
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            if tensor.name in value_names and not tensor.is_network_output:
                network.mark_output(tensor)


def _add_profile(builder: Any, network: Any, config: Any, settings: BuildSettings, label: str) -> None:
    """One optimization profile spanning the batch range; other dimensions are fixed."""
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if -1 in shape[1:]:
            raise EngineBuildError(f"{label}: input '{tensor.name}' has dynamic dimensions "
                                   f"{shape} beyond the batch; only the batch may vary")
        if shape and shape[0] == -1:
            dynamic = True
            rest = shape[1:]
            profile.set_shape(tensor.name, (settings.batch_min, *rest), (settings.batch_opt, *rest),
                              (settings.batch_max, *rest))
    if dynamic:
        config.add_optimization_profile(profile)


def _configure(api: TrtApi, builder: Any, network: Any, settings: BuildSettings, label: str,
               strongly_typed: bool = False) -> Any:
    trt = api.module
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if settings.fp16 and api.has_fp16_flag and not strongly_typed:  # types decide in a typed network
        config.set_flag(trt.BuilderFlag.FP16)
    if api.has_tf32_flag:
        (config.set_flag if settings.tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
    elif settings.tf32:
        raise OptionError(f"{api.describe()} has no TF32 switch; build without tf32")
    if settings.optimization_level is not None:
        if not api.has_optimization_level:
            raise OptionError(f"{api.describe()} has no builder optimization level")
        config.builder_optimization_level = settings.optimization_level
    if settings.timing_iterations is not None:
        if not api.has_timing_iterations:
            raise OptionError(f"{api.describe()} has no timing iterations setting")
        config.avg_timing_iterations = settings.timing_iterations
    if settings.compute_capabilities:
        known = api.compute_capabilities()
        if not known:
            raise OptionError(f"compute capabilities are a TensorRT-RTX setting; {api.describe()} "
                              "builds for the GPU it runs on")
        known["current"] = trt.ComputeCapability.CURRENT
        unknown = [cc for cc in settings.compute_capabilities if cc not in known]
        if unknown:
            raise OptionError(f"{api.describe()} cannot target compute capability "
                              f"{', '.join(unknown)}; choose from {', '.join(known)}")
        config.num_compute_capabilities = len(settings.compute_capabilities)
        for i, cc in enumerate(settings.compute_capabilities):
            config.set_compute_capability(known[cc], i)
    _add_profile(builder, network, config, settings, label)
    return config


def _network_layers(api: TrtApi, network: Any, docs: dict[str, str]) -> list[dict[str, Any]]:
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        layers.append({
            "name": layer.name,
            "type": str(layer.type).rsplit(".", 1)[-1],
            "outputs": [layer.get_output(j).name for j in range(layer.num_outputs)],
            "caffe_layers": _caffe_layers(api.layer_metadata(layer) or layer.name, docs),
        })
    return layers


def _inspect(api: TrtApi, plan: bytes, docs: dict[str, str]) -> tuple[Optional[list[dict[str, Any]]], str]:
    """Engine inspector records, where this machine can load the plan at all."""
    from .tensorrt_engine import engine_layers, runtime_available
    ok, reason = runtime_available(api.name)
    if not ok:
        return None, f"engine not inspected here: {reason}"
    with api.logger.capture() as said:
        runtime = api.module.Runtime(api.logger)
        engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        return None, f"engine not inspected: {said.summary()}"
    layers = engine_layers(engine, api)
    for layer in layers:
        layer["caffe_layers"] = _caffe_layers(str(layer.get("Metadata", "")) or layer["Name"], docs)
    return layers, ""


def build_engine(onnx_model: Union[onnx.ModelProto, bytes], settings: BuildSettings = BuildSettings(),
                 *, api: Optional[TrtApi] = None, label: str = "segment") -> BuiltEngine:
    """Parse and build ``onnx_model`` into a plan; ``label`` names the segment in messages.

    Raises ``EngineBuildError`` (an ``EngineRejected``) when the parser or builder refuses,
    naming the Caffe layers where the parser says which nodes failed.
    """
    api = api or trt_api.load()
    model = onnx.load_from_string(onnx_model) if isinstance(onnx_model, bytes) else _copy(onnx_model)
    value_names = {out for node in model.graph.node for out in node.output}
    docs = _name_nodes(model)
    fp16_onnx = settings.fp16 and api.fp16_via_onnx
    if fp16_onnx:
        model = convert_to_fp16(model)
    log.info("%s: building TensorRT engine with %s (%d ONNX nodes, %s)", label, api.describe(),
             len(model.graph.node), "FP16" if settings.fp16 else "FP32")

    started = time.perf_counter()
    builder = api.module.Builder(api.logger)
    strongly_typed = fp16_onnx or api.always_strongly_typed or _reduced_precision(model)
    network = builder.create_network(api.network_flags(strongly_typed))
    parser = _parse(api, network, model, label)
    if settings.mark_all_outputs:
        _mark_all_outputs(network, value_names)
    config = _configure(api, builder, network, settings, label, strongly_typed)
    layers = _network_layers(api, network, docs)
    input_names = [network.get_input(i).name for i in range(network.num_inputs)]
    output_names = [network.get_output(i).name for i in range(network.num_outputs)]
    monitor = None
    interrupts = _Interrupts()
    if api.has_progress_monitor:
        monitor = _progress_monitor(api, label, interrupts)
        config.progress_monitor = monitor
    with interrupts, api.logger.capture() as said:
        serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    # Only now may these go: the network uses weights the parser owns, and TensorRT holds a
    # raw pointer to the monitor.
    del parser, monitor
    if serialized is None:
        detail = said.summary() or "no reason given"
        if "workspace" in detail.lower():
            raise EngineBuildError(
                f"TensorRT could not build {label} within a workspace of "
                f"{settings.workspace_bytes / MIB:g} MiB ({detail}); raise the workspace limit")
        raise EngineBuildError(f"TensorRT ({api.describe()}) could not build {label}: {detail}")
    plan = bytes(serialized)
    engine_layers, note = _inspect(api, plan, docs)
    log.info("%s: built in %.1f s, plan %.1f MiB, %d network layers", label, seconds,
             len(plan) / MIB, len(layers))
    return BuiltEngine(
        plan=plan, build_seconds=seconds,
        input_names=input_names, output_names=output_names, network_layers=layers, engine_layers=engine_layers, engine_layers_note=note,
        module=api.name, module_version=api.version, fp16_onnx=fp16_onnx)
