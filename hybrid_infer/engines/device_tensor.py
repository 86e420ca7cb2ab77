"""A tensor left in GPU memory by one engine for the next one to read.

Engines that can work on the GPU (TensorRT, Caffe in GPU mode) return these from
``run_device`` instead of host arrays, so a tensor passed between two of them never
crosses the PCIe bus. The memory always belongs to the engine that produced it: a
consumer only borrows it for the length of its own run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DeviceTensor:
    """A tensor in GPU memory. Ones returned by ``run_device`` belong to the engine and
    stay valid until its next run or ``close``."""
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize
