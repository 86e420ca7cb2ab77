"""pycaffe runs the segments TensorRT cannot take, as generated sub-nets.

A segment becomes its own prototxt: one Input layer per boundary value, then the
segment's layers with their parameters copied verbatim (so fork-specific fields and
Python layers' ``param_str`` survive), and their weights copied by layer name. Blobs
are renamed to value ids, which turns in-place chains into plain ones and lets a
sub-net expose a value that a later in-place layer of the same segment overwrites.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..graph.layer_graph import LayerGraph
from ..model.caffe_import import caffe, caffe_pb2
from ..model.caffe_model import push_weights
from ..model.protofile import write_prototxt


def subnet_parameter(graph: LayerGraph, layer_names: Sequence[str], inputs: Sequence[str],
                     name: str) -> Any:
    """The NetParameter of a sub-net computing ``layer_names`` from ``inputs`` (value ids)."""
    pb2 = caffe_pb2()
    net = pb2.NetParameter(name=name)
    taken = set(layer_names)
    for value_id in inputs:
        layer = net.layer.add(name=_unique(f"input/{value_id}", taken), type="Input", top=[value_id])
        layer.input_param.shape.add().dim.extend(graph.values[value_id].shape)
    for layer_name in layer_names:
        layer = graph.layers[layer_name]
        copy = net.layer.add()
        copy.CopyFrom(layer.param)
        del copy.bottom[:]
        copy.bottom.extend(layer.bottoms)
        del copy.top[:]
        copy.top.extend(layer.tops)
    return net


def _unique(wanted: str, taken: set[str]) -> str:
    name, n = wanted, 1
    while name in taken:
        n += 1
        name = f"{wanted}#{n}"
    taken.add(name)
    return name


class CaffeEngine:
    """A pycaffe sub-net for one segment, on the CPU (``CaffeGpuEngine`` runs it on a GPU)."""

    kind = "caffe"

    def __init__(self, graph: LayerGraph, layer_names: Sequence[str], inputs: Sequence[str],
                 outputs: Sequence[str], weights: Mapping[str, list[np.ndarray]], *, name: str = "segment"):
        self.input_names = list(inputs)
        self.output_names = list(outputs)
        self._workdir = Path(tempfile.mkdtemp(prefix="hybrid_infer_caffe_"))
        prototxt = self._workdir / f"{name}.prototxt"
        write_prototxt(subnet_parameter(graph, layer_names, inputs, name), prototxt)
        cf = caffe()
        self._use_mode()
        self._net = cf.Net(str(prototxt), cf.TEST)
        push_weights(self._net, {n: weights[n] for n in layer_names if n in self._net.params}, name)
        self._blobs = self._net.blobs

    def _use_mode(self) -> None:
        """Caffe's mode is one setting per thread, shared by every net: set this engine's
        before it creates or runs its net, since another engine may have changed it."""
        caffe().set_mode_cpu()

    def _reshape(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Resize the input blobs (and, through Caffe, the rest) only when a shape changed."""
        reshaped = False
        for name in self.input_names:
            blob = self._blobs[name]
            if tuple(blob.shape) != shapes[name]:
                blob.reshape(*shapes[name])
                reshaped = True
        if reshaped:
            self._net.reshape()

    def _forward(self) -> None:
        self._net._forward(0, len(self._net.layers) - 1)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the sub-net; returned arrays are Caffe's blob memory, valid until the next run."""
        self._use_mode()
        self._reshape({name: tuple(feeds[name].shape) for name in self.input_names})
        for name in self.input_names:
            self._blobs[name].data[...] = feeds[name]
        self._forward()
        return {name: self._blobs[name].data for name in self.output_names}

    def close(self) -> None:
        self._net = None
        self._blobs = None
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __del__(self) -> None:
        if os.path.isdir(getattr(self, "_workdir", "")):
            shutil.rmtree(self._workdir, ignore_errors=True)
