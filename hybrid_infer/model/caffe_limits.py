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
"""
from __future__ import annotations

from typing import Iterable

from ..errors import ModelError
from .protofile import LayerParameter, NetParameter


def check_set_up_net(net: NetParameter, source: str) -> None:
    """Refuse data layers that need a program to feed them, and inputs without a shape."""
    for layer in net.layer:
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


def refuse_cpu_unsupported(layers: Iterable[LayerParameter], where: str) -> None:
    """Raise ``ModelError`` if Caffe's CPU code would abort at forward on one of ``layers``."""
    for layer in layers:
        if layer.type == "Pooling" and layer.pooling_param.pool == layer.pooling_param.STOCHASTIC:
            raise ModelError(
                f"{where}: layer '{layer.name}' (Pooling, pool: STOCHASTIC) cannot run on the CPU: Caffe "
                "implements stochastic pooling only on the GPU (pooling_layer.cpp). Run the Caffe "
                "segments on a GPU (--device N) or use pool: AVE or MAX")
