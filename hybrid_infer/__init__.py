"""hybrid_infer: run Caffe models with TensorRT where it can and Caffe where it cannot.

    net = hybrid_infer.load("deploy.prototxt", "weights.caffemodel")
    print(net.partition.segments)
    outputs = net.run({"data": batch})
"""
from __future__ import annotations

import os
from typing import Any

from .errors import HybridInferError

# ONNX Runtime 1.32 starts a telemetry session on import, which writes TMPDIR/.ses (left in the
# user's temporary folder by every run) and may report usage; off unless the user set it. Set
# here, before any module of the package can import onnxruntime (engine choice, the CUDA
# engine's provider check, calibration all do).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__all__ = ["HybridNet", "HybridInferError", "load"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that submodules (and the CLI's --help) load without
    # pulling in ONNX, ONNX Runtime and the engines.
    if name in ("load", "HybridNet"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
