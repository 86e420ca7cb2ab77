"""The OpenVINO engine itself: the settings it compiles with (FP32 made explicit, threads),
BF16 as a measured reduced-precision choice, one compiled model for every batch, and a clear
refusal that names the Caffe layer. Accuracy per layer and per model against Caffe is in
the conformance tests (the ``engine`` fixture)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import require_engine
from hybrid_infer.errors import EngineRejected, OptionError
from hybrid_infer.testing import load_text, lower_whole_net, net, rel_l2

pytestmark = pytest.mark.usefixtures("openvino")

SMALL_NET = net("""
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 16 kernel_size: 3 pad: 1 } }
    layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
    layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 10 } }
""", data=(2, 8, 12, 12))


@pytest.fixture
def openvino():
    require_engine("openvino")


def _lowered(seed: int = 3):
    model, graph = load_text(SMALL_NET, seed)
    return model, graph, lower_whole_net(model, graph, graph.outputs)


def _caffe(model, graph, x: np.ndarray) -> np.ndarray:
    caffe_net = model.reference_net()
    caffe_net.blobs["data"].reshape(*x.shape)
    caffe_net.reshape()
    caffe_net.forward(data=x)
    return np.array(caffe_net.blobs["fc"].data, copy=True)


def test_fp32_is_set_explicitly_with_the_threads_asked_for():
    import openvino
    import openvino.properties as props
    import openvino.properties.hint as hints
    from hybrid_infer.engines.openvino_engine import OpenVinoEngine, _core, bf16_supported
    _, _, onnx_model = _lowered()
    engine = OpenVinoEngine(onnx_model, threads=1)
    compiled = engine._compiled
    assert compiled.get_property(hints.inference_precision()) == openvino.Type.f32
    assert compiled.get_property(props.inference_num_threads()) == 1
    assert engine.precision == "f32" and engine.kind == "openvino"
    if bf16_supported():  # left to itself, the CPU plugin would compute in BF16 here
        assert _core().get_property("CPU", hints.inference_precision()) == openvino.Type.bf16


def test_one_compiled_model_runs_every_batch_and_matches_caffe():
    from hybrid_infer.engines.openvino_engine import OpenVinoEngine
    model, graph, onnx_model = _lowered()
    engine = OpenVinoEngine(onnx_model)
    rng = np.random.default_rng()
    for batch in (1, 5, 2):
        x = rng.standard_normal((batch, 8, 12, 12)).astype(np.float32)
        got = engine.run({"data": x})["fc"]
        assert got.shape == (batch, 10)
        assert rel_l2(got, _caffe(model, graph, x)) <= 1e-5
    engine.close()


def test_bf16_is_reduced_precision_and_its_error_is_measurable():
    from hybrid_infer.engines.openvino_engine import OpenVinoEngine, bf16_supported
    model, graph, onnx_model = _lowered()
    if not bf16_supported():
        with pytest.raises(OptionError, match="avx512_bf16 or AMX"):
            OpenVinoEngine(onnx_model, precision="bf16")
        return
    engine = OpenVinoEngine(onnx_model, precision="bf16")
    assert engine.precision == "bf16"
    x = np.random.default_rng().standard_normal((2, 8, 12, 12)).astype(np.float32)
    error = rel_l2(engine.run({"data": x})["fc"], _caffe(model, graph, x))
    # BF16 keeps 8 bits of mantissa: clearly off FP32 (1e-5), still close (a few 1e-3).
    assert 1e-5 < error < 5e-2, error


def test_unknown_precision_is_an_option_error():
    from hybrid_infer.engines.openvino_engine import OpenVinoEngine
    with pytest.raises(OptionError, match="choose one of f32, bf16"):
        OpenVinoEngine(_lowered()[2], precision="f16")


def test_refusal_names_the_caffe_layer_of_the_node_openvino_cannot_convert():
    from hybrid_infer.engines.openvino_engine import OpenVinoEngine
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="act/Relu_0", doc_string="act"),
             helper.make_node("NoSuchOp", ["r"], ["y"], name="odd/NoSuchOp_0", doc_string="odd")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(EngineRejected, match="OpenVINO rejected the segment: .*NoSuchOp") as caught:
        OpenVinoEngine(model)
    assert caught.value.caffe_layers == ["odd"]
    assert "Exception from src" not in str(caught.value)


def test_top_k_ranks_ties_by_lower_index_as_onnx_says():
    """OpenVINO's ONNX reader makes TopK unstable; the engine makes it stable again (Caffe's
    ArgMax lowering depends on ONNX's order among equal values)."""
    from hybrid_infer.engines.onnxruntime_engine import OnnxRuntimeEngine
    from hybrid_infer.engines.openvino_engine import OpenVinoEngine
    k = helper.make_tensor("k", TensorProto.INT64, [1], [3])
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=1, largest=1, sorted=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", 3]),
                               helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", 3])], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[1, 3, 3, 0, 3, 2, 3, 1], [5, 5, 5, 5, 5, 5, 5, 5]], np.float32)
    got = OpenVinoEngine(model).run({"x": x})["indices"]
    assert got.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert got.tolist() == OnnxRuntimeEngine(model).run({"x": x})["indices"].tolist()
