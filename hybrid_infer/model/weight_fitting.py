"""Give each layer of a net the parameter values Caffe would give it from a caffemodel.

This follows ``Net::CopyTrainedLayersFrom`` (src/caffe/net.cpp) on the blobs that
``caffemodel.read_caffemodel`` read:

- Stored layers are taken in file order. Each goes to the *first* layer of the net with
  its name (Caffe searches ``layer_names_`` from the start): a later layer that repeats a
  name never receives stored blobs and keeps its filler's values, and when the file
  stores a name twice, the later one wins. Stored layers the net lacks are ignored.
- For every stored layer that reaches a layer, the blob count must equal the layer's
  (also when either is 0: "Incompatible number of blobs") and every blob's shape must fit
  (``Blob::ShapeEquals``).
- Blobs shared by name (``param_sharing``) are one memory, so a write through any of
  them is seen by all, and the last write wins.

Stricter than Caffe in one way: a layer with parameters that nothing in the file reaches
is an error (Caffe would silently keep its filler's values), naming the stored layers
closest to it.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ModelError
from .caffemodel import StoredLayer
from .param_sharing import ParamRef, param_owners

Shape = tuple[int, ...]
log = logging.getLogger("hybrid_infer")


def fit_weights(stored: Sequence[StoredLayer], net: Any, param_shapes: Mapping[str, list[Shape]],
                repeats: Mapping[str, str], fillers: Mapping[str, list[np.ndarray]],
                weights_file: Path, prototxt: Path) -> dict[str, list[np.ndarray]]:
    """Parameter arrays (in the shapes Caffe set up, FP32) for every layer of ``param_shapes``
    (layer name -> blob shapes) of the normalised ``net``, from ``stored``.

    ``repeats`` maps the names ``protofile.normalise`` gave to layers repeating a name
    (``fc#2``) to that name; ``fillers`` holds the values Caffe's fillers gave those layers.
    Shared blobs come back as views of one array.

    Raises ModelError for a stored layer whose blob count or a blob's shape does not fit
    its layer (layer, both counts or shapes), a blob whose value count contradicts its own
    shape (a damaged file), and layers with parameters that no stored layer reaches (each
    with the unclaimed stored names closest to it, and a hint when the file may be cut).
    """
    types = {layer.name: layer.type for layer in net.layer}
    owners = param_owners(net, param_shapes)
    slot = lambda ref: owners.get(ref, ref)
    values: dict[ParamRef, np.ndarray] = {}
    claimed: set[str] = set()
    misfits: list[str] = []
    for source in stored:
        if source.name not in types or source.name in repeats:
            continue  # Caffe: "Ignoring source layer"
        claimed.add(source.name)
        misfit = _misfit(source, types[source.name], param_shapes.get(source.name, []), weights_file, prototxt)
        if misfit:
            misfits.append(misfit)
        else:
            values.update((slot((source.name, j)), blob.data) for j, blob in enumerate(source.blobs))
    kept_fillers: list[str] = []
    missing: list[str] = []
    for name, shapes in param_shapes.items():
        unset = [j for j in range(len(shapes)) if slot((name, j)) not in values]
        if unset and name in fillers:
            for j in unset:
                values[slot((name, j))] = fillers[name][j].reshape(-1)
            kept_fillers.append(name)
        elif unset and name not in claimed:
            missing.append(name)
    if missing:  # first: a caffemodel of another net is best shown by the layers it lacks
        raise ModelError(_missing_message(missing, stored, claimed, list(types), repeats, weights_file, prototxt))
    if misfits:
        raise ModelError(misfits[0])
    if kept_fillers:
        _warn_repeated_names(kept_fillers, repeats, fillers, prototxt)
    return {name: [values[slot((name, j))].reshape(shape) for j, shape in enumerate(shapes)]
            for name, shapes in param_shapes.items()}


def _misfit(source: StoredLayer, layer_type: str, shapes: list[Shape], weights_file: Path, prototxt: Path) -> str:
    """Why Caffe would refuse to copy stored layer ``source`` into its layer ("" if it fits)."""
    where, name = f"{weights_file} does not fit {prototxt}", source.name
    if len(source.blobs) != len(shapes):
        return (f"{where}: layer '{name}' ({layer_type}): blob count {len(shapes)} vs {len(source.blobs)} in the "
                f"caffemodel (its layer at byte {source.offset}; Caffe refuses: \"Incompatible number of blobs "
                f"for layer {name}\"); " + _count_hint(len(shapes), len(source.blobs)))
    for index, (blob, shape) in enumerate(zip(source.blobs, shapes)):
        if not blob.fits(shape):
            return (f"{where}: layer '{name}' blob {index}: shape mismatch: the caffemodel holds "
                    f"{blob.shape_text}, the prototxt needs {'x'.join(map(str, shape))}")
        count = int(np.prod(shape, dtype=np.int64))
        if blob.data.size != count:
            return (f"{weights_file}: layer '{name}' (at byte {source.offset}) blob {index} holds "
                    f"{blob.data.size} values but its shape {blob.shape_text} needs {count}: the file is damaged")
    return ""


def _count_hint(in_prototxt: int, in_file: int) -> str:
    if in_prototxt == 0:
        return ("the prototxt's layer has no parameters: is its type right (the caffemodel's may be a layer "
                "with weights, such as PReLU)?")
    if in_file == 0:
        return "the caffemodel stores no weights for it; pass the caffemodel trained for this prototxt"
    return "check the layer's type and options (bias_term) against the net the caffemodel was trained as"


def _missing_message(missing: list[str], stored: Sequence[StoredLayer], claimed: set[str], order: list[str],
                     repeats: Mapping[str, str], weights_file: Path, prototxt: Path) -> str:
    """Layers nothing in the file reached, each with the unclaimed stored names closest to
    it (case-insensitive), and a hint when the file may have been cut at a layer boundary:
    it ends right after a complete layer of the net, and every missing layer comes later
    in the net (``order``: the net's layer names)."""
    unclaimed = {layer.name.lower(): layer.name for layer in stored if layer.blobs and layer.name not in claimed}

    def closest(name: str) -> str:
        near = difflib.get_close_matches(repeats.get(name, name).lower(), list(unclaimed), n=3, cutoff=0.5)
        return f"{name} (closest in the caffemodel: {', '.join(unclaimed[n] for n in near)})" if near else name
    message = (f"{weights_file} has no weights for layer(s) {'; '.join(map(closest, missing))} of {prototxt}; "
               "pass the caffemodel trained for this prototxt")
    size = weights_file.stat().st_size
    last = stored[-1] if stored else None
    if last is not None and last.end == size and last.name in claimed and \
            all(order.index(name) > order.index(last.name) for name in missing):
        message += (f" (the file, {size} bytes, ends right after its layer '{stored[-1].name}' (layer "
                    f"{len(stored)} of the file): if it was cut short at a layer boundary, compare its size with the "
                    "original's and copy it again)")
    return message


def _warn_repeated_names(names: list[str], repeats: Mapping[str, str], fillers: Mapping[str, list[np.ndarray]],
                         prototxt: Path) -> None:
    random = [n for n in names if any(np.unique(a).size > 1 for a in fillers[n])]
    note = (f"; the fillers of {', '.join(random)} are random, so Caffe itself gives other values in every "
            "net it builds (hybrid_infer uses one draw everywhere)" if random else "")
    log.warning("%s: %s repeat(s) the name of an earlier layer: Caffe copies a caffemodel's blobs into the "
                "first layer of a name only, so these keep the values their fillers give, as in Caffe%s; "
                "rename them (in the prototxt and the caffemodel) to load trained weights", prototxt,
                ", ".join(f"'{repeats[n]}' ({n})" for n in names), note)
