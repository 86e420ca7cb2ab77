"""Run segments in order and hand each one's outputs to the segments that need them.

Intermediate tensors are dropped as soon as their last consumer has run, so peak
memory follows the widest cut rather than the whole net. Engines that work on the GPU
(those with ``run_device``: TensorRT, Caffe in GPU mode) leave their outputs in device
memory; between two of them a tensor is handed over as a device pointer. A tensor is
copied to the host once, when a host engine (Caffe on the CPU, ONNX Runtime) or the
caller needs it, and a host array is copied to the device once, by the GPU engine that
reads it. Every hand-off of the last run is recorded with the path it took and its bytes.
Engines are built once and reused across calls.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..engines.device_tensor import DeviceTensor
from .engine_factory import SegmentEngine

#: Both sides on the GPU: the consumer reads the producer's memory, nothing is copied.
DEVICE_POINTER = "device pointer"
#: A host array (net input or host engine output) copied to the device by its GPU consumer.
HOST_TO_DEVICE = "host to device"
#: A device tensor copied to the host for a host engine or the caller.
DEVICE_TO_HOST = "device to host"
#: Both sides on the GPU, but handed over through the host (``zero_copy=False``).
HOST_ROUND_TRIP = "device to host to device"
#: Both sides on the host: the array itself is passed.
HOST = "host"

INPUT = "input"
OUTPUT = "output"


@dataclass(frozen=True)
class Handoff:
    """One tensor passed from a producer (a segment, or the caller's ``input``) to a
    consumer (a segment, or the caller's ``output``)."""
    value: str
    source: str
    target: str
    path: str
    nbytes: int
    #: Bytes this hand-off copied between host and device (a download shared by several
    #: consumers is counted at the first).
    copied_bytes: int


def _on_device(engine: Any) -> bool:
    return hasattr(engine, "run_device")


def _label(se: SegmentEngine) -> str:
    return f"segment {se.segment.id} ({se.engine.kind})"


class _Values:
    """The live tensors of one run: host arrays and device tensors (with the engine that
    owns each), downloading a device tensor at most once."""

    def __init__(self, feeds: Mapping[str, np.ndarray]):
        self.host: dict[str, np.ndarray] = dict(feeds)
        self.device: dict[str, tuple[DeviceTensor, Any]] = {}
        self.source: dict[str, str] = {v: INPUT for v in feeds}

    def nbytes(self, value: str) -> int:
        return self.host[value].nbytes if value in self.host else self.device[value][0].nbytes

    def on_host(self, value: str) -> tuple[np.ndarray, int]:
        """The host array of ``value`` and the bytes downloaded to get it now (0 if it was there)."""
        if value in self.host:
            return self.host[value], 0
        tensor, owner = self.device[value]
        array = owner.download(tensor)
        self.host[value] = array
        return array, array.nbytes

    def drop(self, value: str) -> None:
        self.host.pop(value, None)
        self.device.pop(value, None)


class HybridExecutor:
    """Executes a list of segment engines in their (topological) order.

    ``zero_copy=False`` hands tensors between GPU engines through the host instead of by
    pointer, to measure what the device path saves.
    """

    def __init__(self, segment_engines: list[SegmentEngine], *, zero_copy: bool = True):
        self.segment_engines = segment_engines
        self.zero_copy = zero_copy
        self._uses: Counter[str] = Counter(v for se in segment_engines for v in se.segment.inputs)
        self.last_times: dict[int, float] = {}
        self.last_handoffs: list[Handoff] = []

    def run(self, feeds: Mapping[str, np.ndarray], wanted: Sequence[str]) -> dict[str, np.ndarray]:
        """``feeds`` and ``wanted`` are value ids; returned arrays are owned by the caller."""
        values = _Values(feeds)
        remaining = self._uses.copy()
        keep = set(wanted)
        handoffs: list[Handoff] = []
        results: dict[str, np.ndarray] = {}
        for se in self.segment_engines:
            start = time.perf_counter()
            engine_feeds = {v: self._hand_over(values, v, se, handoffs) for v in se.segment.inputs}
            if _on_device(se.engine):
                for value, tensor in se.engine.run_device(engine_feeds).items():
                    values.device[value] = (tensor, se.engine)
                    values.source[value] = _label(se)
            else:
                for value, array in se.engine.run(engine_feeds).items():
                    values.host[value] = array
                    values.source[value] = _label(se)
            for value in se.segment.outputs:
                if value in keep:
                    # Engines may return views of memory they reuse on the next run.
                    array, copied = values.on_host(value)
                    results[value] = array if copied else np.array(array, copy=True)
                    handoffs.append(Handoff(value, values.source[value], OUTPUT,
                                            DEVICE_TO_HOST if copied else HOST, array.nbytes, copied))
            self.last_times[se.segment.id] = time.perf_counter() - start
            for value in se.segment.inputs:
                remaining[value] -= 1
                if remaining[value] == 0:
                    values.drop(value)
        for value in keep - results.keys():
            results[value] = np.array(feeds[value], copy=True)
        self.last_handoffs = handoffs
        return results

    def _hand_over(self, values: _Values, value: str, se: SegmentEngine,
                   handoffs: list[Handoff]) -> np.ndarray | DeviceTensor:
        """What ``se``'s engine is fed for ``value``, recording the path taken."""
        nbytes = values.nbytes(value)
        on_device_source = value in values.device
        if _on_device(se.engine) and on_device_source and self.zero_copy:
            feed: np.ndarray | DeviceTensor = values.device[value][0]
            path, copied = DEVICE_POINTER, 0
        else:
            feed, downloaded = values.on_host(value)
            if _on_device(se.engine):
                path = HOST_ROUND_TRIP if on_device_source else HOST_TO_DEVICE
                copied = downloaded + nbytes
            else:
                path = DEVICE_TO_HOST if on_device_source else HOST
                copied = downloaded
        handoffs.append(Handoff(value, values.source[value], _label(se), path, nbytes, copied))
        return feed

    def close(self) -> None:
        for se in self.segment_engines:
            se.engine.close()
