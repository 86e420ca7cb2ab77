"""Layers joined by values: the model's data flow, unambiguous even with in-place layers.

Caffe lets a layer write its result into its input blob (``top == bottom``, as ReLU
usually does), so one blob name stands for several tensors over time. Here every
write makes a new *value*: the first keeps the blob's name, each in-place rewrite is
named ``blob@layer``. Edges of the DiGraph go from producer to consumer layer and
carry the values that flow along them.

Some Caffe layers (Split, Reshape, Flatten, ...: ``memory_sharing``) make their tops share
their bottom's memory, so an in-place write to one of those blobs changes all of them.
The graph keeps that visible: such a write gives every other blob of the same memory
that is read afterwards (by a layer, or as its final value) a new value ``blob@layer``,
computed by a synthetic *view* layer (``Layer.alias_of`` names the in-place layer) that
shows the written tensor in that blob's shape: a Split with one top (an identity) or a
Reshape. The partitioner, the ONNX lowering and the Caffe sub-nets then all see Caffe's
data flow, while each of them still works on plain values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import networkx as nx

from ..errors import ModelError
from ..model.caffe_import import caffe_pb2
from ..model.caffe_model import CaffeModel
from .memory_sharing import sharing_tops

Shape = tuple[int, ...]


def _fresh(wanted: str, taken: Callable[[str], bool]) -> str:
    """``wanted``, or ``wanted#2``, ``wanted#3``, ... : the first that is not ``taken``."""
    candidate, n = wanted, 1
    while taken(candidate):
        n += 1
        candidate = f"{wanted}#{n}"
    return candidate


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
    """A Caffe layer with its inputs and outputs resolved to values; ``index`` is its
    position in execution order (views follow the layer whose write they show)."""
    name: str
    type: str
    index: int
    param: Any  # caffe_pb2.LayerParameter
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    #: For a synthetic view (see the module docstring): the in-place layer whose write it
    #: shows under another blob's name. None for the model's own layers.
    alias_of: Optional[str] = None

    @property
    def is_input(self) -> bool:
        return self.type == "Input"


@dataclass
class _Spec:
    """A layer while the graph is being built (indices are known only at the end)."""
    name: str
    param: Any
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    alias_of: Optional[str] = None
    views: list["_Spec"] = field(default_factory=list)


class LayerGraph:
    """Layers in Caffe's execution order, their values, and a DiGraph of the data flow."""

    def __init__(self, model: CaffeModel):
        self.model = model
        self.layers: dict[str, Layer] = {}
        self.values: dict[str, Value] = {}
        self.consumers: dict[str, list[str]] = {}
        self.graph = nx.DiGraph()
        self._shapes = model.info.blob_shapes
        self._current: dict[str, str] = {}  # blob name -> id of its latest value
        self._memory: dict[str, set[str]] = {}  # blob -> the blobs sharing its memory (one set per memory)
        self._pending: dict[str, tuple[str, _Spec]] = {}  # blob -> (value written into its memory, writer)
        self._names = {param.name for param in model.net.layer}
        specs: list[_Spec] = []
        available: set[str] = set()  # Caffe's net outputs: blobs nobody read after their last write
        for param in model.net.layer:
            bottoms = tuple(self._read(b) for b in param.bottom)
            spec = _Spec(param.name, param, bottoms, ())
            specs.append(spec)
            available.difference_update(param.bottom)
            available.update(param.top)
            tops = []
            for top in param.top:
                value_id = top if top not in self._current else self._fresh_id(f"{top}@{param.name}")
                self._add_value(value_id, top, param.name)
                tops.append(value_id)
            spec.tops = tuple(tops)
            shared = sharing_tops(param)
            for j, top in enumerate(param.top):
                if j in shared:
                    self._share(top, param.bottom[0])
                elif j < len(param.bottom) and param.bottom[j] == top:  # in-place: the memory changes
                    for blob in self._memory.get(top, {top}) - set(param.top):
                        self._pending[blob] = (tops[j], spec)
        for blob in list(self._pending):
            self._materialise(blob)
        for index, spec in enumerate(s for real in specs for s in (real, *real.views)):
            self._add_layer(spec, index)
        self.final_value = dict(self._current)
        self.inputs = [v for layer in self.layers.values() if layer.is_input for v in layer.tops]
        self.outputs = [v for blob, v in self._current.items() if blob in available]

    def _add_value(self, value_id: str, blob: str, producer: str) -> None:
        if blob not in self._shapes:
            raise ModelError(f"{self.model.prototxt}: Caffe reports no shape for blob '{blob}' "
                             f"of layer '{producer}'")
        self.values[value_id] = Value(value_id, blob, self._shapes[blob], producer)
        self.consumers[value_id] = []
        self._current[blob] = value_id

    def _add_layer(self, spec: _Spec, index: int) -> None:
        layer = Layer(spec.name, spec.param.type, index, spec.param, spec.bottoms, spec.tops, spec.alias_of)
        self.layers[layer.name] = layer
        self.graph.add_node(layer.name, layer=layer)
        for value_id in layer.bottoms:
            self.consumers[value_id].append(layer.name)
            producer = self.values[value_id].producer
            if self.graph.has_edge(producer, layer.name):
                self.graph.edges[producer, layer.name]["values"].append(value_id)
            else:
                self.graph.add_edge(producer, layer.name, values=[value_id])

    def _share(self, blob: str, source: str) -> None:
        """``blob`` now points at ``source``'s memory (Blob::ShareData)."""
        merged = self._memory.get(source, {source}) | self._memory.get(blob, {blob})
        for member in merged:
            self._memory[member] = merged

    def _read(self, blob: str) -> str:
        """The value a layer reading ``blob`` now gets: after an in-place write through
        another blob of the same memory, a view of that write."""
        if blob in self._pending:
            self._materialise(blob)
        return self._current[blob]

    def _materialise(self, blob: str) -> None:
        written, writer = self._pending.pop(blob)
        value_id = self._fresh_id(f"{blob}@{writer.name}")
        name = self._fresh_name(f"{writer.name} (view as {blob})")
        source, target = self.values[written].shape, self._shapes[blob]
        param = caffe_pb2().LayerParameter(name=name, bottom=[written], top=[value_id])
        if source == target:
            param.type = "Split"  # one top: Caffe shares the memory, ONNX an Identity
        else:  # keep the batch axis free where both blobs have it first
            param.type = "Reshape"
            first = [0 if source and target[0] == source[0] else -1] if target else []
            param.reshape_param.shape.dim.extend(first + list(target[1:]))
        self._add_value(value_id, blob, name)
        writer.views.append(_Spec(name, param, (written,), (value_id,), writer.name))

    def _fresh_id(self, wanted: str) -> str:
        return _fresh(wanted, lambda c: c in self.values or c in self._shapes)

    def _fresh_name(self, wanted: str) -> str:
        name = _fresh(wanted, self._names.__contains__)
        self._names.add(name)
        return name

    def caffe_layer(self, value_id: str) -> str:
        """The layer of the model after which Caffe's blob of ``value_id`` holds it: its
        producer, or for a view the in-place layer whose write it shows."""
        layer = self.layers[self.values[value_id].producer]
        return layer.alias_of or layer.name

    def views(self) -> list[Layer]:
        """The synthetic view layers (see the module docstring), in execution order."""
        return [layer for layer in self.layers.values() if layer.alias_of]

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
        in-place layer rewrites, the rewritten value, not the one fed; for a blob sharing
        memory with one an in-place layer rewrote, the view of that write). A value id
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
