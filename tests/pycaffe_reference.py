"""Expected values straight from pycaffe, independent of hybrid_infer's own Caffe code.

A fresh ``caffe.Net`` is built from the user's prototxt file as given (not hybrid_infer's
normalised copy), gets its parameters either from a caffemodel through Caffe's own reader
or from explicit arrays, and runs one forward pass.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pytest

from hybrid_infer.model.caffe_import import caffe

REPRO = Path(__file__).resolve().parents[2] / "shared" / "repro"


def caffe_forward(prototxt: str | os.PathLike[str], inputs: Mapping[str, np.ndarray], blobs: Sequence[str], *,
                  weights: Optional[Mapping[str, Sequence[np.ndarray]]] = None,
                  caffemodel: Optional[str | os.PathLike[str]] = None) -> dict[str, np.ndarray]:
    """``blobs`` of ``net.blobs`` after one forward pass of pycaffe on ``prototxt``."""
    cf = caffe()
    cf.set_mode_cpu()
    net = cf.Net(str(prototxt), cf.TEST, weights=str(caffemodel)) if caffemodel else cf.Net(str(prototxt), cf.TEST)
    for name, arrays in (weights or {}).items():
        for blob, array in zip(net.params[name], arrays):
            blob.data[...] = array
    for name, array in inputs.items():
        net.blobs[name].reshape(*array.shape)
    net.reshape()
    for name, array in inputs.items():
        net.blobs[name].data[...] = array
    net.forward()
    return {b: np.array(net.blobs[b].data, copy=True) for b in blobs}


def repro_file(name: str) -> Path:
    """A file of ../shared/repro, or skip: those inputs live outside the repository."""
    path = REPRO / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the shared repro inputs are not available here")
    return path
