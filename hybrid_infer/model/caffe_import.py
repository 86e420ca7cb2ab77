"""Import the user's pycaffe once, quietly, with a clear error when it is missing.

hybrid_infer deliberately uses whatever Caffe the user has (including forks), because
fork-specific layer types and fields only exist in that build's ``caffe_pb2``.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

from ..errors import EnvironmentProblem


@functools.cache
def caffe() -> ModuleType:
    """Return the ``caffe`` module; glog is silenced unless the user set GLOG_minloglevel."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe as module  # type: ignore[import-not-found]
    except ImportError as exc:
        raise EnvironmentProblem(
            f"pycaffe cannot be imported ({exc}). Run scripts/setup.sh, or put your Caffe's "
            "'python' folder on PYTHONPATH.") from exc
    return module


@functools.cache
def caffe_pb2() -> ModuleType:
    """Return the protobuf module of the installed Caffe (its own fields and layer types)."""
    caffe()
    from caffe.proto import caffe_pb2 as module  # type: ignore[import-not-found]
    return module


@functools.cache
def registered_layer_types() -> frozenset[str]:
    """Layer types this Caffe build can instantiate."""
    return frozenset(caffe().layer_type_list())
