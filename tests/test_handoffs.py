"""The executor's hand-off paths and report, with stand-in GPU engines (no GPU needed).

A stand-in keeps its "device memory" in a dict and counts copies, so the executor's
choice of path (device pointer, one copy each way, host) is checked on every machine.
"""
from __future__ import annotations

import itertools
from typing import Callable, Mapping

import numpy as np
import pytest

from hybrid_infer.engines.device_tensor import DeviceTensor
from hybrid_infer.executor.engine_factory import SegmentEngine
from hybrid_infer.executor.hybrid_executor import (DEVICE_POINTER, DEVICE_TO_HOST, HOST, HOST_ROUND_TRIP,
                                                   HOST_TO_DEVICE, OUTPUT, HybridExecutor)
from hybrid_infer.partition.partitioner import CAFFE, Segment
from hybrid_infer.report import handoff_report

Fn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
_MEMORY: dict[int, np.ndarray] = {}
_ADDRESSES = itertools.count(0x1000, 0x1000)


class FakeGpuEngine:
    """Runs ``fn`` on "device" tensors; counts uploads (host feeds) and downloads."""
    kind = "fake-gpu"

    def __init__(self, fn: Fn):
        self.fn = fn
        self.uploads = self.downloads = 0

    def run_device(self, feeds):
        arrays = {}
        for name, value in feeds.items():
            if isinstance(value, DeviceTensor):
                arrays[name] = _MEMORY[value.ptr]
            else:
                self.uploads += 1
                arrays[name] = np.array(value)
        outputs = {}
        for name, array in self.fn(arrays).items():
            ptr = next(_ADDRESSES)
            _MEMORY[ptr] = array.astype(np.float32)
            outputs[name] = DeviceTensor(ptr, array.shape, np.dtype(np.float32))
        return outputs

    def download(self, tensor: DeviceTensor) -> np.ndarray:
        self.downloads += 1
        return _MEMORY[tensor.ptr].copy()

    def close(self) -> None:
        pass


class FakeHostEngine:
    kind = "fake-host"

    def __init__(self, fn: Fn):
        self.fn = fn

    def run(self, feeds):
        assert not any(isinstance(v, DeviceTensor) for v in feeds.values()), "host engine fed a device tensor"
        return self.fn(feeds)

    def close(self) -> None:
        pass


def _chain(zero_copy: bool = True):
    """x -> [gpu] y -> [host] z, and y -> [gpu] w, then [gpu] out = z + w."""
    gpu0 = FakeGpuEngine(lambda f: {"y": f["x"] + 1})
    host = FakeHostEngine(lambda f: {"z": f["y"] * 2})
    gpu1 = FakeGpuEngine(lambda f: {"w": f["y"] - 1})
    gpu2 = FakeGpuEngine(lambda f: {"out": f["z"] + f["w"]})
    segments = [Segment(0, CAFFE, ["a"], ["x"], ["y"]), Segment(1, CAFFE, ["b"], ["y"], ["z"]),
                Segment(2, CAFFE, ["c"], ["y"], ["w"]), Segment(3, CAFFE, ["d"], ["z", "w"], ["out"])]
    engines = [gpu0, host, gpu1, gpu2]
    executor = HybridExecutor([SegmentEngine(s, e) for s, e in zip(segments, engines)], zero_copy=zero_copy)
    return executor, engines


def test_device_pointer_between_gpu_engines_and_one_copy_each_way_otherwise():
    executor, (gpu0, _, gpu1, gpu2) = _chain()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = executor.run({"x": x}, ["out", "y"])
    np.testing.assert_array_equal(out["out"], (x + 1) * 2 + x)
    np.testing.assert_array_equal(out["y"], x + 1)
    paths = {(h.value, h.target): h.path for h in executor.last_handoffs}
    assert paths == {
        ("x", "segment 0 (fake-gpu)"): HOST_TO_DEVICE,
        ("y", "segment 1 (fake-host)"): DEVICE_TO_HOST,
        ("y", OUTPUT): DEVICE_TO_HOST,
        ("y", "segment 2 (fake-gpu)"): DEVICE_POINTER,
        ("z", "segment 3 (fake-gpu)"): HOST_TO_DEVICE,
        ("w", "segment 3 (fake-gpu)"): DEVICE_POINTER,
        ("out", OUTPUT): DEVICE_TO_HOST,
    }
    # y is downloaded once although the caller and the host engine both want it
    assert gpu0.downloads == 1 and gpu1.uploads == 0 and gpu2.uploads == 1 and gpu2.downloads == 1
    copied = {(h.value, h.target): h.copied_bytes for h in executor.last_handoffs}
    assert copied[("y", "segment 2 (fake-gpu)")] == 0 and copied[("w", "segment 3 (fake-gpu)")] == 0
    assert sum(copied.values()) == 4 * x.nbytes  # x up, y down (once, for both), z up, out down
    assert all(h.nbytes == x.nbytes for h in executor.last_handoffs)


def test_zero_copy_off_goes_through_the_host_with_the_same_result():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    on, _ = _chain(zero_copy=True)
    off, (_, _, gpu1, gpu2) = _chain(zero_copy=False)
    np.testing.assert_array_equal(on.run({"x": x}, ["out"])["out"], off.run({"x": x}, ["out"])["out"])
    paths = {(h.value, h.target): h.path for h in off.last_handoffs}
    assert paths[("y", "segment 2 (fake-gpu)")] == HOST_ROUND_TRIP
    assert paths[("w", "segment 3 (fake-gpu)")] == HOST_ROUND_TRIP
    assert gpu1.uploads == 1 and gpu2.uploads == 2


def test_report_lists_every_hand_off_with_totals():
    executor, _ = _chain()
    executor.run({"x": np.zeros((2, 3), np.float32)}, ["out"])
    text = handoff_report.to_text(executor.last_handoffs)
    assert "segment 0 (fake-gpu) -> segment 2 (fake-gpu)" in text and DEVICE_POINTER in text
    assert text.rstrip().endswith("6 hand-off(s): 2 by device pointer, 96 B copied between host and device")
    assert handoff_report.to_text([]) == ""


@pytest.mark.parametrize("zero_copy", [True, False])
def test_host_engines_only_pass_arrays(zero_copy):
    first = FakeHostEngine(lambda f: {"y": f["x"] + 1})
    second = FakeHostEngine(lambda f: {"z": f["y"] * 3})
    segments = [Segment(0, CAFFE, ["a"], ["x"], ["y"]), Segment(1, CAFFE, ["b"], ["y"], ["z"])]
    executor = HybridExecutor([SegmentEngine(s, e) for s, e in zip(segments, (first, second))],
                              zero_copy=zero_copy)
    out = executor.run({"x": np.ones(4, np.float32)}, ["z"])
    np.testing.assert_array_equal(out["z"], np.full(4, 6, np.float32))
    assert {h.path for h in executor.last_handoffs} == {HOST}
    assert sum(h.copied_bytes for h in executor.last_handoffs) == 0
