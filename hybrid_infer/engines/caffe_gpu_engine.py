"""Caffe segments on a GPU, taking and giving tensors in device memory.

A ``CaffeGpuEngine`` runs its sub-net in Caffe's GPU mode. ``run_device`` accepts host
arrays (one copy to the device each) or ``DeviceTensor``s of any GPU engine, which are
lent to the input blobs without a copy, and returns its outputs as ``DeviceTensor``s
that point into Caffe's own blob memory. The native extension does the pointer work.

Ownership: memory lent to an input blob stays its producer's; Caffe never frees it
(``set_gpu_data`` marks it not owned), and the loan ends with the run (``reset_data``),
so Caffe cannot touch it after its producer reuses or frees it. Outputs stay Caffe's,
valid until this engine's next run or ``close``, like TensorRT engine outputs.

Streams: Caffe works on the legacy default stream; a run ends by synchronising it, so a
consumer on any stream may read the outputs at once. Producers synchronise their own
streams before handing tensors over (TensorRT engines do).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np

from ..errors import EnvironmentProblem, InputError, OptionError
from ..graph.layer_graph import LayerGraph
from ..model.caffe_import import caffe
from ..model.isolated import caffe_errors, note_caffe_on_gpu
from ..native import blob_access
from .caffe_engine import CaffeEngine
from .device_tensor import DeviceTensor

FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class GpuDevice:
    """The GPU Caffe runs on."""
    index: int
    name: str


def use_gpu(index: int) -> GpuDevice:
    """Make GPU ``index`` Caffe's device (and GPU mode Caffe's mode) for this thread,
    after checking that it can be."""
    device = check_gpu(index)
    cf = caffe()
    cf.set_device(index)
    cf.set_mode_gpu()
    note_caffe_on_gpu()
    return device


@functools.cache
def check_gpu(index: int) -> GpuDevice:
    """GPU ``index`` as Caffe would use it, or the reason it cannot.

    Caffe aborts the whole process on any CUDA error, so each way this could fail (a
    CPU-only Caffe, no driver or GPU, a device id out of range) is found out first and
    raised as an error the user can act on. Cached: device properties are slow to query.
    """
    native = blob_access()
    if not native.cuda_enabled():
        raise EnvironmentProblem("this pycaffe was built without CUDA (CPU_ONLY), so Caffe cannot run "
                                 "on a GPU: build the CUDA flavour with scripts/setup.sh --cuda")
    try:
        count = native.device_count()
    except RuntimeError as exc:
        raise EnvironmentProblem(f"Caffe cannot run on a GPU here: no usable CUDA device ({exc})") from None
    if count == 0:
        raise EnvironmentProblem("Caffe cannot run on a GPU here: CUDA sees no device")
    if not 0 <= index < count:
        listing = ", ".join(f"{i}: {native.device_name(i)}" for i in range(count))
        raise OptionError(f"--device {index}: there is no GPU {index}; this machine has {count} "
                          f"({listing})")
    return GpuDevice(index, native.device_name(index))


@dataclass
class TransferCount:
    """Copies between host and device an engine made, for reports and for tests that
    prove a hand-off made none."""
    uploads: int = 0
    upload_bytes: int = 0
    downloads: int = 0
    download_bytes: int = 0


class CaffeGpuEngine(CaffeEngine):
    """A pycaffe sub-net on a GPU, with device-resident inputs and outputs."""

    kind = "caffe-gpu"

    def __init__(self, graph: LayerGraph, layer_names: Sequence[str], inputs: Sequence[str],
                 outputs: Sequence[str], weights: Mapping[str, list[np.ndarray]], *,
                 device: GpuDevice, name: str = "segment"):
        self.device = device
        self.transfers = TransferCount()
        self._native = blob_access()
        super().__init__(graph, layer_names, inputs, outputs, weights, name=name)

    def _use_mode(self) -> None:
        cf = caffe()
        cf.set_mode_gpu()
        cf.set_device(self.device.index)

    def _check_layers(self, layers: Sequence[object]) -> None:
        """Caffe's GPU code implements every layer its CPU code lacks (stochastic pooling)."""

    def _set_up_in_child(self, prototxt: str) -> None:
        """Not rehearsed: a CUDA context does not survive ``fork``, so a child could not use
        this GPU. The whole model's set-up was rehearsed on the CPU when it was loaded."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in and out: one copy each way per tensor."""
        return {name: self.download(tensor) for name, tensor in self.run_device(feeds).items()}

    def run_device(self, feeds: Mapping[str, Union[np.ndarray, DeviceTensor]]) -> dict[str, DeviceTensor]:
        """Run on host arrays or device tensors; return outputs left in GPU memory."""
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise InputError(f"Caffe GPU segment needs input(s) {', '.join(missing)}")
        self._use_mode()
        self._reshape({name: tuple(int(d) for d in feeds[name].shape) for name in self.input_names})
        lent: list[str] = []
        try:
            for name in self.input_names:
                if self._bind_input(name, feeds[name]):
                    lent.append(name)
            caffe_errors(self.label, self._forward)  # not rehearsed in a child: see _set_up_in_child
            outputs = {name: DeviceTensor(self._native.gpu_data(self._blobs[name]),
                                          tuple(int(d) for d in self._blobs[name].shape), FLOAT32)
                       for name in self.output_names}
        finally:
            self._native.synchronize()  # Caffe's kernels are done with lent memory before the loan ends
            for name in lent:
                self._native.reset_data(self._blobs[name])
        return outputs

    def _bind_input(self, name: str, value: Union[np.ndarray, DeviceTensor]) -> bool:
        """Lend a device tensor to the input blob (True), or copy a host array into it (False)."""
        blob = self._blobs[name]
        if isinstance(value, DeviceTensor):
            if np.dtype(value.dtype) != FLOAT32:
                raise InputError(f"device tensor '{name}' is {np.dtype(value.dtype)}; Caffe takes float32")
            self._native.set_gpu_data(blob, value.ptr)
            return True
        array = np.ascontiguousarray(value, dtype=np.float32)
        self._native.copy_to_device(self._native.mutable_gpu_data(blob), array.ctypes.data, array.nbytes)
        self.transfers.uploads += 1
        self.transfers.upload_bytes += array.nbytes
        return False

    def download(self, tensor: DeviceTensor) -> np.ndarray:
        """Copy a device tensor (of any engine on this GPU) to a new host array."""
        out = np.empty(tensor.shape, dtype=tensor.dtype)
        self._native.copy_to_host(out.ctypes.data, tensor.ptr, out.nbytes)
        self.transfers.downloads += 1
        self.transfers.download_bytes += out.nbytes
        return out.astype(np.float32, copy=False)

    def blob_heads(self) -> dict[str, str]:
        """Where each activation blob's newest data is ("gpu", "cpu", "synced", ...):
        "synced" or "cpu" on a blob that only GPU layers touch means a host copy happened."""
        return {name: self._native.data_head(blob) for name, blob in self._blobs.items()}
