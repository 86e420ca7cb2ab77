"""hybrid_infer's compiled companion: pointers into pycaffe blobs.

pycaffe shows a blob to Python only as a host array, so a tensor handed from one GPU
engine to a Caffe GPU segment would be copied to the host and back. The extension
``hybrid_infer_native`` (source: ``caffe_blob.cpp`` beside this file) reaches the
``caffe::Blob<float>`` behind a pycaffe Blob and exposes its device and host pointers,
lends it existing device memory (``set_gpu_data``; Caffe never frees lent memory) and
ends the loan (``reset_data``). It must be compiled against the very Caffe it runs with:
``scripts/setup.sh`` does that with ``scripts/build-native.sh`` and puts it on the path.
"""
from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

from ..errors import EnvironmentProblem
from ..model.caffe_import import caffe


@functools.cache
def blob_access() -> ModuleType:
    """The extension module, after checking that it was built for the Caffe imported here."""
    cf = caffe()  # registers pycaffe's Blob class, which the extension's functions take
    try:
        import hybrid_infer_native as module  # type: ignore[import-not-found]
    except ImportError as exc:
        raise EnvironmentProblem(
            f"hybrid_infer's native extension cannot be imported ({exc}); run scripts/setup.sh "
            "(it compiles the extension against your Caffe), or put the folder that "
            "scripts/build-native.sh CAFFE_PREFIX prints on PYTHONPATH") from exc
    build_info = Path(cf.__file__).resolve().parents[2] / "BUILD_INFO"
    if build_info.is_file():
        caffe_build = build_info.read_text().splitlines()[0].strip()
        if caffe_build != module.built_against():
            raise EnvironmentProblem(
                f"hybrid_infer's native extension ({module.__file__}) was built for "
                f"'{module.built_against()}' but this Caffe is '{caffe_build}'; run "
                "scripts/setup.sh again (with --cuda for the CUDA Caffe)")
    return module
