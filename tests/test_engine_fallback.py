"""A segment an engine refuses runs in Caffe instead, with a warning, and still gives
Caffe's answer (never a wrong one)."""
from __future__ import annotations

import logging

import numpy as np

import hybrid_infer
from hybrid_infer.partition.partitioner import CAFFE, TENSORRT

# Pooling whose last window lies wholly past the input (no padding, stride > kernel): Caffe
# defines it (MAX gives -FLT_MAX), ONNX cannot express it, so the lowering refuses the layer.
NET = '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 1 stride: 3 } }
layer { name: "tanh" type: "TanH" bottom: "pool" top: "out" }
'''


def test_refused_layer_moves_to_caffe_and_the_rest_stays(make_prototxt, caplog, engine):
    net = hybrid_infer.load(make_prototxt(NET), random_weights=4, engine=engine, min_segment_size=1)
    assert [s.backend for s in net.partition.segments] == [TENSORRT]
    x = np.random.default_rng().standard_normal((2, 3, 5, 5)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        got = net.run({"data": x})
    assert [(s.backend, s.layers) for s in net.partition.segments] == [
        (TENSORRT, ["conv", "relu"]), (CAFFE, ["pool"]), (TENSORRT, ["tanh"])]
    assert net.partition.fallback_reasons["pool"].startswith("the lowering refused it")
    assert [se.engine.kind for se in net.segment_engines] == [engine, "caffe", engine]
    assert any("moving pool to Caffe" in r.message for r in caplog.records)
    want = net.run_caffe({"data": x})
    np.testing.assert_allclose(got["out"], want["out"], rtol=1e-5, atol=1e-6)


def test_refusal_below_minimum_size_sends_the_segment_to_caffe(make_prototxt, engine):
    net = hybrid_infer.load(make_prototxt(NET), random_weights=4, engine=engine, min_segment_size=3)
    x = np.random.default_rng().standard_normal((2, 3, 5, 5)).astype(np.float32)
    got, want = net.run({"data": x}), net.run_caffe({"data": x})
    assert [s.backend for s in net.partition.segments] == [CAFFE]
    np.testing.assert_array_equal(got["out"], want["out"])


def test_onnx_runtime_out_of_memory_gives_no_fallback_advice():
    """An allocation ONNX Runtime cannot make (here: a 4 GiB Expand under a 1 GiB address-space
    limit) is an out-of-memory error: running the layer in Caffe would need the memory too."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from hybrid_infer.engines.onnxruntime_engine import OnnxRuntimeEngine
    from hybrid_infer.errors import InputError

    from child_process import run_in_child
    shape = numpy_helper.from_array(np.array([1024, 1024, 1024], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["big"], doc_string="huge"),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0, doc_string="sum")],
        "segment", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)

    def run() -> None:
        engine = OnnxRuntimeEngine(model, threads=1)
        try:
            engine.run({"x": np.ones(1, np.float32)})
        except InputError as exc:
            assert "--fallback" not in str(exc)
            raise
    said = run_in_child(run, extra_address_space=2**30)
    assert said.startswith("InputError: ONNX Runtime ran out of memory") and "smaller batch" in said, said
