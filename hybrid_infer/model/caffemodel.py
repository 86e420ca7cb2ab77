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

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from ..errors import ModelError
from ..files import open_regular_file

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
_SOLVER_ITER, _SOLVER_LEARNED_NET = 1, 2
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
    """A layer of the caffemodel: its name, its blobs, and where it starts and ends in the
    file (byte offsets; ``end`` is one past its last byte)."""
    name: str
    blobs: list[StoredBlob]
    offset: int
    end: int


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


def _packed(buf: mmap.mmap, start: int, stop: int, dtype: str, item: int) -> np.ndarray:
    """The values of one packed chunk of a repeated fixed-size field (copied: no view may
    outlive the memory map)."""
    if (stop - start) % item:
        raise _Damaged(start, f"packed values of {item} bytes in a field of {stop - start} bytes")
    return np.frombuffer(buf, dtype, count=(stop - start) // item, offset=start).copy()


def _unpacked_run(buf: mmap.mmap, pos: int, stop: int, dtype: str, item: int) -> tuple[np.ndarray, int]:
    """Values stored unpacked (one key byte before each value, valid protobuf) from ``pos``
    on, for as long as the key byte repeats: (a copy of the values, position after them).

    Read as one strided array, not field by field: a float per field would otherwise cost a
    Python tuple each (a 5 MB blob took 650 MiB and seconds)."""
    records = np.frombuffer(buf, np.dtype([("key", "u1"), ("value", dtype)]),
                            count=(stop - pos) // (item + 1), offset=pos)
    keys = records["key"] == buf[pos]
    run = len(keys) if keys.all() else int(np.argmin(keys))
    return records["value"][:run].copy(), pos + run * (item + 1)


def _signed(dim: int) -> int:
    """A BlobShape dim as the int64 it is (a varint holds negative ones in two's complement)."""
    return dim - (1 << 64) if dim >= 1 << 63 else dim


def _float32(parts: list[np.ndarray]) -> np.ndarray:
    """``parts`` joined into one float32 array (a single float32 part as it is)."""
    if not parts:
        return np.zeros(0, np.float32)
    return parts[0].astype(np.float32, copy=False) if len(parts) == 1 else \
        np.concatenate(parts).astype(np.float32, copy=False)


def _blob(buf: mmap.mmap, start: int, stop: int) -> StoredBlob:
    legacy: dict[int, int] = {}
    shape: list[int] = []
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    pos = start
    while pos < stop:
        number, wire, a, b, after = _field(buf, pos, stop)
        if (number, wire) in ((_BLOB_DATA, _FIXED32), (_BLOB_DOUBLE_DATA, _FIXED64)) and a == pos + 1:
            part, after = _unpacked_run(buf, pos, stop, "<f4" if wire == _FIXED32 else "<f8", b - a)
            (floats if number == _BLOB_DATA else doubles).append(part)
        elif number == _BLOB_DATA and wire in (_LENGTH, _FIXED32):
            floats.append(_packed(buf, a, b, "<f4", 4))
        elif number == _BLOB_DOUBLE_DATA and wire in (_LENGTH, _FIXED64):
            doubles.append(_packed(buf, a, b, "<f8", 8))
        elif number in _BLOB_LEGACY and wire == _VARINT:
            legacy[number] = _signed(a)
        elif number == _BLOB_SHAPE and wire == _LENGTH:
            for n, w, x, y in _fields(buf, a, b):
                if n == _SHAPE_DIM and w == _VARINT:
                    shape.append(_signed(x))
                elif n == _SHAPE_DIM and w == _LENGTH:
                    inner = x
                    while inner < y:
                        dim, inner = _varint(buf, inner, y)
                        shape.append(_signed(dim))
        elif wire == _GROUP_END:
            raise _Damaged(a, f"an end of group {number} that no group started")
        pos = after
    # Blob::FromProto prefers double_data when it holds values.
    data = _float32(doubles or floats)
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
    return StoredLayer(name, blobs, start, stop)


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 text (a byte-order mark, comments in any language) with something besides
    white space in it: no caffemodel starts like that (its first byte is a field key, and
    a lone newline is the start of a cut-off ``name`` field)."""
    head = head.removeprefix(b"\xef\xbb\xbf")
    for cut in range(4):  # the last character may be cut in the middle
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return any(not c.isspace() for c in text) and all(c.isprintable() or c in "\t\r\n" for c in text)
    return False


def _solver_state(buf: mmap.mmap, size: int) -> str | None:
    """What a Caffe solver snapshot (``SolverState``: ``iter = 1``, ``learned_net = 2``,
    ``history = 3``; src/caffe/proto/caffe.proto) says about itself, or None if this is no
    such file. A NetParameter never starts with a varint field 1 (its ``name`` is a string)."""
    try:
        fields = _fields(buf, 0, size)
        first, second = next(fields), next(fields)
    except (_Damaged, StopIteration):
        return None
    if first[:2] != (_SOLVER_ITER, _VARINT) or second[:2] != (_SOLVER_LEARNED_NET, _LENGTH):
        return None
    return f"iteration {first[2]}, its weights saved as '{_text(buf, second[2], second[3])}'"


def read_caffemodel(path: str | os.PathLike[str]) -> list[StoredLayer]:
    """The layers of a caffemodel (current, V1 or V0 format) in file order.

    Raises ModelError naming the file when it is missing, empty, not a binary protobuf
    (with the byte offset where the encoding breaks), truncated (with the offset at which
    it ends and the layer left incomplete), or holds no layers.
    """
    p = Path(path)
    with open_regular_file(p, "caffemodel", ModelError) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ModelError(f"{p}: the file is empty; pass the trained .caffemodel")
        return _read_layers(p, f, size)


def _read_layers(p: Path, f: BinaryIO, size: int) -> list[StoredLayer]:
    layers: list[StoredLayer] = []
    layer_fields: set[int] = set()
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if _looks_like_text(buf[:256]):
            raise ModelError(f"{p}: a text file, not a binary .caffemodel (is it a prototxt?)")
        state = _solver_state(buf, size)
        if state is not None:
            raise ModelError(f"{p}: a Caffe solver state (.solverstate: {state}), not weights; pass the "
                             ".caffemodel written with it")
        if buf[:8] == _HDF5_SIGNATURE:
            raise ModelError(f"{p}: HDF5 weights, which hybrid_infer does not read; save them as a .caffemodel "
                             "with pycaffe (caffe.Net(prototxt, caffe.TEST, weights=FILE).save(OUT))")
        try:
            for number, wire, a, b in _fields(buf, 0, size):
                if wire == _LENGTH and number == _NET_LAYER:
                    layers.append(_layer(buf, a, b, _LAYER_NAME, _LAYER_BLOBS))
                elif wire == _LENGTH and number == _NET_V1_LAYERS:
                    layers.append(_layer(buf, a, b, _V1_NAME, _V1_BLOBS))
                else:
                    continue
                layer_fields.add(number)
        except _Damaged as exc:
            raise _damage_error(p, size, exc, layers) from None
        except RecursionError:
            raise ModelError(f"{p}: not a valid binary .caffemodel: groups nested too deeply") from None
    if not any(layer.name for layer in layers):
        raise ModelError(f"{p}: holds no named layers: not a Caffe model (.caffemodel)")
    if layer_fields == {_NET_LAYER, _NET_V1_LAYERS}:
        raise ModelError(f"{p}: holds both 'layer' (current) and 'layers' (V1) entries, which Caffe refuses "
                         "(UpgradeV1Net: \"Refusing to upgrade inconsistent NetParameter input\"); save the "
                         "weights again with one Caffe")
    return layers


def _damage_error(path: Path, size: int, exc: _Damaged, layers: list[StoredLayer]) -> ModelError:
    after = f"after {len(layers)} complete layer(s), the last '{layers[-1].name}'" if layers else \
        "before any complete layer"
    if exc.truncated:
        return ModelError(f"{path}: truncated: the file ends at byte {size}, inside a field that starts at "
                          f"byte {exc.offset} ({after}); download or copy it again")
    return ModelError(f"{path}: not a valid binary .caffemodel: the protobuf encoding breaks at byte "
                      f"{exc.offset} ({exc}; {after})")
