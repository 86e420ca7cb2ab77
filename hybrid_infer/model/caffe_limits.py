"""What Caffe would abort on after the net is set up, found before Caffe is asked.

Setting a net up is rehearsed in a forked child (``isolated.py``), and so is each net's
first forward at each input shape; that turns any abort into an error, but with Caffe's
terse message. The cases below are known in advance, so they are refused with a message
that says what to change instead:

- ``MemoryData`` layers set up fine and abort at the first forward unless a program fed
  them through ``MemoryDataLayer::Reset`` (memory_data_layer.cpp): deploy nets take
  their inputs through ``Input`` layers.
- An ``Input`` layer without a shape (or with a dimension below 1) gives a blob of no
  size, which Caffe accepts and every layer after it misreads.
- ``Pooling`` with ``pool: STOCHASTIC`` has no CPU implementation in Caffe
  (pooling_layer.cpp: ``NOT_IMPLEMENTED`` in ``Forward_cpu``); its GPU code runs.

Layers that fix the batch at set-up (a ``Reshape`` writing the batch axis, ...) are refused
at another batch by ``engines/caffe_batch.py``.

Also refused, because Caffe would compute something other than what the prototxt says
(and the hybrid, computing what it says, would then disagree with Caffe):

- A layer computing in place (top i named as bottom i) whose Caffe forward is not written
  for it (``check_in_place``): Convolution with a 1x1 kernel reads its input while writing
  the output over it, Pooling and cross-channel LRN read neighbours already overwritten,
  Reshape, Flatten, Pad, Split and AbsVal refuse outright.
- ``phase: TRAIN`` on a Dropout layer: the layer's own ``phase`` overrides the net's
  (layer.hpp: ``phase_ = param.phase()``; net.cpp gives the net's phase only to layers
  without one), and a training Dropout zeroes random units at every forward.
- Bottoms of an Eltwise, or a Scale's second bottom, whose shapes do not fit: this fork
  of Caffe has those checks commented out (eltwise_layer.cpp, scale_layer.cpp) and reads
  past the smaller blob (``check_operand_shapes``).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

from ..errors import ModelError
from .caffe_import import caffe_pb2
from .protofile import LayerParameter, NetParameter

#: Layer types whose forward gives the same result in place as into a new top: Caffe's
#: NeuronLayer subclasses (element-wise; AbsVal excepted, which refuses), and the layers
#: that copy or read each position before writing it (scale_layer.cpp, bias_layer.cpp,
#: batch_norm_layer.cpp, softmax_layer.cpp, mvn_layer.cpp, normalize_layer.cpp). Python
#: layers are the user's code, run as written.
IN_PLACE_TYPES = frozenset({
    "BNLL", "Dropout", "ELU", "Exp", "HardSigmoid", "HardSwish", "Log", "Power", "PReLU", "ReLU", "ReLU6",
    "Sigmoid", "TanH", "Threshold",
    "Scale", "Bias", "BatchNorm", "BatchNormKyle", "Softmax", "MVN", "Normalize", "Python",
})


def check_set_up_net(net: NetParameter, source: str) -> None:
    """Refuse data layers that need a program to feed them, inputs without a shape, and
    training-phase Dropout."""
    for layer in net.layer:
        if layer.type == "Dropout" and _trains(layer):
            raise ModelError(
                f"{source}: layer '{layer.name}' (Dropout) has phase: TRAIN, so Caffe zeroes random units at "
                "every forward (dropout_layer.cpp), as in training, and no two runs agree; remove its "
                "'phase: TRAIN' (at inference Dropout passes its input through)")
        if layer.type == "MemoryData":
            p = layer.memory_data_param
            raise ModelError(
                f"{source}: layer '{layer.name}' (MemoryData) reads its data from memory that only a "
                "C++ or Python program can hand it (MemoryDataLayer::Reset); Caffe aborts at the first "
                f"forward without it. Replace it with an Input layer: layer {{ name: \"{layer.name}\" "
                f"type: \"Input\" top: \"{layer.top[0] if layer.top else 'data'}\" input_param {{ shape {{ "
                f"dim: {p.batch_size} dim: {p.channels} dim: {p.height} dim: {p.width} }} }} }}")
        if layer.type == "Input":
            _check_input_shapes(layer, source)


def _check_input_shapes(layer: LayerParameter, source: str) -> None:
    shapes = list(layer.input_param.shape)
    for index, top in enumerate(layer.top):
        shape = shapes[index] if len(shapes) > 1 and index < len(shapes) else (shapes[0] if shapes else None)
        dims = [int(d) for d in shape.dim] if shape is not None else []
        if not dims:
            raise ModelError(f"{source}: Input layer '{layer.name}' gives no shape for '{top}'; add "
                             "input_param { shape { dim: N dim: C dim: H dim: W } } or pass "
                             f"--input-shape {top}=NxCxHxW")
        if min(dims) < 1:
            raise ModelError(f"{source}: Input layer '{layer.name}' gives '{top}' the shape {tuple(dims)}; "
                             "every dimension must be 1 or more (set it with --input-shape)")


#: Layer types whose forward aborts (a fatal CHECK) on some input *values*, at a shape that
#: ran before: BatchReindex on an index outside [0, N) (batch_reindex_layer.cpp), MaxUnPool
#: on a mask position outside its top (maxunpool_layer.cpp), Filter selecting no item (an
#: empty top, which the layers after it may refuse).
VALUE_CHECKED_TYPES = frozenset({"BatchReindex", "MaxUnPool", "Filter"})


def aborts_on_values(layers: Iterable[LayerParameter]) -> bool:
    """Whether a Caffe net of ``layers`` must be rehearsed at every run, not only at each new
    input shape (``isolated.Rehearsal``): one of them can abort on the values it is fed."""
    return any(layer.type in VALUE_CHECKED_TYPES for layer in layers)


def refuse_cpu_unsupported(layers: Iterable[LayerParameter], where: str) -> None:
    """Raise ``ModelError`` if Caffe's CPU code would abort at forward on one of ``layers``."""
    for layer in layers:
        if layer.type == "Pooling" and layer.pooling_param.pool == layer.pooling_param.STOCHASTIC:
            raise ModelError(
                f"{where}: layer '{layer.name}' (Pooling, pool: STOCHASTIC) cannot run on the CPU: Caffe "
                "implements stochastic pooling only on the GPU (pooling_layer.cpp). Run the Caffe "
                "segments on a GPU (--device N) or use pool: AVE or MAX")


def _trains(layer: LayerParameter) -> bool:
    """Whether the layer's own ``phase`` is TRAIN (it then overrides the net's TEST)."""
    return layer.HasField("phase") and layer.phase == caffe_pb2().TRAIN


def training_phase(layer: LayerParameter) -> Optional[str]:
    """Why a layer with its own ``phase: TRAIN`` computes other values than at inference
    (it must then run in Caffe, which honours the phase), or None."""
    if not _trains(layer):
        return None
    if layer.type in ("BatchNorm", "BatchNormKyle") and not layer.batch_norm_param.HasField("use_global_stats"):
        return (f"{layer.type} with phase: TRAIN normalises by the statistics of the batch, as in training "
                "(batch_norm_layer.cpp: use_global_stats defaults to phase == TEST)")
    return None


def check_in_place(layer: LayerParameter, top: str, source: str) -> None:
    """Raise ``ModelError`` if ``layer`` writes ``top`` over its own bottom and Caffe's
    forward of its type does not compute the same in place (see ``IN_PLACE_TYPES``)."""
    if layer.type in IN_PLACE_TYPES:
        return
    if layer.type == "LRN" and layer.lrn_param.norm_region == layer.lrn_param.WITHIN_CHANNEL:
        return  # lrn_layer.cpp composes it from internal layers that each copy first
    raise ModelError(
        f"{source}: layer '{layer.name}' ({layer.type}) computes in place (its top '{top}' is its bottom), "
        f"which Caffe's {layer.type} does not do correctly: its forward overwrites input it still reads, or "
        f"refuses; give the layer a new top (e.g. top: \"{top}_{layer.name}\") and let the layers after it "
        "read that")


def _canonical_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def check_operand_shapes(net: NetParameter, shapes: Mapping[str, Sequence[int]], source: str) -> None:
    """Refuse an Eltwise whose bottoms differ in shape, and a Scale whose second bottom does
    not equal its first bottom's shape from ``axis`` on (``shapes``: blob -> shape after
    set-up). BVLC Caffe checks both; this fork has the checks commented out and reads past
    the smaller blob, while ONNX broadcasts or fails: neither is what the prototxt says."""
    for layer in net.layer:
        bottoms = [tuple(shapes[b]) for b in layer.bottom]
        if layer.type == "Eltwise":
            for name, shape in zip(layer.bottom[1:], bottoms[1:]):
                if shape != bottoms[0]:
                    raise ModelError(
                        f"{source}: layer '{layer.name}' (Eltwise) combines '{layer.bottom[0]}' of shape "
                        f"{bottoms[0]} with '{name}' of shape {shape}; Eltwise needs bottoms of one shape (this "
                        "Caffe's check is commented out and it would read past the smaller one): fix the shapes")
        elif layer.type == "Scale" and len(bottoms) > 1 and len(bottoms[1]):
            axis = _canonical_axis(layer.scale_param.axis, len(bottoms[0]))
            covered = bottoms[0][axis:axis + len(bottoms[1])]
            if covered != bottoms[1]:
                raise ModelError(
                    f"{source}: layer '{layer.name}' (Scale) multiplies '{layer.bottom[0]}' of shape {bottoms[0]} "
                    f"by '{layer.bottom[1]}' of shape {bottoms[1]}, which must equal the first bottom's shape "
                    f"from axis {layer.scale_param.axis} on, {covered} (this Caffe's check is commented out and it "
                    "would read past the second bottom): fix the shape or the axis")
