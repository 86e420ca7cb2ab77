"""Which Caffe nets can run at a batch other than the one they were set up with.

hybrid_infer sets every Caffe net (the pure-Caffe reference and each Caffe segment's
sub-net) up at the prototxt's input shapes and then reshapes its input blobs to the batch
fed. Most layers recompute their top shapes in ``Reshape``; the layers in
``FIXED_AT_SETUP`` do not (or keep a buffer sized at set-up), and at another batch Caffe
then aborts the process, corrupts its heap ("double free or corruption") or returns stale
memory. Those nets are refused here before Caffe reshapes them. The table is read from the
bundled Caffe's sources (src/caffe/layers/), one rule per layer type.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

from ..errors import InputError
from ..graph.layer_graph import Layer, LayerGraph

#: A rule: why the layer (of the graph) cannot run at ``batch`` when set up at ``setup_batch``
#: (None: it can).
Rule = Callable[[Layer, LayerGraph, int, int], Optional[str]]


def _unsqueeze(layer: Layer, graph: LayerGraph, setup_batch: int, batch: int) -> Optional[str]:
    """unsqueeze.cpp: LayerSetUp stores the whole top shape; Reshape reapplies it, and Forward
    copies the bottom's count into a top of the set-up size."""
    return "fixes its output shape at set-up"


def _reshape(layer: Layer, graph: LayerGraph, setup_batch: int, batch: int) -> Optional[str]:
    """reshape_layer.cpp: a positive first dim replacing axis 0 is the batch, written out."""
    p = layer.param.reshape_param
    start = p.axis if p.axis >= 0 else _rank(layer, graph) + p.axis + 1
    if start == 0 and p.num_axes != 0 and len(p.shape.dim) and p.shape.dim[0] > 0:
        return f"writes the batch axis as {p.shape.dim[0]} in its reshape_param"
    return None


def _rank(layer: Layer, graph: LayerGraph) -> int:
    return len(graph.values[layer.bottoms[0]].shape)


def _axis_zero(axis: int, layer: Layer, graph: LayerGraph) -> bool:
    """Whether Caffe's ``axis`` (negative counts from the end) is the batch axis of the bottom."""
    return axis in (0, -_rank(layer, graph))


def _inner_product(layer: Layer, graph: LayerGraph, setup_batch: int, batch: int) -> Optional[str]:
    """inner_product_layer.cpp: with axis 0 the weights span the batch axis (K = count(0))."""
    if _axis_zero(layer.param.inner_product_param.axis, layer, graph):
        return "has weights that span the batch axis (axis: 0)"
    return None


def _scale_or_bias(layer: Layer, graph: LayerGraph, setup_batch: int, batch: int) -> Optional[str]:
    """scale_layer.cpp / bias_layer.cpp: a learned parameter from axis 0 has the batch size
    in its shape (a scalar, num_axes 0, does not)."""
    p = layer.param.scale_param if layer.type == "Scale" else layer.param.bias_param
    if len(layer.bottoms) == 1 and _axis_zero(p.axis, layer, graph) and p.num_axes != 0:
        return "has a learned parameter that spans the batch axis (axis: 0)"
    return None


def _recurrent(layer: Layer, graph: LayerGraph, setup_batch: int, batch: int) -> Optional[str]:
    """recurrent_layer.cpp: axis 0 is the number of time steps, checked against set-up."""
    return "fixes its number of time steps (axis 0) at set-up"


def _lstm_unit(layer: Layer, graph: LayerGraph, setup_batch: int, batch: int) -> Optional[str]:
    """lstm_unit_layer.cpp: axis 0 is one time step and must be 1."""
    return "takes exactly one time step on axis 0"


def _normalize(layer: Layer, graph: LayerGraph, setup_batch: int, batch: int) -> Optional[str]:
    """normalize_layer.cpp: with across_spatial its per-item norm buffer keeps the set-up
    batch, and Forward writes one entry per item past it at a larger batch."""
    if layer.param.norm_param.across_spatial and batch > setup_batch:
        return "sizes its across_spatial norm buffer at set-up (writes past it at a larger batch)"
    return None


FIXED_AT_SETUP: dict[str, Rule] = {
    "Unsqueeze": _unsqueeze,
    "Reshape": _reshape,
    "InnerProduct": _inner_product,
    "Scale": _scale_or_bias,
    "Bias": _scale_or_bias,
    "LSTM": _recurrent,
    "RNN": _recurrent,
    "LSTMUnit": _lstm_unit,
    "Normalize": _normalize,
}


#: Types whose rule is about the arithmetic itself (a Reshape writing the batch, weights
#: spanning it), not a Caffe buffer kept from set-up: their ONNX lowerings are tied to the
#: set-up batch too, so every engine must refuse other batches (OpenVINO ran such a Reshape
#: and dropped the extra images). Unsqueeze and Normalize, lowered, run at any batch.
BATCH_ARITHMETIC = frozenset({"Reshape", "InnerProduct", "Scale", "Bias"})


def batch_blocker(graph: LayerGraph, layers: Iterable[Layer], setup_batch: int,
                  batch: int) -> Optional[tuple[Layer, str]]:
    """The first of ``layers`` that keeps a Caffe net set up at ``setup_batch`` from running
    at ``batch``, with why; None when the net can run there."""
    if batch == setup_batch:
        return None
    for layer in layers:
        rule = FIXED_AT_SETUP.get(layer.type)
        why = rule(layer, graph, setup_batch, batch) if rule else None
        if why:
            return layer, why
    return None


def check_caffe_batch(graph: LayerGraph, layers: Iterable[Layer], setup_batch: int, batch: int) -> None:
    """Raise InputError (one line naming the layer and the way out) when a Caffe net of
    ``layers`` (of ``graph``), set up at ``setup_batch``, cannot run at ``batch``."""
    blocker = batch_blocker(graph, layers, setup_batch, batch)
    if blocker is None:
        return
    layer, why = blocker
    shapes = " ".join(f"--input-shape {graph.values[v].blob}={'x'.join(map(str, (batch, *graph.values[v].shape[1:])))}"
                      for v in graph.inputs)
    raise InputError(f"run at batch {batch}: layer '{layer.name}' ({layer.type}) {why}, so Caffe can only "
                     f"run it at batch {setup_batch}; set the batch at load ({shapes}, or "
                     f"input_shapes= in hybrid_infer.load) or feed batch {setup_batch}")


def check_feed_batch(graph: LayerGraph, layers: Iterable[Layer], feed_shapes: Mapping[str, Sequence[int]]) -> None:
    """``check_caffe_batch`` for a Caffe net whose inputs are the values ``feed_shapes`` names
    (value id -> shape fed), set up at their shapes in ``graph``: the batch is the first
    axis 0 fed that differs from its set-up size."""
    for value, shape in feed_shapes.items():
        setup = graph.values[value].shape
        if len(shape) and len(setup) and shape[0] != setup[0]:
            check_caffe_batch(graph, layers, setup[0], int(shape[0]))
            return
