"""hybrid_infer's native extension on pycaffe blobs: host pointers everywhere, device
pointers and lent memory where Caffe has CUDA and a GPU is visible."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from hybrid_infer.errors import EnvironmentProblem
from hybrid_infer.model.caffe_import import caffe
from hybrid_infer.native import blob_access

TWO_BY_THREE = 'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
COPY = TWO_BY_THREE + 'layer { name: "y" type: "Scale" bottom: "x" top: "y" scale_param { bias_term: false } }\n'


@pytest.fixture(scope="module")
def native():
    try:
        return blob_access()
    except EnvironmentProblem as exc:
        pytest.fail(f"setup.sh builds the native extension, so it must import here: {exc}")


def _floats(ptr: int, count: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(ptr))


def _net(make_prototxt, text: str):
    cf = caffe()
    cf.set_mode_cpu()
    return cf.Net(str(make_prototxt(text)), cf.TEST)


def test_extension_was_built_for_the_imported_caffe(native):
    build_info = Path(caffe().__file__).resolve().parents[2] / "BUILD_INFO"
    assert native.built_against() == build_info.read_text().splitlines()[0].strip()


def test_host_pointer_reads_and_writes_blob_memory(native, make_prototxt):
    blob = _net(make_prototxt, TWO_BY_THREE).blobs["x"]
    assert native.data_head(blob) == "uninitialized"
    _floats(native.mutable_cpu_data(blob), 6)[:] = np.arange(6)
    assert native.data_head(blob) == "cpu"
    np.testing.assert_array_equal(blob.data, np.arange(6, dtype=np.float32).reshape(2, 3))
    blob.data[1, 2] = 42
    assert _floats(native.cpu_data(blob), 6)[5] == 42


def test_reset_data_forgets_the_memory_and_keeps_the_shape(native, make_prototxt):
    blob = _net(make_prototxt, TWO_BY_THREE).blobs["x"]
    blob.data[...] = 7
    native.reset_data(blob)
    assert native.data_head(blob) == "uninitialized" and tuple(blob.shape) == (2, 3)
    np.testing.assert_array_equal(blob.data, np.zeros((2, 3), np.float32))


def test_device_calls_refuse_clearly_without_cuda(native, make_prototxt):
    if native.cuda_enabled():
        pytest.skip("this Caffe has CUDA; tests/test_caffe_gpu.py covers the device calls")
    blob = _net(make_prototxt, TWO_BY_THREE).blobs["x"]
    for call in (lambda: native.gpu_data(blob), lambda: native.set_gpu_data(blob, 4096),
                 native.device_count, native.synchronize):
        with pytest.raises(RuntimeError, match="built without CUDA"):
            call()


def test_blob_arguments_must_be_pycaffe_blobs(native):
    with pytest.raises(Exception, match="did not match C.. signature"):
        native.cpu_data(np.zeros(3, np.float32))


@pytest.fixture
def gpu(native):
    from hybrid_infer.engines.caffe_gpu_engine import use_gpu
    try:
        return use_gpu(0)
    except EnvironmentProblem as exc:
        pytest.skip(str(exc))


@pytest.mark.gpu
def test_lent_device_memory_is_read_and_never_freed(native, gpu, make_prototxt):
    """A blob of one net lends its device memory to another net's input; the borrower
    computes from it, and destroying the borrower leaves the lender's memory intact."""
    lender = _net(make_prototxt, TWO_BY_THREE).blobs["x"]
    caffe().set_mode_gpu()
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    lender.data[...] = values
    ptr = native.gpu_data(lender)  # uploads, then the lender's memory is on the device
    borrower_net = caffe().Net(str(make_prototxt(COPY)), caffe().TEST)
    borrower_net.params["y"][0].data[...] = 2
    borrower = borrower_net.blobs["x"]
    native.set_gpu_data(borrower, ptr)
    assert native.gpu_data(borrower) == ptr and native.data_head(borrower) == "gpu"
    borrower_net._forward(0, len(borrower_net.layers) - 1)
    native.synchronize()
    np.testing.assert_array_equal(borrower_net.blobs["y"].data, values * 2)
    native.reset_data(borrower)
    assert native.data_head(borrower) == "uninitialized"
    del borrower, borrower_net
    out = np.empty(6, np.float32)
    native.copy_to_host(out.ctypes.data, ptr, out.nbytes)  # fails if Caffe had freed it
    np.testing.assert_array_equal(out, values.ravel())


@pytest.mark.gpu
def test_set_gpu_data_rejects_host_memory(native, gpu, make_prototxt):
    blob = _net(make_prototxt, TWO_BY_THREE).blobs["x"]
    host = np.zeros(6, np.float32)
    with pytest.raises(Exception, match="not device memory"):
        native.set_gpu_data(blob, host.ctypes.data)
