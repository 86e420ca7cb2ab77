"""Layers joined by values: the model's data flow, unambiguous even with in-place layers.

Caffe lets a layer write its result into its input blob (``top == bottom``, as ReLU
usually does), so one blob name stands for several tensors over time. Here every
write makes a new *value*: the first keeps the blob's name, each in-place rewrite is
named ``blob@layer``. Edges of the DiGraph go from producer to consumer layer and
carry the values that flow along them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx

from ..errors import ModelError
from ..model.caffe_model import CaffeModel

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Value:
    """One tensor: a particular write of a Caffe blob."""
    id: str
    blob: str
    shape: Shape
    producer: str

    @property
    def bytes_per_item(self) -> int:
        """FP32 bytes of one batch item (the first axis is the batch)."""
        per_item = 1
        for d in self.shape[1:]:
            per_item *= d
        return 4 * per_item


@dataclass(frozen=True)
class Layer:
    """A Caffe layer with its inputs and outputs resolved to values."""
    name: str
    type: str
    index: int
    param: Any  # caffe_pb2.LayerParameter
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]

    @property
    def is_input(self) -> bool:
        return self.type == "Input"


class LayerGraph:
    """Layers in Caffe's execution order, their values, and a DiGraph of the data flow."""

    def __init__(self, model: CaffeModel):
        self.model = model
        self.layers: dict[str, Layer] = {}
        self.values: dict[str, Value] = {}
        self.consumers: dict[str, list[str]] = {}
        self.graph = nx.DiGraph()
        current: dict[str, str] = {}  # blob name -> id of its latest value
        shapes = model.info.blob_shapes
        for index, param in enumerate(model.net.layer):
            bottoms = tuple(current[b] for b in param.bottom)
            tops = []
            for top in param.top:
                value_id = top if top not in current else self._fresh_id(f"{top}@{param.name}")
                if top not in shapes:
                    raise ModelError(f"{model.prototxt}: Caffe reports no shape for blob '{top}' "
                                     f"of layer '{param.name}'")
                self.values[value_id] = Value(value_id, top, shapes[top], param.name)
                self.consumers[value_id] = []
                current[top] = value_id
                tops.append(value_id)
            layer = Layer(param.name, param.type, index, param, bottoms, tuple(tops))
            self.layers[layer.name] = layer
            self.graph.add_node(layer.name, layer=layer)
            for value_id in bottoms:
                self.consumers[value_id].append(layer.name)
                producer = self.values[value_id].producer
                if self.graph.has_edge(producer, layer.name):
                    self.graph.edges[producer, layer.name]["values"].append(value_id)
                else:
                    self.graph.add_edge(producer, layer.name, values=[value_id])
        self.final_value = dict(current)
        self.inputs = [v for layer in self.layers.values() if layer.is_input for v in layer.tops]
        self.outputs = [v for v in current.values() if not self.consumers[v]]

    def _fresh_id(self, wanted: str) -> str:
        candidate, n = wanted, 1
        while candidate in self.values or candidate in self.model.info.blob_shapes:
            n += 1
            candidate = f"{wanted}#{n}"
        return candidate

    def input_value(self, blob: str) -> str:
        """The value the caller feeds for the net input ``blob``: the Input layer's write,
        before any in-place layer rewrites it (those rewrites are ``blob@layer``)."""
        for value in self.inputs:
            if self.values[value].blob == blob:
                return value
        raise ModelError(f"{self.model.prototxt}: '{blob}' is not an input (inputs: "
                         f"{', '.join(self.values[v].blob for v in self.inputs)})")

    def value_of_blob(self, blob: str) -> str:
        """The value a user means by a blob name when reading results: its last write, as
        Caffe's ``net.blobs[blob]`` holds after a forward pass (for a net input that an
        in-place layer rewrites, the rewritten value, not the one fed). A value id
        (``blob@layer``) names that value itself."""
        if blob in self.final_value:
            return self.final_value[blob]
        if blob in self.values:
            return blob
        raise ModelError(f"{self.model.prototxt}: no blob named '{blob}' (blobs: "
                         f"{', '.join(sorted(self.final_value)[:20])}{'...' if len(self.final_value) > 20 else ''})")

    def compute_layers(self) -> list[Layer]:
        """Every layer except the Input layers that only declare net inputs."""
        return [layer for layer in self.layers.values() if not layer.is_input]
