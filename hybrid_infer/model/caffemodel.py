"""Read the trained weights of a .caffemodel: each layer's name and parameter blobs, nothing else.

Caffe forks reuse field numbers for different parameter messages (a darknet-to-Caffe
fork stores ``upsample_param`` under the number this Caffe gives ``psroi_pooling_param``),
so parsing a caffemodel with the user's ``caffe_pb2``, or with Caffe's C++ reader, can
refuse a file whose weights are intact. Weights only need a layer's name and blobs, whose
field numbers every fork keeps (``src/caffe/proto/caffe.proto``):

- ``NetParameter.layer = 100`` (``LayerParameter``: ``name = 1``, ``blobs = 7``),
- ``NetParameter.layers = 2`` (the old ``V1LayerParameter``: ``name = 4``, ``blobs = 6``;
  even older files nest a ``V0LayerParameter`` as its field 1: ``name = 1``, ``blobs = 50``),
- ``BlobProto``: ``data = 5`` (packed float), ``double_data = 8`` (packed double),
  ``shape = 7`` (``BlobShape.dim = 1``, packed int64) or the legacy ``num``, ``channels``,
  ``height``, ``width`` (1-4).

So this module walks the protobuf wire format itself and skips every other field, whatever
its type. Walking it directly also gives byte offsets for damaged files, and lets the file
be memory-mapped: each blob's values are copied once, straight into their array, so a
2 GB caffemodel needs about 2 GB for its weights and no second copy of the file (Python's
protobuf parser holds the parsed message and then a copy of each field).
"""
from __future__ import annotations

import difflib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from ..errors import ModelError

Shape = tuple[int, ...]

# Wire types of the protobuf encoding.
_VARINT, _FIXED64, _LENGTH, _GROUP_START, _GROUP_END, _FIXED32 = 0, 1, 2, 3, 4, 5

_NET_LAYER, _NET_V1_LAYERS = 100, 2
_LAYER_NAME, _LAYER_BLOBS = 1, 7
_V1_V0, _V1_NAME, _V1_BLOBS = 1, 4, 6
_V0_NAME, _V0_BLOBS = 1, 50
_BLOB_LEGACY = (1, 2, 3, 4)  # num, channels, height, width
_BLOB_DATA, _BLOB_SHAPE, _BLOB_DOUBLE_DATA = 5, 7, 8
_SHAPE_DIM = 1
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # Caffe also accepts .h5 weights (Net::CopyTrainedLayersFromHDF5)


@dataclass(frozen=True)
class StoredBlob:
    """One parameter blob as the caffemodel stores it: FP32 values, flat.

    ``shape`` is the blob's ``shape`` field; ``legacy_shape`` the deprecated
    (num, channels, height, width) when the file uses those instead (None otherwise).
    """
    shape: Shape
    legacy_shape: Shape | None
    data: np.ndarray

    def fits(self, target: Shape) -> bool:
        """Caffe's ``Blob::ShapeEquals`` (src/caffe/blob.cpp): legacy 4-D shapes are
        compared with the target's axes counted from the end, padded with 1s."""
        if self.legacy_shape is not None:
            return len(target) <= 4 and (1,) * (4 - len(target)) + tuple(target) == self.legacy_shape
        return tuple(target) == self.shape

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.legacy_shape if self.legacy_shape is not None else self.shape)) or "()"


@dataclass(frozen=True)
class StoredLayer:
    """A layer of the caffemodel: its name, its blobs, and where it starts in the file."""
    name: str
    blobs: list[StoredBlob]
    offset: int


class _Damaged(Exception):
    """The wire format breaks at ``offset``; ``truncated`` when it runs past the file's end."""

    def __init__(self, offset: int, what: str, truncated: bool = False):
        super().__init__(what)
        self.offset = offset
        self.truncated = truncated


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    """A base-128 varint at ``pos``: (value, position after it)."""
    value = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _Damaged(start, "a number runs past the end of its message", truncated=end == len(buf))
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise _Damaged(start, "a number longer than 10 bytes")


def _field(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int, int, int, int]:
    """The field at ``pos`` of a message ending at ``end``: (number, wire type, start, stop,
    position after it).

    For a length-delimited field, ``start:stop`` is its payload; for a varint, ``start`` is
    its value; fixed-size fields and groups give their bytes' span.
    """
    field_start = pos
    key, pos = _varint(buf, pos, end)
    number, wire = key >> 3, key & 7
    if number == 0:
        raise _Damaged(field_start, "field number 0")
    if wire == _VARINT:
        value, pos = _varint(buf, pos, end)
        return number, wire, value, pos, pos
    if wire == _LENGTH:
        size, pos = _varint(buf, pos, end)
    elif wire in (_FIXED64, _FIXED32):
        size = 8 if wire == _FIXED64 else 4
    elif wire == _GROUP_START:  # deprecated proto2 groups: skip to the matching end
        inner = pos
        while True:
            if inner >= end:
                raise _Damaged(field_start, f"group {number} has no end", truncated=end == len(buf))
            n, w, _, _, after = _field(buf, inner, end)
            if w == _GROUP_END:
                if n != number:
                    raise _Damaged(inner, f"group {number} ends as group {n}")
                return number, wire, pos, inner, after
            inner = after
    elif wire == _GROUP_END:
        return number, wire, pos, pos, pos
    else:
        raise _Damaged(field_start, f"wire type {wire}, which protobuf does not have")
    if pos + size > end:
        raise _Damaged(field_start, f"a field of {size} bytes runs past the end of its message",
                       truncated=end == len(buf))
    return number, wire, pos, pos + size, pos + size


def _fields(buf: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Every field of the message in ``buf[pos:end]``: (number, wire type, start, stop)."""
    while pos < end:
        number, wire, start, stop, pos = _field(buf, pos, end)
        if wire == _GROUP_END:
            raise _Damaged(start, f"an end of group {number} that no group started")
        yield number, wire, start, stop


def _packed(buf: mmap.mmap, spans: list[tuple[int, int]], dtype: str, item: int) -> np.ndarray:
    """Values of a repeated fixed-size field: packed chunks and single values, in order."""
    for start, stop in spans:
        if (stop - start) % item:
            raise _Damaged(start, f"packed values of {item} bytes in a field of {stop - start} bytes")
    parts = [np.frombuffer(buf, dtype, count=(stop - start) // item, offset=start) for start, stop in spans]
    return np.concatenate(parts) if len(parts) != 1 else parts[0].copy()


def _blob(buf: mmap.mmap, start: int, stop: int) -> StoredBlob:
    legacy: dict[int, int] = {}
    shape: list[int] = []
    floats: list[tuple[int, int]] = []
    doubles: list[tuple[int, int]] = []
    for number, wire, a, b in _fields(buf, start, stop):
        if number in _BLOB_LEGACY and wire == _VARINT:
            legacy[number] = a
        elif number == _BLOB_SHAPE and wire == _LENGTH:
            for n, w, x, y in _fields(buf, a, b):
                if n == _SHAPE_DIM and w == _VARINT:
                    shape.append(x)
                elif n == _SHAPE_DIM and w == _LENGTH:
                    pos = x
                    while pos < y:
                        dim, pos = _varint(buf, pos, y)
                        shape.append(dim)
        elif number == _BLOB_DATA and wire in (_LENGTH, _FIXED32):
            floats.append((a, b))
        elif number == _BLOB_DOUBLE_DATA and wire in (_LENGTH, _FIXED64):
            doubles.append((a, b))
    if doubles:  # Blob::FromProto prefers double_data when it holds values
        data = _packed(buf, doubles, "<f8", 8).astype(np.float32)
    elif floats:
        data = _packed(buf, floats, "<f4", 4)
    else:
        data = np.zeros(0, np.float32)
    legacy_shape = tuple(legacy.get(n, 0) for n in _BLOB_LEGACY) if legacy else None
    return StoredBlob(tuple(shape), legacy_shape, data)


def _text(buf: mmap.mmap, start: int, stop: int) -> str:
    return buf[start:stop].decode("utf-8", errors="replace")


def _layer(buf: mmap.mmap, start: int, stop: int, name_field: int, blobs_field: int) -> StoredLayer:
    name = ""
    blobs: list[StoredBlob] = []
    for number, wire, a, b in _fields(buf, start, stop):
        if wire != _LENGTH:
            continue
        if number == name_field:
            name = _text(buf, a, b)
        elif number == blobs_field:
            blobs.append(_blob(buf, a, b))
        elif name_field == _V1_NAME and number == _V1_V0:
            old = _layer(buf, a, b, _V0_NAME, _V0_BLOBS)  # a V0 layer wrapped in a V1 one
            name, blobs = name or old.name, blobs or old.blobs
    return StoredLayer(name, blobs, start)


def _looks_like_text(head: bytes) -> bool:
    return bool(head) and all(32 <= c < 127 or c in b"\t\r\n" for c in head)


def read_caffemodel(path: str | os.PathLike[str]) -> list[StoredLayer]:
    """The layers of a caffemodel (current, V1 or V0 format) in file order.

    Raises ModelError naming the file when it is missing, empty, not a binary protobuf
    (with the byte offset where the encoding breaks), truncated (with the offset at which
    it ends and the layer left incomplete), or holds no layers.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"caffemodel '{p}' does not exist or is not a file")
    size = p.stat().st_size
    if size == 0:
        raise ModelError(f"{p}: the file is empty; pass the trained .caffemodel")
    layers: list[StoredLayer] = []
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if _looks_like_text(buf[:256]):
            raise ModelError(f"{p}: a text file, not a binary .caffemodel (is it a prototxt?)")
        if buf[:8] == _HDF5_SIGNATURE:
            raise ModelError(f"{p}: HDF5 weights, which hybrid_infer does not read; save them as a .caffemodel "
                             "with pycaffe (caffe.Net(prototxt, caffe.TEST, weights=FILE).save(OUT))")
        try:
            for number, wire, a, b in _fields(buf, 0, size):
                if wire == _LENGTH and number == _NET_LAYER:
                    layers.append(_layer(buf, a, b, _LAYER_NAME, _LAYER_BLOBS))
                elif wire == _LENGTH and number == _NET_V1_LAYERS:
                    layers.append(_layer(buf, a, b, _V1_NAME, _V1_BLOBS))
        except _Damaged as exc:
            raise _damage_error(p, size, exc, layers) from None
        except RecursionError:
            raise ModelError(f"{p}: not a valid binary .caffemodel: groups nested too deeply") from None
    if not any(layer.name for layer in layers):
        raise ModelError(f"{p}: holds no named layers: not a Caffe model (.caffemodel)")
    return layers


def _damage_error(path: Path, size: int, exc: _Damaged, layers: list[StoredLayer]) -> ModelError:
    after = f"after {len(layers)} complete layer(s), the last '{layers[-1].name}'" if layers else \
        "before any complete layer"
    if exc.truncated:
        return ModelError(f"{path}: truncated: the file ends at byte {size}, inside a field that starts at "
                          f"byte {exc.offset} ({after}); download or copy it again")
    return ModelError(f"{path}: not a valid binary .caffemodel: the protobuf encoding breaks at byte "
                      f"{exc.offset} ({exc}; {after})")


def fit_weights(stored: list[StoredLayer], param_shapes: Mapping[str, list[Shape]],
                repeats: Mapping[str, str], weights_file: Path, prototxt: Path) -> dict[str, list[np.ndarray]]:
    """Parameter arrays for every layer of ``param_shapes`` (layer name -> blob shapes
    that Caffe set up from the prototxt), taken from ``stored`` by layer name.

    As Caffe's ``Net::CopyTrainedLayersFrom`` (src/caffe/net.cpp): stored layers the
    prototxt lacks are ignored, a later stored layer of the same name wins, and the blob
    count and every blob's shape must fit. A layer name the prototxt repeats (renamed
    ``name#2`` by ``normalise``; ``repeats`` maps it to the name) gets the stored blobs of
    that name, checked against its own shapes. Arrays come back in the target shapes.

    Raises ModelError naming the layers without blobs in the caffemodel (with the stored
    names closest to each), or the layer, blob index and both shapes of a blob that does
    not fit.
    """
    by_name = {layer.name: layer for layer in stored}
    sources = {name: by_name.get(repeats.get(name, name)) for name in param_shapes}
    missing = [name for name, source in sources.items() if source is None or not source.blobs]
    if missing:
        with_blobs = [layer.name for layer in stored if layer.blobs]

        def closest(name: str) -> str:
            near = difflib.get_close_matches(repeats.get(name, name), with_blobs, n=3, cutoff=0.5)
            return f"{name} (closest in the caffemodel: {', '.join(near)})" if near else name
        raise ModelError(f"{weights_file} has no weights for layer(s) {'; '.join(map(closest, missing))} of "
                         f"{prototxt}; pass the caffemodel trained for this prototxt")
    weights: dict[str, list[np.ndarray]] = {}
    for name, shapes in param_shapes.items():
        source = sources[name]
        assert source is not None
        where = f"{weights_file} does not fit {prototxt}: layer '{name}'"
        if len(source.blobs) != len(shapes):
            raise ModelError(f"{where} has {len(shapes)} parameter blob(s) in the prototxt but "
                             f"{len(source.blobs)} in the caffemodel (stored layer '{source.name}')")
        arrays = []
        for index, (blob, shape) in enumerate(zip(source.blobs, shapes)):
            if not blob.fits(shape):
                raise ModelError(f"{where} blob {index}: shape mismatch: the caffemodel holds "
                                 f"{blob.shape_text}, the prototxt needs {'x'.join(map(str, shape))}")
            count = int(np.prod(shape, dtype=np.int64))
            if blob.data.size != count:
                raise ModelError(f"{weights_file}: layer '{source.name}' (at byte {source.offset}) blob {index} "
                                 f"holds {blob.data.size} values but its shape {blob.shape_text} needs {count}: "
                                 "the file is damaged")
            arrays.append(blob.data.reshape(shape))
        weights[name] = arrays
    return weights
