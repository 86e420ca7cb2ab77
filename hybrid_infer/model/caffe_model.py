"""A Caffe model as hybrid_infer sees it: normalised layers, blob shapes, weights.

Shapes come from Caffe itself (the net is instantiated once, in a forked child, so a
fatal Caffe check becomes a readable error). Weights are read from the caffemodel by
``caffemodel.read_caffemodel`` (layer names and blobs only, so files written by other
Caffe forks load too) and pushed by layer name into every pycaffe net hybrid_infer
builds; Caffe's own C++ reader never sees the file.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import EnvironmentProblem, ModelError
from .caffe_import import caffe, registered_layer_types
from .caffemodel import fit_weights, read_caffemodel
from .isolated import CaffeFailure, call_isolated
from .protofile import LayerParameter, NetParameter, normalise, read_prototxt, write_prototxt
from .random_weights import random_weights
from .training_layers import DroppedLayer, drop_training_leftovers

Shape = tuple[int, ...]


@dataclass(frozen=True)
class NetInfo:
    """What Caffe computed when it set the net up."""
    blob_shapes: dict[str, Shape]
    param_shapes: dict[str, list[Shape]]
    inputs: list[str]
    outputs: list[str]


def _inspect_net(prototxt: str) -> NetInfo:
    """Instantiate the net (in the forked child) and report shapes; it needs no weights."""
    cf = caffe()
    cf.set_mode_cpu()
    net = cf.Net(prototxt, cf.TEST)
    return NetInfo(
        blob_shapes={name: tuple(int(d) for d in blob.shape) for name, blob in net.blobs.items()},
        param_shapes={name: [tuple(int(d) for d in b.shape) for b in layer.blobs]
                      for name, layer in zip(net._layer_names, net.layers) if len(layer.blobs)},
        inputs=list(net.inputs), outputs=list(net.outputs))


def _check_layers(net: NetParameter, source: str, dropped: Sequence[DroppedLayer] = ()) -> None:
    """Catch what Caffe would abort on, before Caffe sees the net (``dropped``: the
    training-only layers already removed, named when a layer reads one of their tops)."""
    known = registered_layer_types()
    dropped_top = {top: d for d in dropped for top in d.tops}
    produced: set[str] = set()
    for layer in net.layer:
        if layer.type not in known:
            raise ModelError(
                f"{source}: layer '{layer.name}' has type '{layer.type}', which this Caffe build does "
                f"not have; use the Caffe (fork) the model was written for, or remove the layer")
        for bottom in layer.bottom:
            if bottom in dropped_top and bottom not in produced:
                d = dropped_top[bottom]
                raise ModelError(
                    f"{source}: layer '{layer.name}' reads blob '{bottom}', whose producer '{d.name}' was "
                    f"dropped as a training-only layer ({d.reason}); remove '{layer.name}' as well, or feed "
                    f"'{d.missing_blob}' as a net input")
            if bottom not in produced:
                raise ModelError(
                    f"{source}: layer '{layer.name}' reads blob '{bottom}', which no earlier layer "
                    "produces (a dangling or cyclic blob); fix the layer's bottom or the layer order")
        for top in layer.top:
            if top in produced and top not in layer.bottom:
                raise ModelError(f"{source}: blob '{top}' is produced twice (by '{layer.name}' and an "
                                 "earlier layer); only in-place layers may reuse a blob name")
            produced.add(top)
        if layer.type == "Python":
            module = layer.python_param.module
            try:
                found = importlib.util.find_spec(module) if module else None
            except (ImportError, ValueError):
                found = None
            if found is None:
                raise EnvironmentProblem(
                    f"{source}: Python layer '{layer.name}' needs module '{module}', which cannot be "
                    "imported; add its folder to PYTHONPATH")


def _override_input_shapes(net: NetParameter, shapes: Mapping[str, Sequence[int]], source: str) -> None:
    inputs = {top: layer for layer in net.layer if layer.type == "Input" for top in layer.top}
    for blob, dims in shapes.items():
        if blob not in inputs:
            raise ModelError(f"{source}: cannot set the shape of '{blob}': not an input "
                             f"(inputs: {', '.join(inputs)})")
        layer = inputs[blob]
        index = list(layer.top).index(blob)
        params = layer.input_param.shape
        shape = params[index] if len(params) > 1 else params[0]
        if len(params) == 1 and len(layer.top) > 1:
            raise ModelError(f"{source}: inputs {list(layer.top)} share one shape; set them together")
        del shape.dim[:]
        shape.dim.extend(int(d) for d in dims)


def push_weights(net: Any, weights: Mapping[str, Sequence[np.ndarray]], source: str) -> None:
    """Copy ``weights`` (layer name -> arrays) into the pycaffe ``net``'s layers of those names.

    Every Caffe net hybrid_infer builds (the reference net, the sub-nets) gets its
    parameters this way. Raises ModelError if a layer's blob count or a blob's shape differs
    (``source`` names where the weights came from).
    """
    for name, arrays in weights.items():
        if name not in net.params:
            continue
        blobs = net.params[name]
        if len(blobs) != len(arrays):
            raise ModelError(f"{source}: layer '{name}' has {len(blobs)} parameter blob(s), "
                             f"the weights give {len(arrays)}")
        for index, (blob, array) in enumerate(zip(blobs, arrays)):
            if tuple(blob.data.shape) != tuple(array.shape):
                raise ModelError(f"{source}: layer '{name}' blob {index} has shape {tuple(blob.data.shape)}, "
                                 f"the weights give {tuple(array.shape)}")
            blob.data[...] = array


class CaffeModel:
    """A loaded model. ``weights`` maps layer name to its parameter arrays (FP32).

    Layers only training uses (Accuracy, loss layers, Silence) whose inputs cannot be
    produced at inference are dropped with one warning; ``dropped_layers`` lists them.
    """

    def __init__(self, prototxt: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None,
                 input_shapes: Mapping[str, Sequence[int]] | None = None):
        """``input_shapes`` replaces the prototxt's input sizes (e.g. a fully convolutional
        net fed a larger image); shapes of every blob are then inferred for those."""
        self.prototxt = Path(prototxt)
        self.weights_path = Path(weights) if weights is not None else None
        self.net, self.renamed_layers = normalise(read_prototxt(self.prototxt), str(self.prototxt))
        self.dropped_layers: list[DroppedLayer] = drop_training_leftovers(self.net, str(self.prototxt))
        if not len(self.net.layer):
            raise ModelError(f"{self.prototxt}: no layers in the TEST phase")
        if input_shapes:
            _override_input_shapes(self.net, input_shapes, str(self.prototxt))
        _check_layers(self.net, str(self.prototxt), self.dropped_layers)
        stored = read_caffemodel(self.weights_path) if self.weights_path is not None else None
        self._workdir = Path(tempfile.mkdtemp(prefix="hybrid_infer_model_"))
        weakref.finalize(self, shutil.rmtree, self._workdir, True)
        self.normalised_prototxt = self._workdir / "deploy.prototxt"
        write_prototxt(self.net, self.normalised_prototxt)
        try:
            self.info: NetInfo = call_isolated(_inspect_net, str(self.normalised_prototxt))
        except CaffeFailure as exc:
            raise ModelError(f"{self.prototxt}: Caffe cannot set this net up: {exc}") from None
        self._weights: dict[str, list[np.ndarray]] | None = None
        if stored is not None:
            assert self.weights_path is not None
            self._weights = fit_weights(stored, self.info.param_shapes, self.renamed_layers,
                                        self.weights_path, self.prototxt)
        self._reference: Any = None

    @property
    def layers(self) -> list[LayerParameter]:
        return list(self.net.layer)

    @property
    def weights(self) -> dict[str, list[np.ndarray]]:
        """Parameter arrays by layer name (from the caffemodel, or random)."""
        if self._weights is None:
            raise ModelError(f"{self.prototxt}: no weights given; pass a .caffemodel "
                             "(--weights) or ask for random weights (--random-weights SEED)")
        return self._weights

    def set_random_weights(self, seed: int) -> None:
        """Replace every parameter with random values drawn for its layer type (tests, benchmarks)."""
        layer_types = {layer.name: layer.type for layer in self.net.layer}
        self._weights = random_weights(self.info.param_shapes, layer_types, seed)
        if self._reference is not None:
            push_weights(self._reference, self._weights, "random weights")

    def reference_net(self) -> Any:
        """The whole model as one pycaffe net (CPU), carrying the current weights."""
        if self._reference is None:
            weights = self.weights if self.info.param_shapes else {}
            cf = caffe()
            cf.set_mode_cpu()
            self._reference = cf.Net(str(self.normalised_prototxt), cf.TEST)
            push_weights(self._reference, weights, str(self.weights_path or "random weights"))
        return self._reference

    def layer(self, name: str) -> LayerParameter:
        for layer in self.net.layer:
            if layer.name == name:
                return layer
        raise KeyError(name)
