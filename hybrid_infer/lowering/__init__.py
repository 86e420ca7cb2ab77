"""Lowering of TensorRT segments to ONNX, the interchange TensorRT and ONNX Runtime share.

The public API for adding lowerings of your own layers::

    from hybrid_infer.lowering import LoweringContext, register_lowering

    @register_lowering("Python", python_module="my_layers", python_layer="HardSwish")
    def lower_hard_swish(ctx: LoweringContext, layer, inputs: list[str], outputs: list[str]) -> None:
        ...

See ``registry.register_lowering``, ``context.LoweringContext`` and ``plugins`` (entry points,
``--lowerings``); ``hybrid_infer.testing.check_lowering`` checks a lowering against Caffe.
"""
from ..errors import LoweringError
from ..graph.layer_graph import Layer
from .context import LoweringContext
from .plugins import ENTRY_POINT_GROUP, load_lowering_modules
from .registry import REGISTRY, LoweringClash, LoweringTarget, Registration, register_lowering

__all__ = ["ENTRY_POINT_GROUP", "Layer", "LoweringClash", "LoweringContext", "LoweringError",
           "LoweringTarget", "REGISTRY", "Registration", "load_lowering_modules", "register_lowering"]
