"""hybrid_infer: run Caffe models with TensorRT where it can and Caffe where it cannot.

    net = hybrid_infer.load("deploy.prototxt", "weights.caffemodel")
    print(net.partition.segments)
    outputs = net.run({"data": batch})
"""
from __future__ import annotations

from typing import Any

from .errors import HybridInferError

__all__ = ["HybridNet", "HybridInferError", "load"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that submodules (and the CLI's --help) load without
    # pulling in ONNX, ONNX Runtime and the engines.
    if name in ("load", "HybridNet"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
