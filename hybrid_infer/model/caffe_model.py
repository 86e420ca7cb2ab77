"""A Caffe model as hybrid_infer sees it: normalised layers, blob shapes, weights.

Shapes come from Caffe itself (the net is instantiated once, in a forked child, so a
fatal Caffe check becomes a readable error). Weights are read from the caffemodel by
``caffemodel.read_caffemodel`` (layer names and blobs only, so files written by other
Caffe forks load too) and pushed by layer name into every pycaffe net hybrid_infer
builds; Caffe's own C++ reader never sees the file.
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import EnvironmentProblem, ModelError
from ..memory_budget import check_fits
from .caffe_import import caffe, registered_layer_types
from .caffe_limits import check_in_place, check_operand_shapes, check_set_up_net
from .caffemodel import read_caffemodel
from .isolated import CaffeFailure, call_isolated
from .param_sharing import param_owners
from .protofile import LayerParameter, NetParameter, normalise, read_prototxt, write_prototxt
from .random_weights import random_weights
from .training_layers import DroppedLayer, drop_training_leftovers
from .weight_fitting import fit_weights

Shape = tuple[int, ...]


@dataclass(frozen=True)
class NetInfo:
    """What Caffe computed when it set the net up; ``fillers``: the parameter values its
    fillers gave the layers asked for (layer name -> arrays)."""
    blob_shapes: dict[str, Shape]
    param_shapes: dict[str, list[Shape]]
    inputs: list[str]
    outputs: list[str]
    fillers: dict[str, list[np.ndarray]]


def _inspect_net(prototxt: str, fillers_of: Sequence[str] = ()) -> NetInfo:
    """Instantiate the net (in the forked child) and report shapes, and the filled parameter
    values of the layers ``fillers_of``; it needs no weights."""
    cf = caffe()
    cf.set_mode_cpu()
    net = cf.Net(prototxt, cf.TEST)
    layers = dict(zip(net._layer_names, net.layers))
    return NetInfo(
        blob_shapes={name: tuple(int(d) for d in blob.shape) for name, blob in net.blobs.items()},
        param_shapes={name: [tuple(int(d) for d in b.shape) for b in layer.blobs]
                      for name, layer in layers.items() if len(layer.blobs)},
        inputs=list(net.inputs), outputs=list(net.outputs),
        fillers={name: [np.array(b.data, copy=True) for b in layers[name].blobs]
                 for name in fillers_of if name in layers and len(layers[name].blobs)})


def _check_layers(net: NetParameter, source: str, dropped: Sequence[DroppedLayer] = ()) -> None:
    """Catch what Caffe would abort on, before Caffe sees the net (``dropped``: the
    training-only layers already removed, named when a layer reads one of their tops)."""
    check_set_up_net(net, source)
    known = registered_layer_types()
    dropped_top = {top: d for d in dropped for top in d.tops}
    produced: set[str] = set()
    readers: dict[str, list[str]] = {}  # blob -> the layers that read its latest write
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
        for bottom in layer.bottom:
            readers.setdefault(bottom, []).append(layer.name)
        for j, top in enumerate(layer.top):
            in_place = j < len(layer.bottom) and layer.bottom[j] == top
            if top in produced and not in_place:
                raise ModelError(f"{source}: blob '{top}' is produced twice (by '{layer.name}' and an "
                                 "earlier layer); only in-place layers (top i the same as bottom i) may "
                                 "reuse a blob name")
            if in_place and len(readers[top]) > 1:
                _refuse_shared_rewrite(layer.name, top, readers[top], source)
            if in_place:
                check_in_place(layer, top, source)
            produced.add(top)
            readers[top] = []
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


def _refuse_shared_rewrite(layer: str, blob: str, readers: list[str], source: str) -> None:
    """Caffe's InsertSplits (src/caffe/util/insert_splits.cpp) gives a blob write with
    several readers a Split, and so renames the bottom of an in-place layer among them:
    its top then names an existing blob and Net::AppendTop aborts with "Top blob ...
    produced by multiple sources"."""
    others = [r for r in readers if r != layer]
    clash = f"but layer '{others[0]}' also reads that write of '{blob}'" if others else \
        f"and reads that write of '{blob}' twice"
    raise ModelError(f"{source}: layer '{layer}' rewrites blob '{blob}' in place, {clash} (Caffe refuses this: "
                     f"\"Top blob '{blob}' produced by multiple sources\"); "
                     f"give '{layer}' a new top (e.g. top: \"{blob}_{layer}\") and let the layers after "
                     "it read that")


def _override_input_shapes(net: NetParameter, shapes: Mapping[str, Sequence[int]], source: str) -> None:
    inputs = {top: layer for layer in net.layer if layer.type == "Input" for top in layer.top}
    for blob, dims in shapes.items():
        if blob not in inputs:
            raise ModelError(f"{source}: cannot set the shape of '{blob}': not an input "
                             f"(inputs: {', '.join(inputs)})")
        layer = inputs[blob]
        index = list(layer.top).index(blob)
        params = layer.input_param.shape
        if not len(params):  # an input without a shape: each top gets its own
            for _ in layer.top:
                params.add()
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
            self.info: NetInfo = call_isolated(_inspect_net, str(self.normalised_prototxt),
                                               list(self.renamed_layers) if stored is not None else [])
        except CaffeFailure as exc:
            raise ModelError(f"{self.prototxt}: Caffe cannot set this net up: {exc}") from None
        check_operand_shapes(self.net, self.info.blob_shapes, str(self.prototxt))
        # A net without learned parameters (e.g. only PriorBox and DetectionOutput) needs no weights.
        self._weights: dict[str, list[np.ndarray]] | None = None if self.info.param_shapes else {}
        if stored is not None:
            assert self.weights_path is not None
            self._weights = fit_weights(stored, self.net, self.info.param_shapes, self.renamed_layers,
                                        self.info.fillers, self.weights_path, self.prototxt)
        self._reference: Any = None

    @property
    def layers(self) -> list[LayerParameter]:
        return list(self.net.layer)

    @property
    def weights(self) -> dict[str, list[np.ndarray]]:
        """Parameter arrays by layer name (from the caffemodel, or random; empty for a net
        without parameters). Raises ModelError when the net has parameters and none were given."""
        self.require_weights()
        assert self._weights is not None
        return self._weights

    def require_weights(self) -> None:
        """Raise ModelError, naming layers that have parameters, when the net needs weights
        and none were given (a net without learned parameters needs none)."""
        if self._weights is None:
            names = list(self.info.param_shapes)
            listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ModelError(f"{self.prototxt}: running needs weights (layers {listed} have parameters): pass "
                             "--weights FILE.caffemodel, or --random-weights SEED to try the model with random "
                             "parameters")

    def set_random_weights(self, seed: int) -> None:
        """Replace every parameter with random values drawn for its layer type (tests, benchmarks)."""
        layer_types = {layer.name: layer.type for layer in self.net.layer}
        count = sum(math.prod(shape) for shapes in self.info.param_shapes.values() for shape in shapes)
        check_fits(12 * count, f"random weights for {self.prototxt}", "this model is too large for this machine")
        self._weights = random_weights(self.info.param_shapes, layer_types, seed,
                                       param_owners(self.net, self.info.param_shapes))
        if self._reference is not None:
            push_weights(self._reference, self._weights, "random weights")

    def reference_net(self) -> Any:
        """The whole model as one pycaffe net (CPU), carrying the current weights."""
        if self._reference is None:
            weights = self.weights
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
