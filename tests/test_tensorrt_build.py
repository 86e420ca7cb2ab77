"""TensorRT engine building, caching and running, with real TensorRT (no mocks of it).

Builds use tensorrt_rtx, which builds ahead of time without a GPU; the tests that execute
engines are marked ``gpu`` and skip with ``runtime_available()``'s reason where nothing
can run them. Models are tiny ONNX graphs made here, named like the lowering does: each
node's doc_string is its Caffe layer, inputs have a symbolic ``batch`` dimension.
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hybrid_infer.engines import engine_cache, trt_api
from hybrid_infer.engines.engine_cache import EngineCache, default_directory
from hybrid_infer.engines.tensorrt_build import BuildSettings, build_engine, convert_to_fp16
from hybrid_infer.engines.tensorrt_engine import DeviceTensor, TensorRTEngine, cuda, runtime_available
from hybrid_infer.errors import (EngineBuildError, EngineRejected, EnvironmentProblem, HybridInferError,
                                 OptionError)

RUNTIME_OK, RUNTIME_REASON = runtime_available()
needs_runtime = pytest.mark.skipif(not RUNTIME_OK, reason=RUNTIME_REASON)
RNG = np.random.default_rng(0)


def _weights(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.3, name)


def _model(nodes, inputs, outputs, weights, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "segment",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *s]) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], weights)
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def conv_relu_pool() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["data", "w", "b"], ["conv1"], pads=[1, 1, 1, 1], doc_string="conv1"),
             helper.make_node("Relu", ["conv1"], ["relu1"], doc_string="relu1"),
             helper.make_node("MaxPool", ["relu1"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2],
                              doc_string="pool1")]
    return _model(nodes, [("data", (3, 8, 8))], ["pool1"], [_weights("w", 4, 3, 3, 3), _weights("b", 4)])


def gemm() -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["feat", "w", "b"], ["fc1"], transB=1, doc_string="fc1")]
    return _model(nodes, [("feat", (16,))], ["fc1"], [_weights("w", 8, 16), _weights("b", 8)])


def two_branch_concat() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["data", "wa"], ["a"], doc_string="branch_a"),
             helper.make_node("Conv", ["data", "wb"], ["b"], pads=[1, 1, 1, 1], doc_string="branch_b"),
             helper.make_node("Relu", ["b"], ["b_relu"], doc_string="branch_b_relu"),
             helper.make_node("Concat", ["a", "b_relu"], ["cat"], axis=1, doc_string="concat")]
    return _model(nodes, [("data", (3, 6, 6))], ["cat"], [_weights("wa", 2, 3, 1, 1), _weights("wb", 3, 3, 3, 3)])


def head() -> onnx.ModelProto:
    """Takes conv_relu_pool's output: the second of two chained segments."""
    nodes = [helper.make_node("Conv", ["pool1", "w"], ["score"], doc_string="score")]
    return _model(nodes, [("pool1", (4, 4, 4))], ["score"], [_weights("w", 5, 4, 1, 1)])


MODELS = {"conv_relu_pool": conv_relu_pool, "gemm": gemm, "concat": two_branch_concat}
INPUT_SHAPES = {"conv_relu_pool": (3, 8, 8), "gemm": (16,), "concat": (3, 6, 6)}
SETTINGS = BuildSettings(batch_min=1, batch_opt=2, batch_max=4, workspace_bytes=64 << 20)


@pytest.fixture(scope="module")
def built(rtx):
    """One FP32 build per model, shared by the tests that only look at the result."""
    return {name: build_engine(make(), SETTINGS, api=rtx, label=name) for name, make in MODELS.items()}


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-12))


# --- the module facade ---------------------------------------------------------------

def test_rtx_api_reports_its_differences(rtx):
    assert rtx.name == "tensorrt_rtx" and rtx.is_rtx and rtx.major >= 1
    assert rtx.fp16_via_onnx and not rtx.has_fp16_flag  # no FP16 builder flag in RTX
    assert rtx.has_compute_capabilities and "8.6" in rtx.compute_capabilities()
    assert "9.0" not in rtx.compute_capabilities()
    assert trt_api.load("tensorrt_rtx") is rtx  # one logger per module and process


def test_unknown_or_missing_module_is_a_clear_error(monkeypatch):
    with pytest.raises(OptionError, match="unknown TensorRT module"):
        trt_api.load("tensorrt_11")
    monkeypatch.setattr(trt_api, "MODULES", ("no_such_trt_a", "no_such_trt_b"))
    with pytest.raises(EnvironmentProblem, match="no TensorRT Python module is importable"):
        trt_api.load("auto")


# --- building --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_build_produces_plan_and_layer_lists(built, name):
    result = built[name]
    assert result.plan_size > 1000 and result.plan[:4] != b"\0\0\0\0"
    assert result.build_seconds > 0
    model = MODELS[name]()
    assert result.input_names == [i.name for i in model.graph.input]
    assert result.output_names == [o.name for o in model.graph.output]
    caffe = {layer for rec in result.network_layers for layer in rec["caffe_layers"]}
    assert caffe == {node.doc_string for node in model.graph.node}
    if result.engine_layers is None:
        assert result.engine_layers_note.startswith("engine not inspected")


def test_fp16_optimization_level_and_targets_produce_plans(rtx):
    for settings in (BuildSettings(fp16=True, batch_max=2),
                     BuildSettings(optimization_level=1, compute_capabilities=("8.6", "12.0")),
                     BuildSettings(workspace_bytes=16 << 20, timing_iterations=2)):
        result = build_engine(two_branch_concat(), settings, api=rtx)
        assert result.plan_size > 1000
        assert result.fp16_onnx == settings.fp16
        assert result.input_names == ["data"] and result.output_names == ["cat"]


def test_fp16_conversion_keeps_fp32_interface_and_values():
    from onnx.reference import ReferenceEvaluator
    model = two_branch_concat()
    half = convert_to_fp16(model)
    onnx.shape_inference.infer_shapes(half, check_type=True, strict_mode=True)
    assert [v.type.tensor_type.elem_type for v in (*half.graph.input, *half.graph.output)] == [TensorProto.FLOAT] * 2
    assert all(i.data_type == TensorProto.FLOAT16 for i in half.graph.initializer)
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    (expected,), (actual,) = ReferenceEvaluator(model).run(None, {"data": x}), ReferenceEvaluator(half).run(None, {"data": x})
    assert actual.dtype == np.float32 and rel_l2(actual, expected) < 1e-2


def test_mark_all_outputs_exposes_every_blob(rtx):
    result = build_engine(conv_relu_pool(), BuildSettings(mark_all_outputs=True), api=rtx)
    assert set(result.output_names) == {"pool1", "conv1", "relu1"}


def test_too_small_workspace_is_a_clear_error(rtx):
    with pytest.raises(EngineBuildError, match="workspace of .* MiB.*raise the workspace limit"):
        build_engine(conv_relu_pool(), BuildSettings(workspace_bytes=1), api=rtx, label="seg7")


def test_bad_settings_are_option_errors(rtx):
    with pytest.raises(OptionError, match="min <= opt <= max"):
        BuildSettings(batch_min=2, batch_opt=1)
    with pytest.raises(OptionError, match="cannot target compute capability 9.0; choose from .*8.6"):
        build_engine(gemm(), BuildSettings(compute_capabilities=("9.0",)), api=rtx)


@pytest.mark.parametrize("op, domain, layer", [("Frob", "caffe.custom", "my_frob"), ("Det", "", "det1")])
def test_parser_rejection_names_the_caffe_layer(rtx, op, domain, layer):
    nodes = [helper.make_node("Relu", ["x"], ["r"], doc_string="relu0"),
             helper.make_node(op, ["r"], ["y"], domain=domain, doc_string=layer)]
    model = _model(nodes, [("x", (4, 4))], ["y"], [], domains=[domain] if domain else [])
    with pytest.raises(EngineBuildError) as info:
        build_engine(model, api=rtx, label="segment3")
    assert info.value.caffe_layers == [layer]
    assert isinstance(info.value, EngineRejected)  # the executor's cue to fall back to Caffe
    message = str(info.value)
    assert f"Caffe layer '{layer}'" in message and "segment3" in message and "in Caffe instead" in message


# --- the engine cache --------------------------------------------------------------------

def test_second_build_is_a_cache_hit_without_the_builder(rtx, tmp_path, monkeypatch):
    cache, model = EngineCache(tmp_path), gemm()
    first, lookup = cache.get_or_build(model, SETTINGS, api=rtx)
    assert not lookup.hit and lookup.reason == "not cached"

    def no_build(*args, **kwargs):
        raise AssertionError("the builder ran on a cache hit")
    monkeypatch.setattr(engine_cache, "build_engine", no_build)
    second, lookup = cache.get_or_build(model, SETTINGS, api=rtx)
    assert lookup.hit and lookup.plan_path.parent == tmp_path
    assert second.plan == first.plan and second.metadata() == first.metadata()


@pytest.mark.parametrize("damage, reason", [
    (lambda plan: plan[:len(plan) // 2], "plan truncated"),
    (lambda plan: plan[:100] + bytes([plan[100] ^ 0xFF]) + plan[101:], "plan checksum mismatch"),
])
def test_damaged_cache_entry_is_detected_and_rebuilt(rtx, tmp_path, damage, reason):
    cache, model = EngineCache(tmp_path), gemm()
    built, lookup = cache.get_or_build(model, SETTINGS, api=rtx)
    lookup.plan_path.write_bytes(damage(lookup.plan_path.read_bytes()))
    assert not cache.lookup(lookup.key)[0].hit
    rebuilt, again = cache.get_or_build(model, SETTINGS, api=rtx)
    assert not again.hit and again.reason.startswith(reason)
    assert rebuilt.plan_size == built.plan_size
    assert hashlib.sha256(lookup.plan_path.read_bytes()).digest() == hashlib.sha256(rebuilt.plan).digest()
    assert cache.lookup(lookup.key)[0].hit


def test_unreadable_sidecar_is_a_miss(rtx, tmp_path):
    cache = EngineCache(tmp_path)
    _, lookup = cache.get_or_build(gemm(), SETTINGS, api=rtx)
    lookup.plan_path.with_suffix(".json").write_text("{not json")
    assert cache.lookup(lookup.key)[0].reason.startswith("unreadable sidecar")


def test_cache_key_covers_model_settings_module_and_target(rtx, tmp_path):
    cache = EngineCache(tmp_path)
    data = gemm().SerializeToString()
    base = cache.key(data, SETTINGS, rtx, "rtx:default")
    same = BuildSettings(batch_min=1, batch_opt=2, batch_max=4, workspace_bytes=64 << 20)
    assert base == cache.key(data, same, rtx, "rtx:default")
    assert base != cache.key(data + b" ", SETTINGS, rtx, "rtx:default")
    assert base != cache.key(data, BuildSettings(fp16=True), rtx, "rtx:default")
    assert base != cache.key(data, SETTINGS, rtx, "rtx:8.6")


def test_cache_directory_defaults_and_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv(engine_cache.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_directory() == tmp_path / "xdg" / "hybrid_infer" / "engines"
    monkeypatch.setenv(engine_cache.ENV_DIR, str(tmp_path / "env"))
    assert EngineCache().directory == tmp_path / "env"
    assert EngineCache(tmp_path / "arg").directory == tmp_path / "arg"


# --- running (GPU) -----------------------------------------------------------------------

def test_runtime_available_explains_itself():
    ok, reason = runtime_available()
    assert isinstance(ok, bool) and reason


@pytest.mark.skipif(RUNTIME_OK, reason="a TensorRT runtime can execute here")
def test_engine_refuses_cleanly_where_nothing_can_run(built):
    with pytest.raises(HybridInferError):
        TensorRTEngine(built["gemm"].plan)


def _onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.gpu
@needs_runtime
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("fp16, tolerance", [(False, 1e-4), (True, 1e-2)])
def test_engine_matches_onnxruntime(name, fp16, tolerance):
    model = MODELS[name]()
    result = build_engine(model, BuildSettings(fp16=fp16, batch_max=4), label=name)
    engine = TensorRTEngine(result.plan, label=name)
    try:
        for batch in (3, 1, 3):  # a new shape rebinds; a repeated one reuses the buffers
            feeds = {engine.input_names[0]: RNG.standard_normal((batch, *INPUT_SHAPES[name])).astype(np.float32)}
            expected = _onnxruntime(model, feeds)
            actual = engine.run(feeds)
            assert actual.keys() == expected.keys()
            for key in expected:
                assert actual[key].dtype == np.float32 and actual[key].shape == expected[key].shape
                assert rel_l2(actual[key], expected[key]) < tolerance
    finally:
        engine.close()


@pytest.mark.gpu
@needs_runtime
def test_device_hand_off_between_segments():
    body, tail = conv_relu_pool(), head()
    first = TensorRTEngine(build_engine(body, BuildSettings(batch_max=2)).plan, label="first")
    second = TensorRTEngine(build_engine(tail, BuildSettings(batch_max=2)).plan, label="second")
    try:
        x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
        middle = first.run_device({"data": x})
        assert isinstance(middle["pool1"], DeviceTensor) and middle["pool1"].shape == (2, 4, 4, 4)
        out = second.run_device(middle)
        actual = second.download(out["score"])
        expected = _onnxruntime(tail, _onnxruntime(body, {"data": x}))["score"]
        assert rel_l2(actual, expected) < 1e-4
    finally:
        second.close()
        first.close()


@pytest.mark.gpu
@needs_runtime
def test_engine_inspector_lists_fused_layers():
    model = two_branch_concat()
    result = build_engine(model, BuildSettings())
    assert result.engine_layers, result.engine_layers_note
    assert all("Name" in layer for layer in result.engine_layers)
    covered = {c for layer in result.engine_layers for c in layer["caffe_layers"]}
    assert covered and covered <= {n.doc_string for n in model.graph.node}
    engine = TensorRTEngine(result.plan)
    try:
        assert [layer["Name"] for layer in engine.layers()] == [layer["Name"] for layer in result.engine_layers]
    finally:
        engine.close()


@pytest.mark.gpu
def test_device_buffers_round_trip():
    """The CUDA binding alone (no TensorRT): allocate, upload, download on a stream."""
    try:
        backend = cuda()
        backend.device()
    except EnvironmentProblem as exc:
        pytest.skip(str(exc))
    stream = backend.create_stream()
    x = RNG.standard_normal((3, 5)).astype(np.float32)
    ptr = backend.malloc(x.nbytes)
    try:
        backend.htod(ptr, x, stream)
        y = np.empty_like(x)
        backend.dtoh(y, ptr, stream)
        backend.synchronize(stream)
        np.testing.assert_array_equal(x, y)
    finally:
        backend.free(ptr)
        backend.destroy_stream(stream)
