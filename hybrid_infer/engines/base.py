"""The one interface every segment engine implements.

Like Polygraphy's runners, an engine is built or loaded when constructed, then
``run`` maps named input arrays to named output arrays as often as needed, and
``close`` releases what it holds (sessions, device memory, Caffe nets). Tensor names
are the graph's value ids, so the executor can hand outputs of one engine to the next
without renaming.
"""
from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np


class Engine(Protocol):
    """A built segment, ready to run."""

    #: Short name shown in reports: "onnxruntime", "tensorrt", "caffe".
    kind: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the segment on FP32 arrays keyed by value id; return its outputs by value id."""
        ...

    def close(self) -> None:
        """Release sessions, nets and device memory; the engine cannot run afterwards."""
        ...
