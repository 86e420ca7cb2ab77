"""Drop the training leftovers of deploy nets: layers only training uses, fed by nothing.

Public deploy prototxts often keep an ``Accuracy`` or a loss layer that reads a ``label``
blob which only the training net's data layer produced; Caffe itself refuses such a net
("Unknown bottom blob"). Those layers compute nothing inference needs, so they are
removed (with their tops, and with later training-only layers that read those tops)
before anything else sees the net: the layer graph and every Caffe net generated from
it, the reference net included. Any other layer reading a blob nothing produces stays
an error (``caffe_model._check_layers`` names the layer and the blob).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("hybrid_infer")


@dataclass(frozen=True)
class DroppedLayer:
    """A training-only layer removed from the net, and the input it could not get."""
    name: str
    type: str
    missing_blob: str
    tops: tuple[str, ...]

    @property
    def reason(self) -> str:
        return f"{self.type} reads '{self.missing_blob}', which nothing produces at inference"


def is_training_only(layer_type: str) -> bool:
    """Accuracy, Silence and every loss layer (Caffe names them all ``*Loss``: SoftmaxWithLoss,
    EuclideanLoss, MultiBoxLoss, ... including those of other forks)."""
    return layer_type in ("Accuracy", "Silence") or layer_type.endswith("Loss")


def drop_training_leftovers(net: Any, source: str) -> list[DroppedLayer]:
    """Remove from ``net`` (a normalised caffe_pb2.NetParameter, changed in place) the
    training-only layers with an input no earlier layer produces; warn once, naming them."""
    produced: set[str] = set()
    dropped: list[DroppedLayer] = []
    positions: list[int] = []
    for index, layer in enumerate(net.layer):
        missing = [b for b in layer.bottom if b not in produced]
        if missing and is_training_only(layer.type):
            dropped.append(DroppedLayer(layer.name, layer.type, missing[0], tuple(layer.top)))
            positions.append(index)
        else:
            produced.update(layer.top)
    for index in reversed(positions):
        del net.layer[index]
    if dropped:
        log.warning("%s: dropped training-only layer(s) %s: %s", source,
                    ", ".join(f"'{d.name}'" for d in dropped), "; ".join(d.reason for d in dropped))
    return dropped
