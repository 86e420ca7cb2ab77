"""The nets scripts/bench.py generates: a ResNet-152-sized net, and a Python layer inserted at a
single-tensor cut mid-network (TensorRT | Caffe | TensorRT), checked against Caffe."""
from __future__ import annotations

import sys

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.partition.partitioner import CAFFE, TENSORRT

from conftest import GRAPHS, REPO

sys.path.insert(0, str(REPO / "scripts"))
from bench_nets import resnet_prototxt, with_python_layer  # noqa: E402


def test_resnet152_has_resnet152s_layers(tmp_path):
    path = tmp_path / "resnet152.prototxt"
    path.write_text(resnet_prototxt())
    net = hybrid_infer.load(path)
    types = [layer.type for layer in net.graph.layers.values()]
    # 151 convolutions on the main path + 4 projection shortcuts, one per stage; 1 fully connected.
    assert types.count("Convolution") == 155 and types.count("InnerProduct") == 1
    assert types.count("BatchNorm") == types.count("Scale") == 155 and types.count("Eltwise") == 50
    assert [s.backend for s in net.partition.segments] == [TENSORRT]
    assert net.graph.values[net.graph.outputs[0]].shape == (1, 1000)


@pytest.mark.parametrize("graph", ["lenet_digits/deploy.prototxt", "python_layer_positions/python_layer_end.prototxt"])
def test_python_layer_mid_network_splits_in_three_and_matches_caffe(monkeypatch, tmp_path, graph):
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))
    path, blob = with_python_layer(GRAPHS / graph, tmp_path / "with_python.prototxt")
    net = hybrid_infer.load(path, random_weights=1, engine="onnxruntime", min_segment_size=1)
    backends = [s.backend for s in net.partition.segments]
    python = next(s for s in net.partition.segments if s.backend == CAFFE)
    assert net.graph.layers[python.layers[0]].type == "Python" and len(python.layers) == 1
    assert backends[:3] == [TENSORRT, CAFFE, TENSORRT]
    assert net.graph.layers["mid_python"].param.bottom == [blob]
    x = {"data": np.random.default_rng(0).standard_normal(net.input_shapes()["data"]).astype(np.float32)}
    got, want = net.run(x), net.run_caffe(x)
    for name in want:
        assert np.allclose(got[name], want[name], rtol=1e-4, atol=1e-6)
