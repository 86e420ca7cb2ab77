"""The Python entry point: ``hybrid_infer.load(...)`` returns a ``HybridNet``."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

import numpy as np

from .errors import InputError, OptionError
from .graph.layer_graph import LayerGraph
from .lowering.plugins import LoweringModule, load_lowering_modules
from .metrics import OutputDifference, compare_outputs
from .model.caffe_import import caffe
from .model.caffe_model import CaffeModel
from .partition.capability import Capability
from .partition.partitioner import Partition, partition

if TYPE_CHECKING:  # the engines pull in ONNX and ONNX Runtime: loaded when a run needs them
    from .engines.caffe_gpu_engine import GpuDevice
    from .engines.engine_cache import EngineCache
    from .engines.tensorrt_build import BuildSettings
    from .executor.engine_choice import CpuSettings
    from .executor.engine_factory import SegmentEngine
    from .executor.hybrid_executor import Handoff, HybridExecutor

PathLike = str | os.PathLike[str]
log = logging.getLogger("hybrid_infer")


def _return_freed_memory() -> None:
    """Hand the memory freed after lowering back to the OS.

    Lowering holds the weights several times over (arrays, ONNX initializers, serialized
    bytes) and ONNX Runtime repacks them on its first run; afterwards those copies are
    freed, but glibc keeps the pages
    (on ResNet-50 about 400 MiB of resident memory) unless asked to trim. Some of those
    copies sit in reference cycles, so they are collected first.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@dataclass(frozen=True)
class CheckResult:
    """The hybrid against pure Caffe on the same inputs (``HybridNet.check``).

    ``rows`` compares every output and, after them, the input of every Softmax that
    produces an output (``softmax_inputs`` maps each such row's name to the Softmax):
    probabilities of random or confident logits saturate to exactly 0 and 1, so an error
    upstream only shows in the logits.
    """
    rows: list[OutputDifference]
    softmax_inputs: dict[str, str]
    tolerance: float

    @property
    def ok(self) -> bool:
        """Every compared blob, logits included, within ``tolerance`` (relative L2)."""
        return all(row.rel_l2 <= self.tolerance for row in self.rows)


def _batch(inputs: Mapping[str, np.ndarray]) -> Optional[int]:
    """The batch of checked inputs (all share it), or None for a net without inputs."""
    return next(iter(inputs.values())).shape[0] if inputs else None


class HybridNet:
    """A Caffe model partitioned between TensorRT (or a CPU engine: ONNX Runtime, OpenVINO) and Caffe.

    Engines are built on the first ``run`` and reused; ``partition`` needs no weights.
    ``engine="auto"`` without a TensorRT runtime measures the installed CPU engines on each
    segment at the first run's batch and keeps the fastest (``cpu_settings``: threads, BF16).
    ``device=N`` runs the Caffe segments on GPU N (checked here, so a wrong id fails
    before any work); tensors then pass between GPU engines as device pointers, or
    through the host with ``zero_copy=False`` (to measure the difference).
    ``keep_logits=True`` also makes the input of each final Softmax a segment output
    from the start, so that ``check`` builds no second set of engines.
    """

    def __init__(self, model: CaffeModel, *, engine: str = "auto", profile: str = "tensorrt",
                 min_segment_size: int = 3, fallback: Iterable[str] = (),
                 outputs: Sequence[str] = (), build_settings: Optional["BuildSettings"] = None,
                 engine_cache: Optional["EngineCache"] = None, tensorrt_module: Optional[str] = None,
                 device: Optional[int] = None, zero_copy: bool = True, keep_logits: bool = False,
                 cpu_settings: Optional["CpuSettings"] = None):
        self.model = model
        self.cpu_settings = cpu_settings
        self.zero_copy = zero_copy
        #: The GPU Caffe segments run on, or None for the CPU.
        self.gpu: Optional["GpuDevice"] = None
        if device is not None:
            from .engines.caffe_gpu_engine import use_gpu
            self.gpu = use_gpu(device)
        self.build_settings = build_settings
        self.engine_cache = engine_cache
        self.tensorrt_module = tensorrt_module
        #: Why the engine for supported segments is what it is (set when engines are built).
        self.engine_reason = ""
        self.graph = LayerGraph(model)
        self.requested_engine = engine
        self.output_blobs = list(outputs) or [self.graph.values[v].blob for v in self.graph.outputs]
        self._output_values = [self.graph.value_of_blob(b) for b in self.output_blobs]
        self._capability = Capability(profile, fallback)
        self._min_segment_size = min_segment_size
        self._kept = self._output_values + (list(self._logit_values()) if keep_logits else [])
        self.partition: Partition = partition(self.graph, self._capability, min_segment_size,
                                              keep_outputs=self._kept)
        self._executor: Optional["HybridExecutor"] = None
        self._first_run_done = False

    @property
    def input_blobs(self) -> list[str]:
        return [self.graph.values[v].blob for v in self.graph.inputs]

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.graph.values[v].blob: self.graph.values[v].shape for v in self.graph.inputs}

    @property
    def segment_engines(self) -> list["SegmentEngine"]:
        return self._ensure_executor().segment_engines

    def _ensure_executor(self, batch: Optional[int] = None) -> "HybridExecutor":
        """Build the engines (``batch``: the batch ``auto`` measures CPU engines at)."""
        if self._executor is None:
            from .engines.choice_cache import ChoiceCache
            from .executor.engine_choice import CandidateEngines, CpuSettings
            from .executor.engine_factory import build_engines, resolve_engine
            from .executor.hybrid_executor import HybridExecutor
            engine, self.engine_reason = resolve_engine(self.requested_engine, self.tensorrt_module)
            candidate_engines = CandidateEngines(
                self.cpu_settings or CpuSettings(),
                ChoiceCache(self.engine_cache.directory if self.engine_cache else None))
            factory = None
            if engine == "tensorrt":
                from .engines.tensorrt_segment import tensorrt_factory
                factory = tensorrt_factory(self.build_settings, self.engine_cache, self.tensorrt_module)
            rejected: dict[str, str] = {}
            while True:
                built = build_engines(self.graph, self.model, self.partition.segments, engine, factory,
                                      caffe_device=self.gpu, candidate_engines=candidate_engines, batch=batch)
                named = {layer: f"{se.refused_by} refused it: {se.fallback_note}" for se in built
                         for layer in se.rejected_layers if layer not in rejected}
                if not named:
                    break
                # Move only the refused layers to Caffe and cut again, rather than giving
                # Caffe a whole segment for one layer.
                for se in built:
                    se.engine.close()
                rejected.update(named)
                for layer, why in named.items():
                    log.warning("moving %s to Caffe and partitioning again: %s", layer, why)
                self.partition = partition(self.graph, self._capability, self._min_segment_size,
                                           keep_outputs=self._kept, rejected=rejected)
            for se in built:
                if se.fallback_note:
                    log.warning(se.fallback_note)
            self._executor = HybridExecutor(built, zero_copy=self.zero_copy)
        return self._executor

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate names, shapes and dtypes; return FP32 arrays keyed by input blob."""
        expected = self.input_shapes()
        unknown = [name for name in inputs if name not in expected]
        if unknown:
            raise InputError(f"{', '.join(unknown)}: not an input of {self.model.prototxt}; "
                             f"its inputs are {', '.join(expected)}")
        missing = [name for name in expected if name not in inputs]
        if missing:
            raise InputError(f"missing input(s) {', '.join(missing)} for {self.model.prototxt} "
                             f"(shapes {', '.join(f'{n}={expected[n]}' for n in missing)})")
        checked = {}
        batch = None
        for name, array in inputs.items():
            array = np.asarray(array)
            if not np.issubdtype(array.dtype, np.floating):
                raise InputError(f"input '{name}' has dtype {array.dtype}; Caffe nets take floating "
                                 "point (FP32) inputs: convert and scale it first")
            shape = expected[name]
            if array.ndim != len(shape) or tuple(array.shape[1:]) != tuple(shape[1:]):
                raise InputError(f"input '{name}' has shape {tuple(array.shape)}; the model expects "
                                 f"(N, {', '.join(map(str, shape[1:]))}) with any batch N")
            if batch is not None and array.shape[0] != batch:
                raise InputError(f"inputs have different batch sizes ({batch} and {array.shape[0]} for '{name}')")
            batch = array.shape[0]
            checked[name] = np.ascontiguousarray(array, dtype=np.float32)
        return checked

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the hybrid; returns the output blobs (or those named in ``outputs=``)."""
        checked = self.check_inputs(inputs)
        executor = self._ensure_executor(_batch(checked))
        feeds = {self.graph.input_value(name): array for name, array in checked.items()}
        values = executor.run(feeds, self._output_values)
        if not self._first_run_done:
            self._first_run_done = True
            _return_freed_memory()
        return {blob: values[v] for blob, v in zip(self.output_blobs, self._output_values)}

    def run_caffe(self, inputs: Mapping[str, np.ndarray], device: Optional[int] = None) -> dict[str, np.ndarray]:
        """The same model in pure Caffe (the reference hybrid_infer must reproduce), on the
        CPU or on GPU ``device``; outputs are copied to the host either way."""
        values = self.run_caffe_values(inputs, self._output_values, device)
        return {blob: values[v] for blob, v in zip(self.output_blobs, self._output_values)}

    def run_caffe_values(self, inputs: Mapping[str, np.ndarray], values: Sequence[str],
                         device: Optional[int] = None) -> dict[str, np.ndarray]:
        """Pure Caffe on ``inputs``, returning ``values`` (value ids of ``graph``), each copied
        right after the layer that writes it: Caffe's blobs keep only their last write, and
        in-place layers overwrite earlier ones (a net input rewritten in place included).
        Caffe runs only as far as the last of them."""
        checked = self.check_inputs(inputs)
        net = self.model.reference_net()
        if device is None:
            caffe().set_mode_cpu()  # another engine may have left Caffe in GPU mode
        else:
            from .engines.caffe_gpu_engine import use_gpu
            use_gpu(device)
        reshaped = False
        for name, array in checked.items():
            if tuple(net.blobs[name].shape) != array.shape:
                net.blobs[name].reshape(*array.shape)
                reshaped = True
        if reshaped:
            net.reshape()
        for name, array in checked.items():
            net.blobs[name].data[...] = array
        index = {name: i for i, name in enumerate(net._layer_names)}
        wanted = sorted(set(values), key=lambda v: index[self.graph.values[v].producer])
        got: dict[str, np.ndarray] = {}
        start = 0
        for value in wanted:
            stop = index[self.graph.values[value].producer]
            if stop >= start:
                net._forward(start, stop)
                start = stop + 1
            got[value] = np.array(net.blobs[self.graph.values[value].blob].data, copy=True)
        return got

    def _logit_values(self) -> dict[str, str]:
        """The input value of each Softmax that writes an output value -> that Softmax."""
        logits: dict[str, str] = {}
        for value in self._output_values:
            layer = self.graph.layers[self.graph.values[value].producer]
            if layer.type == "Softmax":
                logits.setdefault(layer.bottoms[0], layer.name)
        return logits

    def outputs_with_logits(self) -> list[str]:
        """The output blobs plus the input blob of each final Softmax.

        Accuracy checks compare those logits too: the softmax of random (or confident)
        logits saturates to 0 and 1 and would hide errors.
        """
        return list(self.output_blobs) + [self.graph.values[v].blob for v in self._logit_values()]

    def check(self, inputs: Mapping[str, np.ndarray], tolerance: float = 1e-4) -> CheckResult:
        """Run the hybrid and pure Caffe on ``inputs`` and compare the outputs and the input
        of each final Softmax (relative L2 against ``tolerance``; see ``CheckResult``).

        Without ``keep_logits=True`` at load, the logits become segment outputs now, which
        rebuilds the engines once."""
        logits = self._logit_values()
        if any(v not in self._kept for v in logits):
            self.close()
            self._kept = self._output_values + list(logits)
            self.partition = partition(self.graph, self._capability, self._min_segment_size,
                                       keep_outputs=self._kept)
        wanted = self._output_values + [v for v in logits if v not in self._output_values]
        checked = self.check_inputs(inputs)
        got = self._ensure_executor(_batch(checked)).run(
            {self.graph.input_value(name): a for name, a in checked.items()}, wanted)
        want = self.run_caffe_values(inputs, wanted)
        names = dict(zip(self._output_values, self.output_blobs))
        for value in wanted[len(self._output_values):]:
            blob = self.graph.values[value].blob
            names[value] = blob if self.graph.final_value[blob] == value else value
        rows = compare_outputs({names[v]: got[v] for v in wanted}, {names[v]: want[v] for v in wanted})
        return CheckResult(rows, {names[v]: softmax for v, softmax in logits.items()}, tolerance)

    def partition_report(self, fmt: str = "text") -> str:
        """The partition as the CLI shows it: "text", "json", "dot" or "svg"."""
        from .report.partition_report import FORMATS
        if fmt not in FORMATS:
            raise OptionError(f"unknown report format '{fmt}'; choose one of {', '.join(sorted(FORMATS))}")
        return FORMATS[fmt](self.partition)

    def segment_times(self) -> dict[int, float]:
        """Seconds each segment took in the last ``run``."""
        return dict(self._executor.last_times) if self._executor else {}

    def handoffs(self) -> list["Handoff"]:
        """How each tensor of the last ``run`` went from producer to consumer, and its bytes."""
        return list(self._executor.last_handoffs) if self._executor else []

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def __enter__(self) -> "HybridNet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(prototxt: PathLike, weights: Optional[PathLike] = None, *, engine: str = "auto",
         profile: str = "tensorrt", min_segment_size: int = 3, fallback: Iterable[str] = (),
         outputs: Sequence[str] = (), random_weights: Optional[int] = None,
         input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
         build_settings: Optional["BuildSettings"] = None, engine_cache: Optional["EngineCache"] = None,
         tensorrt_module: Optional[str] = None, device: Optional[int] = None,
         zero_copy: bool = True, lowerings: Sequence["LoweringModule"] = (),
         keep_logits: bool = False, cpu_settings: Optional["CpuSettings"] = None) -> HybridNet:
    """Load a Caffe model and partition it.

    ``lowerings`` names modules (importable names, ``.py`` paths, or modules) whose
    ``register_lowering`` calls add lowerings for the user's own layers; they are imported
    before partitioning, and their registrations last for the process. Installed packages'
    entry points (group ``hybrid_infer.lowerings``) are loaded without being named.

    ``random_weights=SEED`` fills every parameter with random values instead of reading a
    caffemodel (for models shipped without weights; benchmarks and tests).
    ``input_shapes={"data": (1, 3, 720, 1280)}`` replaces the prototxt's input sizes; the
    batch axis stays free either way. ``build_settings``, ``engine_cache`` and
    ``tensorrt_module`` ("tensorrt" or "tensorrt_rtx") steer TensorRT engine builds.
    ``device=N`` runs Caffe segments on GPU N and ``keep_logits=True`` prepares ``check``
    (see ``HybridNet``). ``cpu_settings`` (``executor.engine_choice.CpuSettings``) sets CPU
    engines' threads and OpenVINO's BF16.
    """
    load_lowering_modules(lowerings)
    model = CaffeModel(prototxt, weights, input_shapes)
    if random_weights is not None:
        model.set_random_weights(random_weights)
    return HybridNet(model, engine=engine, profile=profile, min_segment_size=min_segment_size,
                     fallback=fallback, outputs=outputs, build_settings=build_settings,
                     engine_cache=engine_cache, tensorrt_module=tensorrt_module, device=device,
                     zero_copy=zero_copy, keep_logits=keep_logits, cpu_settings=cpu_settings)
