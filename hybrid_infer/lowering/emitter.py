"""Shorthand for lowerings that emit many ONNX nodes, and for the bodies of ONNX Loops.

``e = Emitter(ctx, layer.name)``; ``e("Add", a, b)`` appends a node with one fresh output
and returns that output's name, ``e.many("TopK", [x, k], 2, axis=1)`` returns several,
``e.const(value, hint)`` adds an initializer. A ``LoopBody`` takes the same calls but
collects its nodes apart, for the ``body`` attribute of a ``Loop`` node; a body may read
any tensor of the enclosing graph by name. Every node carries the Caffe layer's name in
its ``doc_string``, as ``LoweringContext.node`` does.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper

from .context import LoweringContext


class Emitter:
    """Nodes of one layer, appended to the segment's graph through the context."""

    def __init__(self, ctx: LoweringContext, layer: str):
        self.ctx = ctx
        self.layer = layer
        self._consts: dict[tuple, str] = {}

    def _emit(self, op: str, inputs: Sequence[str], outputs: list[str], attrs: dict[str, Any]) -> list[str]:
        return self.ctx.node(op, inputs, outputs, layer=self.layer, **attrs)

    def __call__(self, op: str, *inputs: str, **attrs: Any) -> str:
        return self.many(op, inputs, 1, **attrs)[0]

    def many(self, op: str, inputs: Sequence[str], count: int, **attrs: Any) -> list[str]:
        outputs = [self.ctx.fresh(f"{self.layer}/{op.lower()}") for _ in range(count)]
        return self._emit(op, list(inputs), outputs, attrs)

    def const(self, value: Any, hint: str) -> str:
        """An initializer (float as float32, integers as int64; see ``LoweringContext.const``);
        the same value under the same hint is added once."""
        array = np.asarray(value)
        key = (hint, array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.ctx.const(array, f"{self.layer}/{hint}")
        return self._consts[key]

    def fill(self, like: str, value: float) -> str:
        """A float32 tensor shaped like ``like`` and filled with ``value``."""
        return self("ConstantOfShape", self("Shape", like),
                    value=self.ctx.tensor_attribute(np.array([value], dtype=np.float32)))

    def columns(self, x: str, axis: int) -> list[str]:
        """The four coordinates of boxes laid out along ``axis`` (size 4), each kept as size 1."""
        return self.many("Split", [x, self.const(np.array([1, 1, 1, 1]), "split4")], 4, axis=axis)


class LoopBody(Emitter):
    """The body of an ONNX ``Loop``: nodes kept apart until ``graph`` wraps them."""

    def __init__(self, ctx: LoweringContext, layer: str):
        super().__init__(ctx, layer)
        self.nodes: list[onnx.NodeProto] = []

    def _emit(self, op: str, inputs: Sequence[str], outputs: list[str], attrs: dict[str, Any]) -> list[str]:
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=f"{self.layer}/loop/{op}_{len(self.nodes)}",
                                           doc_string=self.layer, **attrs))
        return outputs

    def value(self, hint: str, elem_type: int, shape: Sequence[int | str] | None) -> onnx.ValueInfoProto:
        """A fresh name with its type, for the body's inputs."""
        return helper.make_tensor_value_info(self.ctx.fresh(f"{self.layer}/loop/{hint}"), elem_type, shape)

    def graph(self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[tuple[str, int]]) -> onnx.GraphProto:
        """The body graph: ``inputs`` (iteration, condition, carried values), ``outputs`` as
        (name, element type) pairs (condition first, then carried values)."""
        return helper.make_graph(self.nodes, f"{self.layer}/loop", list(inputs),
                                 [helper.make_tensor_value_info(name, t, None) for name, t in outputs])
