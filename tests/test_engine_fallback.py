"""A segment an engine refuses runs in Caffe instead, with a warning, and still gives
Caffe's answer (never a wrong one)."""
from __future__ import annotations

import logging

import numpy as np

import hybrid_infer
from hybrid_infer.partition.partitioner import TENSORRT

# Pooling whose last window lies wholly past the input (no padding, stride > kernel): Caffe
# defines it (MAX gives -FLT_MAX), ONNX cannot express it, so the lowering refuses the layer.
NET = '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 1 stride: 3 } }
layer { name: "tanh" type: "TanH" bottom: "pool" top: "out" }
'''


def test_refused_segment_falls_back_to_caffe(make_prototxt, caplog):
    net = hybrid_infer.load(make_prototxt(NET), random_weights=4, engine="onnxruntime")
    assert [s.backend for s in net.partition.segments] == [TENSORRT]
    x = np.random.default_rng().standard_normal((2, 3, 5, 5)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        got = net.run({"data": x})
    (se,) = net.segment_engines
    assert se.engine.kind == "caffe"
    assert "runs in Caffe instead" in se.fallback_note and "pool" in se.fallback_note
    assert any("runs in Caffe instead" in r.message for r in caplog.records)
    want = net.run_caffe({"data": x})
    np.testing.assert_array_equal(got["out"], want["out"])
