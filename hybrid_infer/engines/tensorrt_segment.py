"""From a segment's ONNX to a running TensorRT engine: cache lookup, build, load."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from . import trt_api
from .engine_cache import EngineCache
from .tensorrt_build import BuildSettings
from .tensorrt_engine import TensorRTEngine

if TYPE_CHECKING:
    import onnx

    from ..partition.partitioner import Segment


def tensorrt_factory(settings: Optional[BuildSettings] = None, cache: Optional[EngineCache] = None,
                     module: Optional[str] = None):
    """A callable (onnx_model, segment) -> TensorRTEngine that builds through the engine cache."""
    api = trt_api.load(module)
    cache = cache or EngineCache()
    settings = settings or BuildSettings()

    def make(onnx_model: "onnx.ModelProto", segment: "Segment") -> TensorRTEngine:
        label = f"segment{segment.id}"
        built, _ = cache.get_or_build(onnx_model, settings, api=api, label=label)
        return TensorRTEngine(built.plan, api=api, label=label)
    return make
