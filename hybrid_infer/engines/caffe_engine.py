"""pycaffe runs the segments TensorRT cannot take, as generated sub-nets.

A segment becomes its own prototxt: one Input layer per boundary value, then the
segment's layers with their parameters copied verbatim (so fork-specific fields and
Python layers' ``param_str`` survive), and their weights copied by layer name. Blobs
are renamed to value ids, which turns in-place chains into plain ones and lets a
sub-net expose a value that a later in-place layer of the same segment overwrites.

Caffe aborts the process on what it cannot do, so on the CPU each sub-net's set-up and
its first reshape and forward at each new input shape are rehearsed in a forked child
(``model/isolated.py``); what fails there, or a Python layer raising during forward,
becomes a ``ModelError`` naming the segment and quoting Caffe or the layer.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ModelError
from ..graph.layer_graph import LayerGraph
from ..model.caffe_import import caffe, caffe_pb2
from ..model.caffe_limits import aborts_on_values, refuse_cpu_unsupported
from ..index_inputs import check_index_inputs, index_inputs
from ..model.isolated import Rehearsal, caffe_errors, call_isolated
from ..model.caffe_model import push_weights
from ..model.protofile import write_prototxt
from .caffe_batch import check_feed_batch


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
        self._graph = graph
        self._layers = [graph.layers[n] for n in layer_names]
        shown = ", ".join(layer_names[:4]) + (f" and {len(layer_names) - 4} more" if len(layer_names) > 4 else "")
        #: How messages name this segment.
        self.label = f"Caffe {name} ({shown})"
        self._rehearsal = Rehearsal(every_run=aborts_on_values([layer.param for layer in self._layers]))
        #: Segment inputs from other segments that its Embed/BatchReindex layers read as indices,
        #: checked at each run (net inputs are checked once, by HybridNet.check_inputs).
        self._index_readers = index_inputs(graph, set(inputs) - set(graph.inputs), self._layers)
        #: Outputs that layers of other segments read (the rest only go back to the caller).
        read_elsewhere = {v for layer in graph.layers.values() if layer.name not in set(layer_names)
                          for v in layer.bottoms}
        self._handed_over = set(outputs) & read_elsewhere
        self._check_layers([layer.param for layer in self._layers])
        self._workdir = Path(tempfile.mkdtemp(prefix="hybrid_infer_caffe_"))
        prototxt = self._workdir / f"{name}.prototxt"
        write_prototxt(subnet_parameter(graph, layer_names, inputs, name), prototxt)
        cf = caffe()
        self._use_mode()
        self._set_up_in_child(str(prototxt))
        self._net = cf.Net(str(prototxt), cf.TEST)
        push_weights(self._net, {n: weights[n] for n in layer_names if n in self._net.params}, name)
        self._blobs = self._net.blobs

    def _use_mode(self) -> None:
        """Caffe's mode is one setting per thread, shared by every net: set this engine's
        before it creates or runs its net, since another engine may have changed it."""
        caffe().set_mode_cpu()

    def _check_layers(self, layers: Sequence[Any]) -> None:
        """Refuse layers Caffe's CPU code would abort on (the GPU engine runs them)."""
        refuse_cpu_unsupported(layers, self.label)

    def _set_up_in_child(self, prototxt: str) -> None:
        """Set the sub-net up once in a forked child, so that an abort there is an error here."""
        def set_up() -> None:
            caffe().Net(prototxt, caffe().TEST)
        caffe_errors(self.label, call_isolated, set_up)

    def _reshape(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Resize the input blobs (and, through Caffe, the rest) only when a shape changed;
        InputError when a layer of the sub-net cannot run at the new batch (``caffe_batch``)."""
        check_feed_batch(self._graph, self._layers, shapes)
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
        shapes = {name: tuple(feeds[name].shape) for name in self.input_names}
        check_feed_batch(self._graph, self._layers, shapes)  # here, not as a failure in the rehearsal
        if self._index_readers:  # Caffe's Embed reads past its table on a bad index (release builds)
            check_index_inputs(self._graph, self._index_readers, {v: feeds[v] for v in self._index_readers})

        reshaped: dict[str, tuple[int, ...]] = {}

        def step() -> None:
            self._reshape(shapes)
            reshaped.update((name, tuple(self._blobs[name].shape)) for name in self.output_names)
            for name in self.input_names:
                self._blobs[name].data[...] = feeds[name]
            self._forward()
        caffe_errors(self.label, self._rehearsal.run, tuple(shapes.items()), step)
        outputs = {name: self._blobs[name].data for name in self.output_names}
        self._check_output_shapes(outputs, reshaped)
        return outputs

    def _check_output_shapes(self, outputs: Mapping[str, np.ndarray],
                             reshaped: Mapping[str, tuple[int, ...]]) -> None:
        """Raise ModelError naming the layer if an output that other segments read does not
        have the shape they were planned for (the set-up shape, batch aside): a layer (a Python one)
        that reshapes its top in forward, unlike its reshape said; or a batch that is not
        on axis 0 any more (a Permute moving it), at a batch other than the set-up one."""
        for value, array in outputs.items():
            planned = self._graph.values[value].shape
            if value not in self._handed_over or (array.ndim == len(planned)
                                                  and tuple(array.shape[1:]) == tuple(planned[1:])):
                continue
            layer = self._graph.layers[self._graph.values[value].producer]
            blob = self._graph.values[value].blob
            if tuple(array.shape) != reshaped.get(value, tuple(array.shape)):
                raise ModelError(f"{self.label}: layer '{layer.name}' ({layer.type}) wrote its top '{blob}' with "
                                 f"shape {tuple(array.shape)} at forward, but its reshape gave {reshaped[value]}; "
                                 "every segment is planned from the shapes Caffe computes at reshape: make the "
                                 "layer's reshape give its top the shape its forward writes")
            raise ModelError(f"{self.label}: '{blob}', the top of layer '{layer.name}' ({layer.type}), has shape "
                             f"{tuple(array.shape)} at this batch but {tuple(planned)} at the set-up batch: beyond "
                             "axis 0 it changes with the batch, and tensors handed between segments must keep the "
                             "batch on axis 0; run at the set-up batch, set the batch at load (--input-shape), or "
                             f"run the layers after '{layer.name}' in Caffe too")

    def close(self) -> None:
        self._net = None
        self._blobs = None
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __del__(self) -> None:
        if os.path.isdir(getattr(self, "_workdir", "")):
            shutil.rmtree(self._workdir, ignore_errors=True)
