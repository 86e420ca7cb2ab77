"""Worked example of the custom layer API: a lowering for the bundled HardSwish Python layer.

``hybrid_example_layers.HardSwish`` computes ``y = x * clip(x + shift, 0, divisor) / divisor``
in numpy. Registered here by its module and layer name, it no longer needs Caffe: the
partitioner puts it in a TensorRT segment, so graphs/python_layer_net runs as one segment.

    hybrid-infer partition graphs/python_layer_net/deploy.prototxt \\
        --lowerings graphs/python_layers/hybrid_example_lowerings.py

The check refuses what the lowering cannot express (a param_str it cannot read) with the
reason, and the layer then stays in Caffe. Part of hybrid_infer's example graphs; BSD-2-Clause.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from hybrid_infer.lowering import Layer, LoweringContext, register_lowering

_DEFAULTS = {"shift": 3.0, "divisor": 6.0}


def _options(layer: Layer) -> dict | str:
    """The layer's options as HardSwish.setup reads them, or why they cannot be read."""
    text = layer.param.python_param.param_str.strip()
    try:
        given = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        return f"param_str is not JSON ({exc})"
    if not isinstance(given, dict) or set(given) - set(_DEFAULTS):
        return f"param_str {text!r} has keys HardSwish does not know"
    options = {**_DEFAULTS, **given}
    if not all(isinstance(v, (int, float)) for v in options.values()) or options["divisor"] <= 0:
        return "shift and divisor must be numbers, divisor > 0"
    return options


def check_hard_swish(layer: Layer, graph) -> Optional[str]:
    """None when the lowering can express this layer, else the reason (shown in the report)."""
    options = _options(layer)
    return options if isinstance(options, str) else None


@register_lowering("Python", python_module="hybrid_example_layers", python_layer="HardSwish",
                   check=check_hard_swish)
def lower_hard_swish(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """x * Clip(x + shift, 0, divisor) / divisor, in the layer's own order of operations."""
    options = _options(layer)
    assert isinstance(options, dict)  # the check passed
    name, x = layer.name, inputs[0]
    shifted = ctx.node("Add", [x, ctx.const(np.float32(options["shift"]), f"{name}/shift")], layer=name)[0]
    gate = ctx.node("Clip", [shifted, ctx.const(np.float32(0), f"{name}/zero"),
                             ctx.const(np.float32(options["divisor"]), f"{name}/divisor")], layer=name)[0]
    product = ctx.node("Mul", [x, gate], layer=name)[0]
    ctx.node("Div", [product, ctx.const(np.float32(options["divisor"]), f"{name}/denominator")], outputs,
             layer=name)
