"""Run segments in order and hand each one's outputs to the segments that need them.

Intermediate tensors are dropped as soon as their last consumer has run, so peak
memory follows the widest cut rather than the whole net. Between two TensorRT
segments a tensor stays in GPU memory; it is copied to the host only when a host
engine (Caffe on the CPU, ONNX Runtime) or the caller needs it. Engines are built
once and reused across calls.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np

from .engine_factory import SegmentEngine


def _on_device(engine: Any) -> bool:
    return hasattr(engine, "run_device")


class HybridExecutor:
    """Executes a list of segment engines in their (topological) order."""

    def __init__(self, segment_engines: list[SegmentEngine]):
        self.segment_engines = segment_engines
        self._uses: Counter[str] = Counter(v for se in segment_engines for v in se.segment.inputs)
        device_readers = {v for se in segment_engines if _on_device(se.engine) for v in se.segment.inputs}
        host_readers = {v for se in segment_engines if not _on_device(se.engine) for v in se.segment.inputs}
        #: Values a device engine produces that only device engines read: never copied to the host.
        self.device_resident = {v for se in segment_engines if _on_device(se.engine)
                                for v in se.segment.outputs if v in device_readers and v not in host_readers}
        self.last_times: dict[int, float] = {}

    def run(self, feeds: Mapping[str, np.ndarray], wanted: Sequence[str]) -> dict[str, np.ndarray]:
        """``feeds`` and ``wanted`` are value ids; returned arrays are owned by the caller."""
        live: dict[str, Any] = dict(feeds)
        remaining = self._uses.copy()
        keep = set(wanted)
        results: dict[str, np.ndarray] = {}
        for se in self.segment_engines:
            start = time.perf_counter()
            engine_feeds = {v: live[v] for v in se.segment.inputs}
            if _on_device(se.engine):
                outputs = se.engine.run_device(engine_feeds)
                for value in list(outputs):
                    if value in keep or value not in self.device_resident:
                        outputs[value] = se.engine.download(outputs[value])
            else:
                outputs = se.engine.run(engine_feeds)
            self.last_times[se.segment.id] = time.perf_counter() - start
            for value, array in outputs.items():
                if value in keep:
                    # Engines may return views of memory they reuse on the next run.
                    results[value] = np.array(array, copy=True)
                if remaining[value]:
                    live[value] = array
            for value in se.segment.inputs:
                remaining[value] -= 1
                if remaining[value] == 0:
                    live.pop(value, None)
        for value in keep - results.keys():
            results[value] = np.array(feeds[value], copy=True)
        return results

    def close(self) -> None:
        for se in self.segment_engines:
            se.engine.close()
