"""Inputs whose *values* are indices: those that feed an Embed layer.

embed_layer.cpp reads row ``static_cast<int>(x)`` of its (input_dim, num_output) weight for
every input value x; it only DCHECKs that x is a whole number in [0, input_dim), so a
release Caffe reads outside its weights for anything else (garbage or NaN), and ONNX's
Gather fails on such an index, or wraps a negative one. hybrid_infer therefore refuses
net inputs that feed an Embed directly unless they hold such indices, and draws random
inputs for them as random valid indices.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from .errors import InputError
from .graph.layer_graph import Layer, LayerGraph


def embed_requirement(layer: Layer) -> str:
    """What an Embed layer takes, for messages: "layer 'emb' (Embed) takes whole numbers in [0, 7)"."""
    return (f"layer '{layer.name}' (Embed) takes whole numbers in [0, {layer.param.embed_param.input_dim}) "
            "as row indices")


def index_inputs(graph: LayerGraph) -> dict[str, list[Layer]]:
    """Net inputs (value ids) that Embed layers read directly, each with those layers."""
    readers: dict[str, list[Layer]] = {}
    for layer in graph.layers.values():
        if layer.type == "Embed" and layer.bottoms[0] in graph.inputs:
            readers.setdefault(layer.bottoms[0], []).append(layer)
    return readers


def index_bound(readers: list[Layer]) -> int:
    """The exclusive upper bound of the indices that all of ``readers`` (Embed layers) take."""
    return min(int(layer.param.embed_param.input_dim) for layer in readers)


def check_index_inputs(graph: LayerGraph, readers: Mapping[str, list[Layer]],
                       feeds: Mapping[str, np.ndarray]) -> None:
    """Raise InputError (one line, naming the input, the layer and an offending value) when a
    fed array (value id -> array) that Embed layers read (``readers``, from ``index_inputs``)
    holds anything but whole numbers in [0, input_dim) (NaN and Inf included)."""
    for value, layers in readers.items():
        array = feeds[value]
        for layer in layers:
            bad = (array != np.floor(array)) | (array < 0) | (array >= layer.param.embed_param.input_dim)
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise InputError(f"input '{graph.values[value].blob}' holds {array[where]:g} at {where}, but "
                                 f"{embed_requirement(layer)}")
