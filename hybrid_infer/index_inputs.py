"""Inputs whose *values* are indices: those that feed an Embed layer, or the index bottom of
a BatchReindex layer.

embed_layer.cpp reads row ``static_cast<int>(x)`` of its (input_dim, num_output) weight for
every input value x; it only DCHECKs that x is a whole number in [0, input_dim), so a
release Caffe reads outside its weights for anything else (garbage or NaN), and ONNX's
Gather fails on such an index, or wraps a negative one. batch_reindex_layer.cpp CHECKs
(a fatal abort) at every forward that each index x of its second bottom is in [0, N), N
the first axis of its first bottom at that forward, then takes item ``static_cast<int>(x)``:
a value outside aborts at whatever shape was rehearsed before. hybrid_infer therefore
refuses net inputs that feed either directly unless they hold such indices, and draws
random inputs for them as random valid indices.
"""
from __future__ import annotations

from typing import Collection, Iterable, Mapping, Optional

import numpy as np

from .errors import InputError
from .graph.layer_graph import Layer, LayerGraph

#: Layer type -> which of its bottoms holds indices.
INDEX_BOTTOM = {"Embed": 0, "BatchReindex": 1}


def embed_requirement(layer: Layer) -> str:
    """What an Embed layer takes, for messages: "layer 'emb' (Embed) takes whole numbers in [0, 7)"."""
    return (f"layer '{layer.name}' (Embed) takes whole numbers in [0, {layer.param.embed_param.input_dim}) "
            "as row indices")


def index_inputs(graph: LayerGraph, values: Optional[Collection[str]] = None,
                 layers: Optional[Iterable[Layer]] = None) -> dict[str, list[Layer]]:
    """Values (default: the net inputs) that ``layers`` (default: all) read directly as
    indices, each with those layers. A Caffe segment checks its own inputs this way: Caffe's
    Embed only DCHECKs its indices, so in a release build it reads past its table."""
    values = graph.inputs if values is None else values
    readers: dict[str, list[Layer]] = {}
    for layer in graph.layers.values() if layers is None else layers:
        index = INDEX_BOTTOM.get(layer.type)
        if index is not None and len(layer.bottoms) > index and layer.bottoms[index] in values:
            readers.setdefault(layer.bottoms[index], []).append(layer)
    return readers


def _limit(layer: Layer, graph: LayerGraph, batch: int) -> int:
    """The exclusive upper bound of ``layer``'s indices when the net runs at ``batch``: an
    Embed's input_dim; for a BatchReindex the first axis of its first bottom, which is the
    batch when it was the batch at set-up."""
    if layer.type == "Embed":
        return int(layer.param.embed_param.input_dim)
    setup_batch = graph.values[graph.inputs[0]].shape[0]
    items = graph.values[layer.bottoms[0]].shape[0]
    return batch if items == setup_batch else items


def _requirement(layer: Layer, limit: int) -> str:
    if layer.type == "Embed":
        return embed_requirement(layer)
    return (f"layer '{layer.name}' (BatchReindex) takes indices in [0, {limit}) of the items of its first bottom "
            f"'{layer.bottoms[0]}' (Caffe aborts on any other)")


def index_bound(readers: list[Layer], graph: LayerGraph, batch: int) -> int:
    """The exclusive upper bound of the indices that all of ``readers`` take at ``batch``."""
    return min(_limit(layer, graph, batch) for layer in readers)


def check_index_inputs(graph: LayerGraph, readers: Mapping[str, list[Layer]],
                       feeds: Mapping[str, np.ndarray]) -> None:
    """Raise InputError (one line, naming the input, the layer and an offending value) when a
    fed array (value id -> array) that layers read as indices (``readers``, from
    ``index_inputs``) holds a value they do not take (NaN and Inf included): Embed takes
    whole numbers in [0, input_dim), BatchReindex any number in [0, N)."""
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    for value, layers in readers.items():
        array = feeds[value]
        for layer in layers:
            limit = _limit(layer, graph, batch)
            with np.errstate(invalid="ignore"):
                bad = ~((array >= 0) & (array < limit))
                if layer.type == "Embed":
                    bad |= array != np.floor(array)
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise InputError(f"input '{graph.values[value].blob}' holds {array[where]:g} at {where}, but "
                                 f"{_requirement(layer, limit)}")
