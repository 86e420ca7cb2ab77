"""Element-wise neuron layers: ReLU and friends, Power, Exp, Log, BNLL, Threshold, HardSwish
and HardSigmoid.

Power, Exp and Log replay Caffe's own sequence of steps (scale, shift, then the
function, each skipped when it is the identity) with the constants Caffe derives in
float32, so the ONNX graph rounds like Caffe does. BNLL is composed rather than mapped
to Softplus, whose usual log(exp(x) + 1) overflows where Caffe's form does not.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..graph.layer_graph import Layer
from .context import LoweringContext, channel_shaped
from .registry import register_lowering

Step = tuple[str, Optional[float]]  # (ONNX op, scalar second operand or None for unary ops)


def _chain(ctx: LoweringContext, layer: str, x: str, out: str, steps: Sequence[Step]) -> None:
    """Apply ``steps`` in order, the last one writing ``out`` (Identity when there are none)."""
    if not steps:
        ctx.node("Identity", [x], [out], layer=layer)
        return
    for i, (op, operand) in enumerate(steps):
        operands = [x]
        if operand is not None:
            operands.append(ctx.const(np.float32(operand), f"{layer}/{op.lower()}_operand"))
        x = ctx.node(op, operands, [out] if i == len(steps) - 1 else None, layer=layer)[0]


def emit_power(ctx: LoweringContext, layer: str, x: str, out: str,
               power: float, scale: float, shift: float) -> None:
    """Caffe's PowerLayer: (shift + scale * x) ^ power, constant when scale or power is 0."""
    power, scale, shift = np.float32(power), np.float32(scale), np.float32(shift)
    if scale == 0 or power == 0:
        value = np.float32(1) if power == 0 else np.float32(shift ** power)
        shape = ctx.node("Shape", [x], layer=layer)[0]
        ctx.node("ConstantOfShape", [shape], [out], layer=layer,
                 value=ctx.tensor_attribute(np.array([value], dtype=np.float32)))
        return
    steps: list[Step] = []
    if scale != 1:
        steps.append(("Mul", scale))
    if shift != 0:
        steps.append(("Add", shift))
    if power != 1:
        steps.append(("Pow", power))
    _chain(ctx, layer, x, out, steps)


@register_lowering("ReLU")
def lower_relu(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    slope = layer.param.relu_param.negative_slope
    if slope == 0:
        ctx.node("Relu", inputs, outputs, layer=layer.name)
    else:
        ctx.node("LeakyRelu", inputs, outputs, layer=layer.name, alpha=float(slope))


@register_lowering("ReLU6")
def lower_relu6(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """The fork's ReLU6 also has a negative slope and a configurable threshold."""
    p = layer.param.relu6_param
    top = ctx.const(np.float32(p.threshold), f"{layer.name}/threshold")
    if p.negative_slope == 0:
        ctx.node("Clip", [inputs[0], ctx.const(np.float32(0), f"{layer.name}/zero"), top], outputs,
                 layer=layer.name)
        return
    leaky = ctx.node("LeakyRelu", inputs, layer=layer.name, alpha=float(p.negative_slope))[0]
    ctx.node("Min", [leaky, top], outputs, layer=layer.name)


@register_lowering("PReLU")
def lower_prelu(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Slopes are per channel (axis 1), so they are shaped (C, 1, ...) for broadcasting."""
    slope = ctx.weights(layer.name)[0]
    if not layer.param.prelu_param.channel_shared:
        slope = channel_shaped(slope, len(ctx.shape(inputs[0])))
    ctx.node("PRelu", [inputs[0], ctx.const(slope, f"{layer.name}/slope")], outputs, layer=layer.name)


@register_lowering("Sigmoid")
def lower_sigmoid(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    ctx.node("Sigmoid", inputs, outputs, layer=layer.name)


@register_lowering("TanH")
def lower_tanh(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    ctx.node("Tanh", inputs, outputs, layer=layer.name)


@register_lowering("ELU")
def lower_elu(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    ctx.node("Elu", inputs, outputs, layer=layer.name, alpha=float(layer.param.elu_param.alpha))


@register_lowering("AbsVal")
def lower_absval(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    ctx.node("Abs", inputs, outputs, layer=layer.name)


@register_lowering("BNLL")
def lower_bnll(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Caffe: x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x)), i.e. relu(x) + log(1 + exp(-|x|))."""
    name, x = layer.name, inputs[0]
    negative_abs = ctx.node("Neg", ctx.node("Abs", [x], layer=name), layer=name)[0]
    log_term = ctx.fresh(f"{name}/log1p_exp")
    _chain(ctx, name, negative_abs, log_term, [("Exp", None), ("Add", 1.0), ("Log", None)])
    ctx.node("Add", [ctx.node("Relu", [x], layer=name)[0], log_term], outputs, layer=name)


@register_lowering("Power")
def lower_power(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    p = layer.param.power_param
    emit_power(ctx, layer.name, inputs[0], outputs[0], p.power, p.scale, p.shift)


def _log_base(ctx: LoweringContext, layer: Layer, base: float) -> np.float32:
    """Caffe's log(base), with base -1 meaning e; non-positive bases are Caffe errors."""
    if base == -1:
        return np.float32(1)
    if base <= 0:
        raise ctx.error(layer.name, f"base {base} must be strictly positive (or -1 for e)")
    return np.log(np.float32(base))


@register_lowering("Exp")
def lower_exp(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Caffe rewrites base^(shift + scale*x) as base^shift * exp(log(base) * scale * x)."""
    p = layer.param.exp_param
    base, scale, shift = np.float32(p.base), np.float32(p.scale), np.float32(p.shift)
    inner = _log_base(ctx, layer, base) * scale
    if shift == 0:
        outer = np.float32(1)
    else:
        outer = np.exp(shift) if base == -1 else np.float32(base ** shift)
    steps: list[Step] = [("Mul", inner)] if inner != 1 else []
    steps.append(("Exp", None))
    if outer != 1:
        steps.append(("Mul", outer))
    _chain(ctx, layer.name, inputs[0], outputs[0], steps)


@register_lowering("Log")
def lower_log(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """Caffe: log(shift + scale*x) / log(base), the division done as a float32 multiplication."""
    p = layer.param.log_param
    base_scale = np.float32(1) / _log_base(ctx, layer, p.base)
    steps: list[Step] = []
    if p.scale != 1:
        steps.append(("Mul", p.scale))
    if p.shift != 0:
        steps.append(("Add", p.shift))
    steps.append(("Log", None))
    if base_scale != 1:
        steps.append(("Mul", base_scale))
    _chain(ctx, layer.name, inputs[0], outputs[0], steps)


@register_lowering("Threshold")
def lower_threshold(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """threshold_layer.cpp: 1 where x > threshold (strictly), else 0, as float."""
    threshold = ctx.const(np.float32(layer.param.threshold_param.threshold), f"{layer.name}/threshold")
    above = ctx.node("Greater", [inputs[0], threshold], layer=layer.name)[0]
    ctx.node("Cast", [above], outputs, layer=layer.name, to=1)  # TensorProto.FLOAT


@register_lowering("HardSwish")
def lower_hard_swish(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """hardswish_layer.cpp: x * max(0, min(1, x / 6 + 0.5)), with Caffe's division by 6 (ONNX's
    HardSwish multiplies by 1/6, which rounds differently, and needs opset 14)."""
    name, x = layer.name, inputs[0]
    sixth = ctx.node("Div", [x, ctx.const(np.float32(6), f"{name}/six")], layer=name)[0]
    shifted = ctx.node("Add", [sixth, ctx.const(np.float32(0.5), f"{name}/half")], layer=name)[0]
    gate = ctx.node("Clip", [shifted, ctx.const(np.float32(0), f"{name}/zero"),
                             ctx.const(np.float32(1), f"{name}/one")], layer=name)[0]
    ctx.node("Mul", [x, gate], outputs, layer=name)


@register_lowering("HardSigmoid")
def lower_hard_sigmoid(ctx: LoweringContext, layer: Layer, inputs: list[str], outputs: list[str]) -> None:
    """hardsigmoid_layer.cpp: max(0, min(1, x * alpha + beta)), ONNX HardSigmoid's definition."""
    p = layer.param.hardsigmoid_param
    ctx.node("HardSigmoid", inputs, outputs, layer=layer.name, alpha=float(p.alpha), beta=float(p.beta))
