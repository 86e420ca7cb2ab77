"""Run a serialized TensorRT engine on the GPU behind the ``Engine`` interface.

Device memory and streams come from cuda-python (``cuda.bindings.runtime``, or the older
``cuda.cudart``) or pycuda, whichever imports: TensorRT's Python API takes raw device
pointers and stream handles and allocates nothing for us. Each engine owns one stream
and one device buffer per I/O tensor, allocated for the first shape it sees and grown
only when a larger shape arrives, so steady-state runs allocate nothing. An output whose
size depends on the data (DetectionOutput's detections) gets its memory from an
``IOutputAllocator``: TensorRT asks for it once the size is known during the run and
reports the shape, which is the shape ``run`` and ``run_device`` then return.

``run`` takes and returns host arrays. ``run_device`` takes host arrays or
``DeviceTensor``s and returns ``DeviceTensor``s, so consecutive TensorRT segments can hand
tensors over without a round trip through host memory.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..errors import EngineRejected, EnvironmentProblem, InputError
from . import trt_api
from .device_tensor import DeviceTensor
from .trt_api import TrtApi


@dataclass(frozen=True)
class GpuInfo:
    """The current CUDA device, as far as engine compatibility goes."""
    name: str
    major: int
    minor: int

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"


class _CudaPython:
    """CUDA runtime calls through cuda-python; every call returns (error, results...)."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self._rt = cudart
        self._kind = cudart.cudaMemcpyKind

    def _check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            _, text = self._rt.cudaGetErrorString(err)
            raise EnvironmentProblem(f"CUDA {what} failed: {text.decode(errors='replace')}")
        return values[0] if len(values) == 1 else values

    def device(self) -> GpuInfo:
        err, count = self._rt.cudaGetDeviceCount()
        if err in (self._rt.cudaError_t.cudaErrorInsufficientDriver, self._rt.cudaError_t.cudaErrorNoDevice):
            raise EnvironmentProblem("no NVIDIA GPU with a working driver is visible here "
                                     f"(CUDA says: {self._rt.cudaGetErrorString(err)[1].decode()})")
        count = self._check((err, count), "device query")
        if count == 0:
            raise EnvironmentProblem("CUDA reports no GPU")
        device = self._check(self._rt.cudaGetDevice(), "device query")
        props = self._check(self._rt.cudaGetDeviceProperties(device), "device query")
        name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
        return GpuInfo(name, int(props.major), int(props.minor))

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self._rt.cudaMalloc(max(nbytes, 1)), f"allocation of {nbytes} bytes"))

    def free(self, ptr: int) -> None:
        self._check(self._rt.cudaFree(ptr), "free")

    def htod(self, ptr: int, array: np.ndarray, stream: int) -> None:
        self._check(self._rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                             self._kind.cudaMemcpyHostToDevice, stream), "copy to GPU")

    def dtoh(self, array: np.ndarray, ptr: int, stream: int) -> None:
        self._check(self._rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes,
                                             self._kind.cudaMemcpyDeviceToHost, stream), "copy from GPU")

    def create_stream(self) -> int:
        return int(self._check(self._rt.cudaStreamCreate(), "stream creation"))

    def synchronize(self, stream: int) -> None:
        self._check(self._rt.cudaStreamSynchronize(stream), "stream synchronisation")

    def destroy_stream(self, stream: int) -> None:
        self._check(self._rt.cudaStreamDestroy(stream), "stream destruction")


class _PyCuda:
    """The same calls through pycuda (driver API). TensorRT uses the device's primary
    context, so we retain and push that one instead of letting pycuda make its own."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as drv
        self._drv = drv
        try:
            drv.init()
            self._dev = drv.Device(0)
            self._ctx = self._dev.retain_primary_context()
            self._ctx.push()
        except drv.Error as exc:
            raise EnvironmentProblem(f"pycuda cannot open a GPU: {exc}") from exc
        self._allocations: dict[int, Any] = {}
        self._streams: dict[int, Any] = {}

    def device(self) -> GpuInfo:
        major, minor = self._dev.compute_capability()
        return GpuInfo(self._dev.name(), major, minor)

    def malloc(self, nbytes: int) -> int:
        allocation = self._drv.mem_alloc(max(nbytes, 1))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        self._allocations.pop(ptr).free()

    def htod(self, ptr: int, array: np.ndarray, stream: int) -> None:
        self._drv.memcpy_htod_async(ptr, array, self._streams[stream])

    def dtoh(self, array: np.ndarray, ptr: int, stream: int) -> None:
        self._drv.memcpy_dtoh_async(array, ptr, self._streams[stream])

    def create_stream(self) -> int:
        stream = self._drv.Stream()
        self._streams[stream.handle] = stream
        return stream.handle

    def synchronize(self, stream: int) -> None:
        self._streams[stream].synchronize()

    def destroy_stream(self, stream: int) -> None:
        self._streams.pop(stream)


Cuda = Union[_CudaPython, _PyCuda]


@lru_cache(maxsize=1)
def cuda() -> Cuda:
    """The CUDA binding in use (one per process: they share the primary context)."""
    try:
        return _CudaPython()
    except ImportError:
        pass
    try:
        return _PyCuda()
    except ImportError:
        raise EnvironmentProblem("neither cuda-python nor pycuda is importable, so hybrid_infer "
                                 "cannot reach GPU memory: pip install cuda-python") from None


def current_gpu() -> GpuInfo:
    """The GPU engines would run on here; ``EnvironmentProblem`` when there is none."""
    return cuda().device()


@lru_cache(maxsize=None)
def runtime_available(module: Optional[str] = None) -> tuple[bool, str]:
    """Whether a TensorRT engine can execute here, and why (not).

    Checked in order: a TensorRT module imports, a CUDA binding imports, a GPU is
    visible, and (TensorRT-RTX only) the GPU's compute capability is one RTX supports;
    RTX refuses data-center Hopper (9.0) even though it builds engines without a GPU.
    """
    try:
        api = trt_api.load(module)
        gpu = current_gpu()
    except EnvironmentProblem as exc:
        return False, str(exc)
    supported = api.compute_capabilities()
    if api.is_rtx and gpu.compute_capability not in supported:
        return False, (f"{api.describe()} cannot run on {gpu.name} (compute capability "
                       f"{gpu.compute_capability}); it supports {', '.join(supported)}: "
                       "install the data-center tensorrt module for this GPU")
    return True, f"{api.describe()} on {gpu.name} (compute capability {gpu.compute_capability})"


def engine_layers(cuda_engine: Any, api: TrtApi) -> list[dict[str, Any]]:
    """The engine inspector's per-layer records, after TensorRT's fusions.

    Detail depends on the build's profiling verbosity: names only give ``{"Name": ...}``;
    DETAILED adds type, tactic, formats and the ONNX nodes each layer came from.
    """
    inspector = cuda_engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(api.module.LayerInformationFormat.JSON))
    return [layer if isinstance(layer, dict) else {"Name": str(layer)} for layer in info.get("Layers", [])]


class _Buffer:
    """Device memory that is reused while big enough and replaced when not."""

    def __init__(self, backend: Cuda) -> None:
        self._cuda = backend
        self.ptr = 0
        self.capacity = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.capacity:
            self.release()
            self.ptr = self._cuda.malloc(nbytes)
            self.capacity = nbytes
        return self.ptr

    def release(self) -> None:
        if self.ptr:
            self._cuda.free(self.ptr)
        self.ptr, self.capacity = 0, 0


def _output_allocator(api: TrtApi, backend: Cuda) -> Any:
    """An ``IOutputAllocator`` that keeps one growing buffer per data-dependent output and
    records the shape TensorRT reports for it (``shapes``, ``buffers`` by tensor name)."""
    base = api.module.IOutputAllocator

    class Allocator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.buffers: dict[str, _Buffer] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
            # cudaMalloc's 256-byte alignment covers what TensorRT asks for.
            return self.buffers.setdefault(tensor_name, _Buffer(backend)).ensure(int(size))

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                    stream: int) -> int:
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

        def release(self) -> None:
            for buffer in self.buffers.values():
                buffer.release()

    return Allocator()


class TensorRTEngine:
    """A deserialized engine with its execution context, stream and buffers."""

    kind = "tensorrt"

    def __init__(self, plan: bytes, *, api: Optional[TrtApi] = None, label: str = "segment") -> None:
        self._api = api or trt_api.load()
        self._cuda = cuda()
        self.label = label
        trt = self._api.module
        with self._api.logger.capture() as said:
            self._runtime = trt.Runtime(self._api.logger)
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            self._context = self._engine.create_execution_context() if self._engine else None
        if self._context is None:
            raise EngineRejected(
                f"{self._api.describe()} could not load the engine of {label} ({said.summary()}); "
                "it was probably built by another TensorRT version or for another GPU: "
                "delete it from the engine cache to rebuild it")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._buffers = {n: _Buffer(self._cuda) for n in names}
        self._bound: dict[str, tuple[int, ...]] = {}
        #: Outputs whose size is known only after a run, and the allocator TensorRT asks for them.
        self._data_dependent: set[str] = set()
        self._allocator: Any = None
        self._stream = self._cuda.create_stream()

    def layers(self) -> list[dict[str, Any]]:
        """What TensorRT made of the segment: the engine inspector's layer records."""
        return engine_layers(self._engine, self._api)

    def _bind_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Set input shapes and size output buffers, only when the shapes changed."""
        if shapes == self._bound:
            return
        for name, shape in shapes.items():
            if not self._context.set_input_shape(name, shape):
                lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
                raise InputError(f"input '{name}' of {self.label} has shape {shape}; its TensorRT "
                                 f"engine was built for {tuple(lo)} to {tuple(hi)}: rebuild it "
                                 "with a wider batch range")
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # data-dependent: TensorRT asks the allocator during the run
                if self._allocator is None:
                    self._allocator = _output_allocator(self._api, self._cuda)
                self._context.set_output_allocator(name, self._allocator)
                self._data_dependent.add(name)
                continue
            nbytes = math.prod(shape) * self._dtypes[name].itemsize
            self._context.set_tensor_address(name, self._buffers[name].ensure(nbytes))
        self._bound = dict(shapes)

    def _check_feeds(self, feeds: Mapping[str, Any]) -> None:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"{self.label} needs input(s) {', '.join(missing)}; "
                             f"got {', '.join(feeds) or 'none'}")

    def _enqueue(self, feeds: Mapping[str, Union[np.ndarray, DeviceTensor]]) -> list[np.ndarray]:
        """Bind every input (uploading host arrays), then enqueue the engine on the stream.
        Returns the host arrays uploaded, which must live until the stream is synchronised."""
        self._check_feeds(feeds)
        uploads = []
        shapes = {n: tuple(int(d) for d in feeds[n].shape) for n in self.input_names}
        self._bind_shapes(shapes)
        for name in self.input_names:
            value, dtype = feeds[name], self._dtypes[name]
            if isinstance(value, DeviceTensor):
                if np.dtype(value.dtype) != dtype:
                    raise InputError(f"device tensor '{name}' is {np.dtype(value.dtype)}; "
                                     f"{self.label} takes {dtype}")
                self._context.set_tensor_address(name, value.ptr)
                continue
            array = np.ascontiguousarray(value, dtype=dtype)
            ptr = self._buffers[name].ensure(array.nbytes)
            self._cuda.htod(ptr, array, self._stream)
            self._context.set_tensor_address(name, ptr)
            uploads.append(array)
        with self._api.logger.capture() as said:
            ok = self._context.execute_async_v3(self._stream)
        if not ok:
            raise EngineRejected(f"TensorRT failed to run {self.label}: {said.summary()}")
        return uploads

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, FP32 host arrays out (FP16 debug outputs are widened)."""
        uploads = self._enqueue(feeds)
        outputs = {}
        for name in self.output_names:
            out = np.empty(self._bound_output_shape(name), dtype=self._dtypes[name])
            if out.size:
                self._cuda.dtoh(out, self._output_ptr(name), self._stream)
            outputs[name] = out
        self._cuda.synchronize(self._stream)
        del uploads  # the copies from these host arrays are done only now
        return {n: a.astype(np.float32, copy=False) for n, a in outputs.items()}

    def run_device(self, feeds: Mapping[str, Union[np.ndarray, DeviceTensor]]) -> dict[str, DeviceTensor]:
        """Run on host arrays or device tensors; return outputs left in GPU memory.

        The stream is synchronised before returning, so another engine (with its own
        stream) can read the outputs at once.
        """
        uploads = self._enqueue(feeds)
        self._cuda.synchronize(self._stream)
        del uploads  # the copies from these host arrays are done only now
        return {n: DeviceTensor(self._output_ptr(n), self._bound_output_shape(n), self._dtypes[n])
                for n in self.output_names}

    def download(self, tensor: DeviceTensor) -> np.ndarray:
        """Copy a device tensor to a new host array (FP32, like ``run``)."""
        out = np.empty(tensor.shape, dtype=tensor.dtype)
        self._cuda.dtoh(out, tensor.ptr, self._stream)
        self._cuda.synchronize(self._stream)
        return out.astype(np.float32, copy=False)

    def _bound_output_shape(self, name: str) -> tuple[int, ...]:
        """The output's shape in the last run (for data-dependent ones, as TensorRT reported it)."""
        if name in self._data_dependent:
            return self._allocator.shapes[name]
        return tuple(int(d) for d in self._context.get_tensor_shape(name))

    def _output_ptr(self, name: str) -> int:
        if name in self._data_dependent:
            return self._allocator.buffers[name].ptr
        return self._buffers[name].ptr

    def close(self) -> None:
        if self._context is None:
            return
        self._cuda.synchronize(self._stream)
        for buffer in self._buffers.values():
            buffer.release()
        if self._allocator is not None:
            self._allocator.release()
        self._cuda.destroy_stream(self._stream)
        self._context = self._engine = self._runtime = None
