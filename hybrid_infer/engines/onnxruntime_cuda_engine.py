"""ONNX Runtime's CUDA execution provider as a device engine for TensorRT segments.

Where no TensorRT runtime supports the GPU (TensorRT-RTX refuses compute capability 9.0,
data-center TensorRT may be missing) but ``onnxruntime-gpu`` is installed, a segment's ONNX
runs on the GPU through ONNX Runtime. Like the TensorRT engine it offers ``run_device``:
inputs and outputs are bound to device memory with I/O binding, so a tensor goes to and
from a Caffe GPU segment (or another device engine) by pointer, never through the host.

Memory: the engine owns one output buffer per output and batch size, allocated on the
first run at that batch and reused afterwards; outputs stay valid until the engine's next
run or ``close``, as with the other device engines. Inputs from other engines are bound
by pointer (borrowed for the run) unless CUDA graphs are on (below).

Streams: ONNX Runtime runs on its own stream and synchronises it before ``run_with_iobinding``
returns, and every producer synchronises its stream before handing a tensor over (Caffe's
runs end with a device synchronisation), so each boundary is ordered explicitly.

CUDA graphs (ONNX Runtime's ``enable_cuda_graph``) replay a captured launch sequence,
which needs fixed input and output addresses and every node on the CUDA provider: inputs
are then copied into engine-owned buffers (device to device, with the native extension)
and one graph is captured per batch size. A segment that cannot be captured (nodes ONNX
Runtime places on the CPU, data-dependent output shapes, no device copy available) runs
without graphs, and ``cuda_graph_note`` says why.

TF32 is off unless asked for, so FP32 results match Caffe's.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import numpy as np

from ..errors import EngineRejected, EnvironmentProblem, InputError
from .caffe_gpu_engine import TransferCount
from .device_tensor import DeviceTensor

if TYPE_CHECKING:
    import onnx

FLOAT32 = np.dtype(np.float32)
BATCH = -1
PROVIDER = "CUDAExecutionProvider"


def cuda_provider_available() -> tuple[bool, str]:
    """Whether this ONNX Runtime build has the CUDA provider, and why not."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return False, f"onnxruntime cannot be imported ({exc})"
    if PROVIDER not in ort.get_available_providers():
        return False, (f"this ONNX Runtime ({ort.__version__}) has no CUDA provider; install "
                       "onnxruntime-gpu (pip install '.[gpu]') instead of onnxruntime")
    return True, f"ONNX Runtime {ort.__version__} has the CUDA provider"


def gpu_count() -> int:
    """GPUs the CUDA driver sees (0 without a driver): the provider is in every
    onnxruntime-gpu build, GPU or not, so its presence alone says nothing about a GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def runtime_available() -> tuple[bool, str]:
    """Whether segments can run on ONNX Runtime's CUDA provider here (provider and a GPU),
    and why (not)."""
    ok, reason = cuda_provider_available()
    count = gpu_count()
    if count == 0:
        return False, "no GPU is visible here (no CUDA driver, or it sees no device)"
    if not ok:
        return ok, reason
    return True, f"{reason} and {count} GPU(s)"


def _device_copy() -> Optional[Any]:
    """The native extension's device-to-device copy, when it was built against a CUDA Caffe."""
    try:
        from ..native import blob_access
        native = blob_access()
    except Exception:  # no extension, or one for another Caffe: no device copies here
        return None
    return native if native.cuda_enabled() and hasattr(native, "copy_on_device") else None


@dataclass
class _Bound:
    """The I/O binding and engine-owned device buffers for one batch size."""
    binding: Any
    outputs: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    #: Run options naming this batch's CUDA graph (``gpu_graph_id``), or plain ones.
    run_options: Any = None


class OnnxRuntimeCudaEngine:
    """One ONNX Runtime session on GPU ``device``, with device-resident inputs and outputs.

    Raises EnvironmentProblem when the CUDA provider is missing and EngineRejected when
    ONNX Runtime refuses the segment or cannot place it on the GPU.
    """

    kind = "onnxruntime-cuda"

    def __init__(self, model: "onnx.ModelProto", *, device: int = 0, cuda_graph: bool = True,
                 tf32: bool = False, label: str = "segment"):
        import onnxruntime as ort
        ok, reason = runtime_available()
        if not ok:
            raise EnvironmentProblem(f"--engine onnxruntime-cuda cannot run here: {reason}")
        self._ort = ort
        self.device = device
        self.label = label
        self.transfers = TransferCount()
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = [o.name for o in model.graph.output]
        #: Output dims: ints, BATCH for the batch axis, None where the data decides.
        self._output_dims = {o.name: _output_dims(o) for o in model.graph.output}
        self._copy = _device_copy()
        self.cuda_graph_note: Optional[str] = None
        if cuda_graph:
            blocker = self._graph_blocker()
            if blocker is None:
                try:
                    self._session = self._create(model, cuda_graph=True, tf32=tf32)
                except EngineRejected as exc:
                    self.cuda_graph_note = f"no CUDA graph: {exc}"
                    cuda_graph = False
            else:
                self.cuda_graph_note = f"no CUDA graph: {blocker}"
                cuda_graph = False
        if not cuda_graph:
            self._session = self._create(model, cuda_graph=False, tf32=tf32)
        self.cuda_graph = cuda_graph
        self._bound: dict[int, _Bound] = {}
        self._outputs_by_ptr: dict[int, Any] = {}

    def _graph_blocker(self) -> Optional[str]:
        if any(dims is None for dims in self._output_dims.values()):
            return "an output's shape depends on the data"
        if self._copy is None:
            return ("device-to-device copies need hybrid_infer's native extension built against a CUDA "
                    "Caffe (scripts/setup.sh --cuda)")
        return None

    def _create(self, model: "onnx.ModelProto", *, cuda_graph: bool, tf32: bool) -> Any:
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        cuda_options = {"device_id": str(self.device), "use_tf32": "1" if tf32 else "0",
                        "enable_cuda_graph": "1" if cuda_graph else "0"}
        try:
            session = ort.InferenceSession(model.SerializeToString(), options,
                                           providers=[(PROVIDER, cuda_options), "CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            from ..lowering.segment_to_onnx import layers_named_in
            raise EngineRejected(f"ONNX Runtime (CUDA) rejected {self.label}: {str(exc).splitlines()[0]}",
                                 layers_named_in(str(exc), model)) from exc
        if session.get_providers()[0] != PROVIDER:
            raise EngineRejected(f"ONNX Runtime could not use the CUDA provider for {self.label} "
                                 "(is a GPU visible, with CUDA 13 and cuDNN 9 libraries?)")
        return session

    def _prepare(self, batch: int) -> _Bound:
        """The binding and output buffers for ``batch``, made on first use."""
        bound = self._bound.get(batch)
        if bound is not None:
            return bound
        ort = self._ort
        binding = self._session.io_binding()
        outputs = {}
        for name, dims in self._output_dims.items():
            if dims is None:
                binding.bind_output(name, "cuda", self.device)
                continue
            shape = tuple(batch if d == BATCH else d for d in dims)
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, FLOAT32, "cuda", self.device)
            binding.bind_ortvalue_output(name, value)
            outputs[name] = value
        bound = _Bound(binding, outputs, run_options=ort.RunOptions())
        if self.cuda_graph:  # one captured graph per batch size, ids from 1 (-1: none)
            bound.run_options.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
        self._bound[batch] = bound
        return bound

    def run_device(self, feeds: Mapping[str, Union[np.ndarray, DeviceTensor]]) -> dict[str, DeviceTensor]:
        """Run on host arrays or device tensors (float32, N-first); return outputs left in GPU
        memory, valid until the next run or ``close``. Raises InputError for a missing input."""
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise InputError(f"{self.label} needs input(s) {', '.join(missing)}")
        batch = int(feeds[self.input_names[0]].shape[0])
        bound = self._prepare(batch)
        for name in self.input_names:
            self._bind_input(bound, name, feeds[name])
        self._session.run_with_iobinding(bound.binding, bound.run_options)
        produced = dict(zip(self.output_names, bound.binding.get_outputs()))
        results = {}
        self._outputs_by_ptr = {}
        for name in self.output_names:
            value = bound.outputs.get(name, produced[name])
            self._outputs_by_ptr[value.data_ptr()] = value
            results[name] = DeviceTensor(value.data_ptr(), tuple(value.shape()), FLOAT32)
        return results

    def _bind_input(self, bound: _Bound, name: str, feed: Union[np.ndarray, DeviceTensor]) -> None:
        shape = tuple(int(d) for d in feed.shape)
        if isinstance(feed, DeviceTensor):
            if np.dtype(feed.dtype) != FLOAT32:
                raise InputError(f"device tensor '{name}' is {np.dtype(feed.dtype)}; {self.label} takes float32")
            if not self.cuda_graph:
                bound.binding.bind_input(name, "cuda", self.device, FLOAT32, list(shape), feed.ptr)
                return
            buffer = self._input_buffer(bound, name, shape)
            self._copy.copy_on_device(buffer.data_ptr(), feed.ptr, feed.nbytes)
            return
        array = np.ascontiguousarray(feed, dtype=np.float32)
        buffer = self._input_buffer(bound, name, shape)
        buffer.update_inplace(array)
        self.transfers.uploads += 1
        self.transfers.upload_bytes += array.nbytes

    def _input_buffer(self, bound: _Bound, name: str, shape: tuple[int, ...]) -> Any:
        buffer = bound.inputs.get(name)
        if buffer is None or tuple(buffer.shape()) != shape:
            buffer = self._ort.OrtValue.ortvalue_from_shape_and_type(shape, FLOAT32, "cuda", self.device)
            bound.inputs[name] = buffer
            bound.binding.bind_ortvalue_input(name, buffer)
        return buffer

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in and out (one copy each way per tensor)."""
        return {name: self.download(tensor) for name, tensor in self.run_device(feeds).items()}

    def download(self, tensor: DeviceTensor) -> np.ndarray:
        """Copy one of this engine's output tensors to a new host array."""
        value = self._outputs_by_ptr.get(tensor.ptr)
        if value is None:
            raise InputError(f"{self.label}: the device tensor at {tensor.ptr:#x} is not one of its outputs")
        out = np.array(value.numpy(), dtype=np.float32, copy=False)
        self.transfers.downloads += 1
        self.transfers.download_bytes += out.nbytes
        return out

    def close(self) -> None:
        self._bound = {}
        self._outputs_by_ptr = {}
        self._session = None


def _output_dims(port: Any) -> Optional[tuple[int, ...]]:
    """A graph output's dims: numbers, BATCH for the symbolic batch axis the lowering names
    "batch" (segment_to_onnx), or None when any other dimension is left to the data."""
    dims = []
    for d in port.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param == "batch":
            dims.append(BATCH)
        else:
            return None
    return tuple(dims)
