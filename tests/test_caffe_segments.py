"""Caffe sub-net segments chained by the executor reproduce the whole net in pure Caffe.

Forcing layers to Caffe with --fallback makes a chain of pycaffe sub-nets; their outputs
must equal Caffe running the net in one piece (same arithmetic, so to rounding).
"""
from __future__ import annotations

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.errors import InputError
from hybrid_infer.metrics import relative_l2
from hybrid_infer.partition.partitioner import CAFFE

from conftest import GRAPHS

BRANCHY = '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "a" type: "Convolution" bottom: "conv1" top: "a" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "b" type: "TanH" bottom: "conv1" top: "b" }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }
layer { name: "relu2" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
'''


def _all_layer_types(net) -> list[str]:
    return sorted({layer.type for layer in net.graph.compute_layers()})


def test_caffe_subnet_equals_whole_net(make_prototxt):
    path = make_prototxt(BRANCHY)
    every_type = _all_layer_types(hybrid_infer.load(path))
    net = hybrid_infer.load(path, random_weights=1, fallback=every_type, min_segment_size=0,
                            outputs=["pool", "conv1", "a"])
    assert all(s.backend == CAFFE for s in net.partition.segments)
    x = np.random.default_rng().standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = net.run({"data": x})
    want = net.run_caffe({"data": x})
    for blob in ("pool", "conv1", "a"):
        np.testing.assert_array_equal(got[blob], want[blob])
    # batch 5 after batch 2: engines reshape
    x5 = np.random.default_rng().standard_normal((5, 3, 8, 8)).astype(np.float32)
    got5, want5 = net.run({"data": x5}), net.run_caffe({"data": x5})
    assert got5["pool"].shape[0] == 5
    assert relative_l2(got5["pool"], want5["pool"]) == 0.0
    net.close()


def test_python_layer_segments_match_caffe(monkeypatch):
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))
    net = hybrid_infer.load(GRAPHS / "python_layer_net/deploy.prototxt", random_weights=7,
                            fallback=["Convolution", "InnerProduct", "ReLU", "Pooling", "Softmax"])
    shape = net.input_shapes()["data"]
    x = np.random.default_rng().standard_normal(shape).astype(np.float32)
    got, want = net.run({"data": x}), net.run_caffe({"data": x})
    for blob in want:
        np.testing.assert_array_equal(got[blob], want[blob])


def test_bad_inputs_are_explained(make_prototxt):
    net = hybrid_infer.load(make_prototxt(BRANCHY), random_weights=1)
    with pytest.raises(InputError, match="image: not an input of .*; its inputs are data"):
        net.check_inputs({"image": np.zeros((2, 3, 8, 8), np.float32)})
    with pytest.raises(InputError, match=r"shape \(2, 3, 7, 8\); the model expects \(N, 3, 8, 8\)"):
        net.check_inputs({"data": np.zeros((2, 3, 7, 8), np.float32)})
    with pytest.raises(InputError, match="dtype uint8"):
        net.check_inputs({"data": np.zeros((2, 3, 8, 8), np.uint8)})
    with pytest.raises(InputError, match="missing input"):
        net.check_inputs({})


def test_nan_and_inf_propagate_like_caffe(make_prototxt):
    net = hybrid_infer.load(make_prototxt(BRANCHY), random_weights=2,
                            fallback=_all_layer_types(hybrid_infer.load(make_prototxt(BRANCHY))))
    x = np.random.default_rng().standard_normal((2, 3, 8, 8)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    x[1, 1, 2, 2] = np.inf
    got, want = net.run({"data": x}), net.run_caffe({"data": x})
    np.testing.assert_array_equal(np.isnan(got["pool"]), np.isnan(want["pool"]))
    assert relative_l2(got["pool"], want["pool"]) == 0.0
