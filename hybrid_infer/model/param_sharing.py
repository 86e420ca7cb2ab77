"""Parameter blobs shared between layers by name (``param { name: "w" }``).

Caffe's ``Net::AppendParam`` (src/caffe/net.cpp): the first layer that gives a parameter
blob a name owns it; every later parameter blob of that name, in any layer, is made to
point at the owner's memory (``Net::ShareWeights``: ``Blob::ShareData``) and keeps only
its own shape (``share_mode: PERMISSIVE`` allows another shape of the same count). So all
of them hold one set of values: the filler's of the owner, then whatever was written to
any of them last.
"""
from __future__ import annotations

from typing import Any, Mapping

Shape = tuple[int, ...]
#: A parameter blob: (layer name, index among the layer's blobs).
ParamRef = tuple[str, int]


def param_owners(net: Any, param_shapes: Mapping[str, list[Shape]]) -> dict[ParamRef, ParamRef]:
    """For every parameter blob of the normalised ``net`` (caffe_pb2.NetParameter) that shares
    another's memory, that owner; blobs that own their memory are not listed.
    ``param_shapes`` gives the blobs each layer has (layer name -> shapes)."""
    first: dict[str, ParamRef] = {}
    owners: dict[ParamRef, ParamRef] = {}
    for layer in net.layer:
        for j in range(len(param_shapes.get(layer.name, []))):
            name = layer.param[j].name if j < len(layer.param) else ""
            if not name:
                continue
            if name in first:
                owners[(layer.name, j)] = first[name]
            else:
                first[name] = (layer.name, j)
    return owners
