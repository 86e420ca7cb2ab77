"""The Python entry point: ``hybrid_infer.load(...)`` returns a ``HybridNet``."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

import numpy as np

from . import arguments
from .engines.caffe_batch import BATCH_ARITHMETIC, check_feed_batch
from .errors import InputError, ModelError, OptionError
from .graph.layer_graph import Layer, LayerGraph
from .index_inputs import check_index_inputs, index_inputs
from .lowering.detection import caffe_abort
from .inputs import check_float32_range
from .lowering.plugins import LoweringModule, load_lowering_modules
from .detections import DETECTION_TOLERANCE, detection_outputs
from .metrics import OutputDifference, compare_outputs
from .model.caffe_import import caffe
from .model.caffe_limits import aborts_on_values, refuse_cpu_unsupported
from .model.caffe_model import CaffeModel
from .memory_budget import check_fits
from .model.isolated import Rehearsal, caffe_errors
from .partition.capability import PROFILES, Capability
from .partition.partitioner import CAFFE, Partition, partition

if TYPE_CHECKING:  # the engines pull in ONNX and ONNX Runtime: loaded when a run needs them
    from .engines.caffe_gpu_engine import GpuDevice
    from .engines.engine_cache import EngineCache
    from .engines.tensorrt_build import BuildSettings
    from .executor.engine_choice import CpuSettings
    from .executor.engine_factory import SegmentEngine
    from .executor.hybrid_executor import Handoff, HybridExecutor
    from .precision.calibration_file import Calibration
    from .precision.plan import PrecisionPlan

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

    ``rows`` compares every output and, after them, the input of every Softmax layer of
    the net (``softmax_inputs`` maps each such row's name to its Softmax): probabilities of
    random or confident logits saturate to exactly 0 and 1, so an error upstream only
    shows in the logits, also where the probabilities feed other layers (SSD's
    ``mbox_conf_softmax`` -> Flatten -> DetectionOutput).
    """
    rows: list[OutputDifference]
    softmax_inputs: dict[str, str]
    tolerance: float

    @property
    def ok(self) -> bool:
        """Every compared blob, logits included, within ``tolerance`` (relative L2; DetectionOutput
        blobs: no difference between detections other than near-ties, see ``detections``)."""
        return all(row.within(self.tolerance) for row in self.rows)


def _batch(inputs: Mapping[str, np.ndarray]) -> Optional[int]:
    """The batch of checked inputs (all share it), or None for a net without inputs."""
    return next(iter(inputs.values())).shape[0] if inputs else None


class HybridNet:
    """A Caffe model partitioned between TensorRT (or ONNX Runtime's CUDA provider, or a CPU
    engine: ONNX Runtime, OpenVINO) and Caffe.

    Engines are built on the first ``run`` and reused; ``partition`` needs no weights.
    ``engine="auto"`` takes TensorRT where a runtime supports the GPU, else ONNX Runtime's
    CUDA provider where onnxruntime-gpu and a GPU are present (on the Caffe segments' GPU,
    else GPU 0; ``cuda_graphs=False`` turns its CUDA graphs off), else measures the
    installed CPU engines on each segment at the first run's batch and keeps the fastest
    (``cpu_settings``: threads, BF16).
    ``device=N`` runs the Caffe segments on GPU N (checked here, so a wrong id fails
    before any work); tensors then pass between GPU engines as device pointers, or
    through the host with ``zero_copy=False`` (to measure the difference).
    ``keep_logits=True`` also makes the input of every Softmax a segment output from the
    start, so that ``check`` and ``run_values`` build no second set of engines.

    Arguments of the wrong type or range raise ``OptionError`` naming the argument.
    """

    def __init__(self, model: CaffeModel, *, engine: str = "auto", profile: str = "tensorrt",
                 min_segment_size: int = 3, fallback: Iterable[str] = (),
                 outputs: Sequence[str] = (), build_settings: Optional["BuildSettings"] = None,
                 engine_cache: Optional["EngineCache"] = None, tensorrt_module: Optional[str] = None,
                 device: Optional[int] = None, zero_copy: bool = True, keep_logits: bool = False,
                 calibration: "PathLike | Calibration | PrecisionPlan | None" = None, keep_fp32: Iterable[str] = (),
                 cpu_settings: Optional["CpuSettings"] = None, cuda_graphs: bool = True):
        from .executor.engine_factory import ENGINES
        if not isinstance(model, CaffeModel):
            raise OptionError(f"model must be a CaffeModel (hybrid_infer.load reads one from files), "
                              f"not {type(model).__name__}")
        engine = arguments.choice(engine, "engine", ENGINES)
        profile = arguments.choice(profile, "profile", PROFILES)
        min_segment_size = arguments.integer(min_segment_size, "min_segment_size")
        fallback = arguments.names(fallback, "fallback")
        outputs = arguments.names(outputs, "outputs")
        device = arguments.optional(arguments.integer, device, "device")
        tensorrt_module = arguments.optional(arguments.choice, tensorrt_module, "tensorrt_module",
                                             ("tensorrt", "tensorrt_rtx"))
        self._check_types(build_settings=build_settings, engine_cache=engine_cache, cpu_settings=cpu_settings)
        self.model = model
        self.cpu_settings = cpu_settings
        if cpu_settings is not None and cpu_settings.bf16 and engine not in ("auto", "openvino"):
            raise OptionError(f"BF16 (cpu_settings) applies to OpenVINO: use it with engine='openvino' or 'auto', "
                              f"not {engine!r}")
        #: ONNX Runtime CUDA segments replay CUDA graphs (one per batch size) where they can.
        self.cuda_graphs = bool(cuda_graphs)
        self.zero_copy = bool(zero_copy)
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
        #: Net inputs that Embed layers read as indices (value id -> those layers).
        self._index_inputs = index_inputs(self.graph)
        self.requested_engine = engine
        self.output_blobs = list(outputs) or [self.graph.values[v].blob for v in self.graph.outputs]
        self._output_values = [self.graph.value_of_blob(b) for b in self.output_blobs]
        self._capability = Capability(profile, fallback)
        self._min_segment_size = min_segment_size
        self._kept = list(self.checked_values()) if keep_logits else list(self._output_values)
        #: Layers that would abort pure Caffe on this net (checked before Caffe runs them).
        self.caffe_aborts = {layer.name: why for layer in self.graph.layers.values()
                             if layer.type == "DetectionOutput" and (why := caffe_abort(layer, self.graph))}
        for why in self.caffe_aborts.values():
            log.warning("pure Caffe cannot run this net, so it cannot be checked against it: %s", why)
        self.partition: Partition = partition(self.graph, self._capability, min_segment_size,
                                              keep_outputs=self._kept)
        self._refuse_caffe_aborts()
        self._executor: Optional["HybridExecutor"] = None
        self._first_run_done = False
        from .precision.plan import plan_for
        #: Reduced precision for the TensorRT segments (None: FP32), from ``calibration``.
        self.precision: Optional["PrecisionPlan"] = plan_for(calibration, model, self.graph, keep_fp32)
        if self.precision is not None and build_settings is not None and build_settings.fp16:
            raise OptionError("fp16 build settings with a calibration: the calibration sets the precision "
                              "(calibrate with --precision fp16 for FP16 engines)")
        self._reference_rehearsal = Rehearsal(every_run=aborts_on_values(self.model.layers))
        #: Batches ``_execute`` has found the net's fixed-batch layers to allow.
        self._batches_checked: set[Optional[int]] = set()

    @staticmethod
    def _check_types(**given: object) -> None:
        from .engines.engine_cache import EngineCache
        from .engines.tensorrt_build import BuildSettings
        from .executor.engine_choice import CpuSettings
        expected = {"build_settings": BuildSettings, "engine_cache": EngineCache, "cpu_settings": CpuSettings}
        for name, value in given.items():
            if value is not None and not isinstance(value, expected[name]):
                raise OptionError(f"{name} must be a {expected[name].__name__} or None, not {type(value).__name__}")

    def _refuse_caffe_aborts(self) -> None:
        """A layer that would abort Caffe must not be in a Caffe segment."""
        for name, why in self.caffe_aborts.items():
            if self.partition.segment_of(name).backend == CAFFE:
                raise ModelError(f"{self.model.prototxt}: {why}; it would run in Caffe here "
                                 f"({self.partition.fallback_reasons.get(name, 'not lowered')}), which aborts")

    @property
    def input_blobs(self) -> list[str]:
        return [self.graph.values[v].blob for v in self.graph.inputs]

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.graph.values[v].blob: self.graph.values[v].shape for v in self.graph.inputs}

    def index_readers(self, input_blob: str) -> list[Layer]:
        """The layers that read net input ``input_blob`` as indices (Embed, BatchReindex; empty if none)."""
        return self._index_inputs.get(self.graph.input_value(input_blob), [])

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
                                      caffe_device=self.gpu, candidate_engines=candidate_engines, batch=batch,
                                      transform=self.precision.segment_model if self.precision else None,
                                      cuda_device=self.gpu.index if self.gpu else 0, cuda_graphs=self.cuda_graphs)
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
                self._refuse_caffe_aborts()
            for se in built:
                if se.fallback_note:
                    log.warning(se.fallback_note)
            self._executor = HybridExecutor(built, zero_copy=self.zero_copy)
        return self._executor

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate names, shapes and dtypes, and the values of inputs that Embed layers read
        as indices (``index_inputs``); return FP32 arrays keyed by input blob.

        Raises ``InputError`` for anything that does not fit the model, including a batch
        whose activations would not fit in memory (``memory_budget.py``)."""
        if not isinstance(inputs, Mapping):
            raise InputError(f"inputs must be a dict of input name -> array, not {type(inputs).__name__}")
        wrong = [name for name in inputs if not isinstance(name, str)]
        if wrong:
            raise InputError(f"input names must be str (blob names), not {type(wrong[0]).__name__} {wrong[0]!r}")
        expected = self.input_shapes()
        unknown = [name for name in inputs if name not in expected]
        if unknown:
            raise InputError(f"{', '.join(unknown)}: not an input of {self.model.prototxt}; "
                             f"its inputs are {', '.join(expected)}")
        missing = [name for name in expected if name not in inputs]
        if missing:
            raise InputError(f"missing input(s) {', '.join(missing)} for {self.model.prototxt} "
                             f"(shapes {', '.join(f'{n}={expected[n]}' for n in missing)})")
        self._check_batch_axes(expected)
        checked = {}
        batch = None
        for name, array in inputs.items():
            try:
                array = np.asarray(array)
            except (TypeError, ValueError) as exc:
                raise InputError(f"input '{name}' is not an array ({exc})") from None
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
            check_float32_range(array, f"input '{name}'")
            checked[name] = np.ascontiguousarray(array, dtype=np.float32)
        if batch is not None:
            if batch < 1:
                raise InputError(f"inputs have batch size 0: there is nothing to run {self.model.prototxt} on")
            self.check_memory(batch)
        check_index_inputs(self.graph, self._index_inputs,
                           {self.graph.input_value(name): array for name, array in checked.items()})
        return checked

    def _check_batch_axes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse a model whose inputs differ on their first axis at set-up. hybrid_infer takes
        axis 0 of every net input as the batch axis, one batch shared by all (the segments'
        engines are built with it as their one dynamic dimension); Caffe itself just takes
        whatever shapes it is given, so such a model (a second input of a few parameters
        without a batch axis, say) runs in Caffe but not here as written."""
        firsts = {name: shape[0] for name, shape in shapes.items() if shape}
        if len(set(firsts.values())) > 1:
            listing = ", ".join(f"'{name}' {shapes[name]}" for name in firsts)
            raise InputError(f"{self.model.prototxt}: its inputs differ on their first axis ({listing}); hybrid_infer "
                             "takes axis 0 of every input as the batch axis, which all inputs share: give each "
                             "input a leading batch axis in the prototxt (e.g. shape { dim: 1 dim: 3 } for 3 "
                             "values), or make the first axes agree with --input-shape")

    def activation_bytes(self, batch: int) -> int:
        """FP32 bytes of every value of the net at ``batch``: about what one run holds in its
        activations (the hybrid holds about this much, the Caffe reference as much again)."""
        return batch * sum(v.bytes_per_item for v in self.graph.values.values())

    def check_memory(self, batch: int, extra_bytes: int = 0) -> None:
        """Raise ``InputError`` if a run at ``batch`` (plus ``extra_bytes``) cannot fit in memory."""
        check_fits(self.activation_bytes(batch) + extra_bytes, f"running {self.model.prototxt} at batch {batch}",
                   "use a smaller batch (--batch) or input size (--input-shape)")

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the hybrid; returns the output blobs (or those named in ``outputs=``). With an
        INT8 calibration, the first run warns (logging) when the inputs lie far outside, or use
        only a sliver of, the calibrated input range (other preprocessing, ``precision.checks``)."""
        checked = self.check_inputs(inputs)
        feeds = {self.graph.input_value(name): array for name, array in checked.items()}
        if not self._first_run_done and self.precision is not None:
            from .precision.checks import out_of_range
            for warning in out_of_range(self.precision.calibration, feeds):  # once, on the first run
                log.warning(warning)
        values = self._execute(feeds, self._output_values)
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
        Caffe runs only as far as the last of them; the first run at each input shape is
        rehearsed in full in a forked child first (``model/isolated.py``)."""
        device = arguments.optional(arguments.integer, device, "device")
        checked = self.check_inputs(inputs)
        where = f"{self.model.prototxt} in pure Caffe"
        if device is None:
            refuse_cpu_unsupported(self.model.layers, where)
        check_feed_batch(self.graph, self.graph.layers.values(),
                         {self.graph.input_value(name): array.shape for name, array in checked.items()})
        last = max((self.graph.layers[self.graph.values[v].producer].index for v in values), default=-1)
        aborts = [why for name, why in self.caffe_aborts.items() if self.graph.layers[name].index <= last]
        if aborts:
            raise ModelError(f"{self.model.prototxt}: pure Caffe cannot run this net (--check, compare and diff "
                             f"need it): {aborts[0]}")
        net = self.model.reference_net()
        if device is None:
            caffe().set_mode_cpu()  # another engine may have left Caffe in GPU mode
        else:
            from .engines.caffe_gpu_engine import use_gpu
            use_gpu(device)

        def feed() -> None:
            reshaped = False
            for name, array in checked.items():
                if tuple(net.blobs[name].shape) != array.shape:
                    net.blobs[name].reshape(*array.shape)
                    reshaped = True
            if reshaped:
                net.reshape()
            for name, array in checked.items():
                net.blobs[name].data[...] = array

        def whole_net() -> None:
            feed()
            net._forward(0, len(net.layers) - 1)
        if device is None:  # CUDA cannot be used in a forked child
            caffe_errors(where, self._reference_rehearsal.check, tuple((n, a.shape) for n, a in checked.items()),
                         whole_net)
        caffe_errors(where, feed)
        index = {name: i for i, name in enumerate(net._layer_names)}
        wanted = sorted(set(values), key=lambda v: index[self.graph.caffe_layer(v)])
        got: dict[str, np.ndarray] = {}
        start = 0
        for value in wanted:
            stop = index[self.graph.caffe_layer(value)]
            if stop >= start:
                caffe_errors(where, net._forward, start, stop)
                start = stop + 1
            got[value] = np.array(net.blobs[self.graph.values[value].blob].data, copy=True)
        return got

    def _logit_values(self) -> dict[str, str]:
        """The input value of every Softmax layer -> that Softmax (net inputs and the
        outputs already compared left out)."""
        logits: dict[str, str] = {}
        for layer in self.graph.compute_layers():
            value = layer.bottoms[0] if layer.type == "Softmax" else None
            if value is not None and value not in self.graph.inputs and value not in self._output_values:
                logits.setdefault(value, layer.name)
        return logits

    def _name(self, value: str) -> str:
        """How results name ``value``: its blob, unless a later write took the blob's name."""
        blob = self.graph.values[value].blob
        return blob if self.graph.final_value[blob] == value else value

    def checked_values(self) -> dict[str, str]:
        """What accuracy checks compare (``check``, ``compare``, ``--min-segment-size auto``):
        value id -> the name its row gets; the outputs, then the input of every Softmax."""
        names = dict(zip(self._output_values, self.output_blobs))
        names.update((v, self._name(v)) for v in self._logit_values())
        return names

    def outputs_with_logits(self) -> list[str]:
        """The output blobs plus the input of every Softmax (a blob name, or the value id
        where an in-place layer rewrites the blob later)."""
        return list(self.checked_values().values())

    def run_values(self, inputs: Mapping[str, np.ndarray], values: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the hybrid and return ``values`` (value ids). Values not yet segment outputs
        become outputs now, which re-cuts and, once engines exist, rebuilds them."""
        if any(v not in self._kept for v in values):
            self.close()
            self._kept = list(dict.fromkeys([*self._kept, *values]))
            self.partition = partition(self.graph, self._capability, self._min_segment_size,
                                       keep_outputs=self._kept)
        feeds = {self.graph.input_value(name): a for name, a in self.check_inputs(inputs).items()}
        return self._execute(feeds, list(values))

    def _execute(self, feeds: Mapping[str, np.ndarray], values: Sequence[str]) -> dict[str, np.ndarray]:
        """The executor's run of ``feeds`` (value id -> array). A net with a layer whose
        arithmetic spans the set-up batch (InnerProduct on axis 0, a Reshape writing the
        batch: ``caffe_batch.BATCH_ARITHMETIC``) is refused at another batch before any engine
        runs, with the way out: Caffe cannot run it there, ONNX Runtime fails on it, and
        OpenVINO would give an answer (it dropped the extra images of such a Reshape)."""
        batch = _batch(feeds)
        if batch not in self._batches_checked:
            check_feed_batch(self.graph, [layer for layer in self.graph.layers.values()
                                          if layer.type in BATCH_ARITHMETIC],
                             {value: array.shape for value, array in feeds.items()})
            self._batches_checked.add(batch)
        from .errors import EngineRejected
        try:
            return self._ensure_executor(batch).run(feeds, list(values))
        except EngineRejected as exc:
            failed = [self.graph.layers[name] for name in exc.caffe_layers if name in self.graph.layers]
            check_feed_batch(self.graph, failed, {value: array.shape for value, array in feeds.items()})
            raise

    def reference_values(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pure Caffe's values of ``checked_values`` on ``inputs`` (value id -> array)."""
        return self.run_caffe_values(inputs, list(self.checked_values()))

    def compare_values(self, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
                       tolerance: float = 1e-4) -> list[OutputDifference]:
        """Rows (named as in ``checked_values``) comparing the hybrid's ``got`` with Caffe's
        ``want``, both keyed by value id, for every value in ``checked_values``; DetectionOutput
        blobs are compared as detections (``tolerance`` bounds their scores and coordinates)."""
        names = self.checked_values()
        detections = {names[v]: t for v, t in detection_outputs(self.graph).items() if v in names}
        return compare_outputs({names[v]: got[v] for v in names}, {names[v]: want[v] for v in names},
                               detections=detections, tolerance=tolerance)

    def check(self, inputs: Mapping[str, np.ndarray], tolerance: float = 1e-4) -> CheckResult:
        """Run the hybrid and pure Caffe on ``inputs`` and compare the outputs and the input
        of every Softmax (relative L2 against ``tolerance``; see ``CheckResult``).

        Without ``keep_logits=True`` at load, the logits become segment outputs now, which
        rebuilds the engines once."""
        tolerance = arguments.real(tolerance, "tolerance", 0.0)
        wanted = list(self.checked_values())
        # Detections under reduced precision match within DETECTION_TOLERANCE at most: a
        # relative-L2 tolerance of 0.5 as a score margin excused every lost detection below 0.5.
        matching = min(tolerance, DETECTION_TOLERANCE) if self.precision is not None else tolerance
        rows = self.compare_values(self.run_values(inputs, wanted), self.run_caffe_values(inputs, wanted), matching)
        names = self.checked_values()
        return CheckResult(rows, {names[v]: softmax for v, softmax in self._logit_values().items()}, tolerance)

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
         keep_logits: bool = False, calibration: "PathLike | Calibration | PrecisionPlan | None" = None,
         keep_fp32: Iterable[str] = (), cpu_settings: Optional["CpuSettings"] = None,
         cuda_graphs: bool = True) -> HybridNet:
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
    (see ``HybridNet``). Arguments of the wrong type or range raise ``OptionError`` naming
    the argument.
    ``calibration`` (a file from ``hybrid-infer calibrate``, or a loaded ``Calibration``)
    runs the TensorRT segments in its precision (INT8 Q/DQ or FP16), with ``keep_fp32``
    (layer names or types) left in FP32; a stale file raises ``CalibrationError``.
    ``cpu_settings`` (``executor.engine_choice.CpuSettings``) sets CPU
    engines' threads and OpenVINO's BF16; ``cuda_graphs`` ONNX Runtime CUDA's graph replay.
    """
    prototxt = arguments.path(prototxt, "prototxt")
    weights = arguments.optional(arguments.path, weights, "weights")
    random_weights = arguments.optional(arguments.integer, random_weights, "random_weights", 0, 2**64 - 1)
    input_shapes = arguments.shapes(input_shapes, "input_shapes")
    load_lowering_modules(lowerings)
    model = CaffeModel(prototxt, weights, input_shapes)
    if random_weights is not None:
        model.set_random_weights(random_weights)
    return HybridNet(model, engine=engine, profile=profile, min_segment_size=min_segment_size,
                     fallback=fallback, outputs=outputs, build_settings=build_settings,
                     engine_cache=engine_cache, tensorrt_module=tensorrt_module, device=device,
                     zero_copy=zero_copy, keep_logits=keep_logits, calibration=calibration,
                     keep_fp32=keep_fp32, cpu_settings=cpu_settings,
                     cuda_graphs=cuda_graphs)
