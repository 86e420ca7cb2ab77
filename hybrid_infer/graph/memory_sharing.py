"""Which Caffe layers make a top share its bottom's memory (``top->ShareData(*bottom)``).

Caffe saves copies by pointing some tops at their bottom's memory (``Blob::ShareData``,
src/caffe/blob.cpp). Those blobs are one tensor under several names and shapes: an
in-place layer that later rewrites any of them changes what every other reader of that
memory sees from then on. The layers that do it (``grep ShareData src/caffe/layers``):

- Split: every top (split_layer.cpp, in Forward); also the Splits Caffe inserts itself
  for a blob with several readers (util/insert_splits.cpp), which is why a blob's later
  readers see an in-place rewrite made through one of its views;
- Reshape and Flatten: the top (reshape_layer.cpp, flatten_layer.cpp);
- Slice with a single top and Concat with a single bottom (slice_layer.cpp, concat_layer.cpp);
- Permute whose order keeps every axis in place (permute_layer.cpp: ``need_permute_`` false).

Not modelled: Parameter's top shares the layer's own parameter blob (an in-place layer on
it would change the weights for every later forward pass), and Python layers may share
memory in ways their code alone knows.
"""
from __future__ import annotations

from typing import Any


def _identity_permute(param: Any) -> bool:
    """PermuteLayer::LayerSetUp appends the axes ``order`` leaves out in ascending order, so
    the permutation is the identity exactly when ``order`` starts 0, 1, 2, ..."""
    return list(param.permute_param.order) == list(range(len(param.permute_param.order)))


def sharing_tops(param: Any) -> list[int]:
    """Indices of the tops of layer ``param`` (a caffe_pb2.LayerParameter) that share memory
    with its first bottom after it has run; empty for layers that compute new memory."""
    kind = param.type
    if kind == "Split":
        return list(range(len(param.top)))
    if kind in ("Reshape", "Flatten") or (kind == "Slice" and len(param.top) == 1) \
            or (kind == "Concat" and len(param.bottom) == 1) or (kind == "Permute" and _identity_permute(param)):
        return [0] if len(param.top) and len(param.bottom) else []
    return []
