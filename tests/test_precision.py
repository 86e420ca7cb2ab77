"""Reduced precision: calibration on real inputs, the calibration file, Q/DQ placement, INT8
and FP16 engines (ONNX Runtime runs them here, TensorRT-RTX builds them), per-layer precision.

Everything runs for real: pycaffe for the reference, ONNX Runtime's calibrators and
quantizer, ONNX Runtime sessions, the TensorRT-RTX builder. Accuracy is measured with the
bundled LeNet's trained weights on scikit-learn's digits (calibrated on training digits,
evaluated on the test split).
"""
from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import hybrid_infer
from hybrid_infer.engines import trt_api
from hybrid_infer.engines.engine_cache import EngineCache
from hybrid_infer.engines.tensorrt_build import BuildSettings
from hybrid_infer.errors import CalibrationError, EnvironmentProblem, OptionError
from hybrid_infer.executor.engine_factory import segment_onnx
from hybrid_infer.metrics import relative_l2
from hybrid_infer.partition.partitioner import TENSORRT
from hybrid_infer.precision.calibrate import batches_of, calibrate
from hybrid_infer.precision.calibration_file import load_calibration
from hybrid_infer.precision.plan import onnx_digest
from hybrid_infer.precision.qdq import ONNXRUNTIME, TENSORRT as QDQ_TENSORRT, prepare, quantize
from hybrid_infer.precision.sensitivity import AccuracyTarget, parse_target, search

from conftest import GRAPHS, REPO

LENET = GRAPHS / "lenet_digits"
RNG = np.random.default_rng()

RESIDUAL_NET = """
name: "residual"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum" }
layer { name: "relu2" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "up" type: "Deconvolution" bottom: "sum" top: "up"
        convolution_param { num_output: 4 kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "up" top: "fc" inner_product_param { num_output: 10 } }
"""


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bundled LeNet's data: scikit-learn's digits, split and preprocessed as it was trained."""
    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn (pip install scikit-learn)")
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from train_lenet_digits import load_data
    finally:
        sys.path.remove(str(REPO / "scripts"))
    x_train, y_train, x_test, y_test, _ = load_data()
    return x_train, y_train, x_test, y_test


def lenet(**kwargs) -> hybrid_infer.HybridNet:
    return hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", engine="onnxruntime",
                             outputs=["prob", "ip2"], **kwargs)


@pytest.fixture(scope="module")
def lenet_calibration(tmp_path_factory) -> Path:
    """INT8 entropy calibration on 320 training digits, written where the user would keep it."""
    x_train = digits()[0]
    net = lenet()
    calibration = calibrate(net, batches_of({"data": x_train[:320]}, 32), method="entropy")
    path = tmp_path_factory.mktemp("calib") / "lenet.calib.json"
    calibration.save(path)
    return path


@pytest.fixture
def residual(make_prototxt):
    """A small net with BatchNorm+Scale, a residual Eltwise, Deconvolution and InnerProduct."""
    path = make_prototxt(RESIDUAL_NET, "residual")
    net = hybrid_infer.load(path, random_weights=int(RNG.integers(1 << 30)), engine="onnxruntime")
    x = RNG.standard_normal((16, 3, 12, 12)).astype(np.float32)
    return path, net, calibrate(net, batches_of({"data": x}, 8), method="minmax"), x


def rtx() -> trt_api.TrtApi:
    try:
        return trt_api.load("tensorrt_rtx")
    except EnvironmentProblem as exc:
        pytest.skip(str(exc))


# --- accuracy with real weights and data ------------------------------------------------

def test_lenet_int8_accuracy_within_half_a_point_of_fp32(lenet_calibration):
    _, _, x_test, y_test = digits()
    fp32 = lenet().run({"data": x_test})
    int8_net = lenet(calibration=lenet_calibration)
    int8 = int8_net.run({"data": x_test})
    fp32_acc = float((fp32["prob"].argmax(1) == y_test).mean())
    int8_acc = float((int8["prob"].argmax(1) == y_test).mean())
    print(f"LeNet digits test split: FP32 {fp32_acc:.2%}, INT8 {int8_acc:.2%}")
    assert fp32_acc > 0.95
    assert abs(fp32_acc - int8_acc) <= 0.005
    # It really ran quantized: the logits moved, but not far.
    assert 1e-4 < relative_l2(int8["ip2"], fp32["ip2"]) < 0.1
    session_ops = _ops_after_onnxruntime(int8_net.precision.segment_model(
        segment_onnx(int8_net.graph, int8_net.model, int8_net.partition.segments[0]),
        int8_net.partition.segments[0], "onnxruntime"))
    assert session_ops["QLinearConv"] == 2  # ONNX Runtime's integer convolution kernels, not FP32 ones


def _ops_after_onnxruntime(model: onnx.ModelProto) -> collections.Counter:
    """Operator types of ``model`` after ONNX Runtime's graph optimizations (what it executes)."""
    import tempfile

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


# --- the calibration file --------------------------------------------------------------

def test_calibration_file_records_what_it_belongs_to(lenet_calibration):
    data = json.loads(lenet_calibration.read_text())
    assert data["precision"] == "int8" and data["method"] == "entropy"
    assert data["inputs"]["count"] == 320 and len(data["inputs"]["sha256"]) == 64
    assert len(data["model"]["prototxt_sha256"]) == 64 and len(data["model"]["weights_sha256"]) == 64
    (segment,) = data["segments"]
    assert segment["layers"][0] == "conv1" and len(segment["onnx_sha256"]) == 64
    lo, hi = segment["ranges"]["data"]
    assert lo <= 0.0 < hi <= 1.0  # the digits are scaled to [0, 1]
    assert not list(lenet_calibration.parent.glob(".*.tmp"))  # written atomically, nothing left over


@pytest.mark.parametrize("text, message", [
    ("{not json", "not a readable calibration file"),
    ('{"format": "something else"}', "not a hybrid_infer calibration file"),
    ('{"format": "hybrid_infer calibration", "version": 99}', "format version 99"),
    ('{"format": "hybrid_infer calibration", "version": 1, "precision": "int8"}', "damaged calibration file"),
])
def test_unreadable_calibration_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.calib.json"
    path.write_text(text)
    with pytest.raises(CalibrationError, match=message):
        lenet(calibration=path)
    with pytest.raises(CalibrationError, match="does not exist"):
        lenet(calibration=tmp_path / "missing.json")


def test_stale_calibration_is_refused_with_what_to_do(lenet_calibration, tmp_path):
    with pytest.raises(CalibrationError, match="weights differ .* run hybrid-infer calibrate again"):
        hybrid_infer.load(LENET / "deploy.prototxt", random_weights=3, calibration=lenet_calibration)
    edited = tmp_path / "deploy.prototxt"
    edited.write_text((LENET / "deploy.prototxt").read_text().replace("pool: MAX", "pool: AVE", 1))
    with pytest.raises(CalibrationError, match="different prototxt"):
        hybrid_infer.load(edited, LENET / "lenet_digits.caffemodel", calibration=lenet_calibration)
    # Other output blobs (run --check adds the logits) compute the same tensors: accepted.
    default_outputs = hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel",
                                        engine="onnxruntime", calibration=lenet_calibration)
    assert default_outputs.run({"data": digits()[2][:4]})["prob"].shape == (4, 10)
    # Same model and weights, another partition: the segment's ONNX is not the calibrated one.
    moved = lenet(calibration=lenet_calibration, fallback=["ip2"], min_segment_size=1)
    with pytest.raises(CalibrationError, match="stale: TensorRT segment 0 .* --min-segment-size 3"):
        moved.run({"data": digits()[2][:2]})


def test_keep_fp32_needs_a_calibration_and_known_layers(lenet_calibration):
    with pytest.raises(OptionError, match="needs --calibration"):
        lenet(keep_fp32=["conv1"])
    with pytest.raises(OptionError, match="--keep-fp32 conv9: no layer"):
        lenet(calibration=lenet_calibration, keep_fp32=["conv9"])


# --- calibration inputs through the hybrid ---------------------------------------------

def test_segment_inputs_made_by_caffe_upstream_are_calibrated(monkeypatch):
    """The TensorRT segment after a Python layer is calibrated on what Caffe produced."""
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))
    path = GRAPHS / "python_layer_positions/python_layer_start.prototxt"
    net = hybrid_infer.load(path, random_weights=int(RNG.integers(1 << 30)), engine="onnxruntime")
    assert [s.backend for s in net.partition.segments][-1] == TENSORRT and net.partition.segments[0].backend != TENSORRT
    x = 3 * RNG.standard_normal((12, 3, 32, 32)).astype(np.float32)
    calibration = calibrate(net, batches_of({"data": x}, 5), method="minmax")
    (segment,) = calibration.segments
    clipped = []
    for start in range(0, 12, 5):
        net.run_caffe({"data": x[start:start + 5]})
        clipped.append(_blob(net, "data_clipped"))
    clipped = np.concatenate(clipped)
    value = net.partition.segments[-1].inputs[0]
    lo, hi = segment.ranges[value]
    assert lo == pytest.approx(float(clipped.min()), rel=1e-6) and hi == pytest.approx(float(clipped.max()), rel=1e-6)
    assert max(abs(lo), abs(hi)) < 3.0  # SoftClip's limits, not the raw inputs' range


def _blob(net: hybrid_infer.HybridNet, name: str) -> np.ndarray:
    return np.array(net.model.reference_net().blobs[name].data, copy=True)


# --- Q/DQ placement ----------------------------------------------------------------------

def _qdq_model(net, calibration, target, keep=()):
    segment = net.partition.segments[0]
    fp32 = segment_onnx(net.graph, net.model, segment)
    entry = calibration.segment_for(onnx_digest(fp32))
    return quantize(prepare(fp32), entry.ranges, target, keep)


def test_tensorrt_placement_is_symmetric_and_on_inputs_of_weighted_layers_and_residual_adds(residual):
    _, net, calibration, _ = residual
    model = _qdq_model(net, calibration, QDQ_TENSORRT)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    quantized_inputs = collections.Counter()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = inits[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any()  # TensorRT: signed, zero point 0
        elif any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input):
            quantized_inputs[node.op_type] += 1
            if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
                weight_dq = producers[node.input[1]]
                axis = next((a.i for a in weight_dq.attribute if a.name == "axis"), 1)
                assert axis == (1 if node.op_type == "ConvTranspose" else 0)  # per output channel
                assert inits[weight_dq.input[1]].size > 1
                if len(node.input) > 2:
                    assert node.input[2] in inits  # bias left in FP32
    assert quantized_inputs == {"Conv": 2, "ConvTranspose": 1, "Gemm": 1, "Add": 1}
    # Every Q/DQ pair feeds only those layers: no Q/DQ after a layer for its own sake (TensorRT
    # fuses the pair into the consumer, and a convolution's output runs on in float).
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            (dq,) = consumers[node.output[0]]
            assert {c.op_type for c in consumers[dq.output[0]]} <= {"Conv", "ConvTranspose", "Gemm", "Add"}


def test_cpu_placement_runs_on_integer_kernels_and_stays_close(residual):
    _, net, calibration, x = residual
    model = _qdq_model(net, calibration, ONNXRUNTIME)
    ops = _ops_after_onnxruntime(model)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0
    int8 = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration)
    got, want = int8.run({"data": x}), net.run_caffe({"data": x})
    assert 1e-4 < relative_l2(got["fc"], want["fc"]) < 0.1


def test_keep_fp32_layers_get_no_qdq(residual):
    """Kept layers compute with FP32 weights on float inputs; on the CPU an input stays 8-bit
    where ONNX Runtime folded the producer's ReLU into the quantization (it does the clipping)."""
    _, net, calibration, _ = residual
    for target in (QDQ_TENSORRT, ONNXRUNTIME):
        model = _qdq_model(net, calibration, target, keep={"conv2", "fc"})
        producers = {out: n for n in model.graph.node for out in n.output}
        for node in model.graph.node:
            if node.doc_string in ("conv2", "fc") and node.op_type in ("Conv", "Gemm"):
                checked = node.input if target == QDQ_TENSORRT else node.input[1:]
                assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear"
                           for i in checked), (target, node.name)
    kept = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration, keep_fp32=["Convolution"])
    assert kept.precision.keep_fp32 == {"conv1", "conv2"}


# --- TensorRT-RTX builds --------------------------------------------------------------

def test_tensorrt_rtx_builds_int8_engines_cached_apart_from_fp32(residual, tmp_path):
    api = rtx()
    _, net, calibration, _ = residual
    int8 = _qdq_model(net, calibration, QDQ_TENSORRT)
    fp32 = segment_onnx(net.graph, net.model, net.partition.segments[0])
    cache, settings = EngineCache(tmp_path), BuildSettings(batch_max=4, workspace_bytes=64 << 20)
    built, lookup = cache.get_or_build(int8, settings, api=api, label="int8")
    assert not lookup.hit and built.plan_size > 1000
    types = collections.Counter(layer["type"] for layer in built.network_layers)
    assert types["QUANTIZE"] >= 4 and types["DEQUANTIZE"] >= 4
    assert {c for layer in built.network_layers for c in layer["caffe_layers"]} >= {"conv1", "conv2", "up", "fc"}
    _, fp32_lookup = cache.get_or_build(fp32, settings, api=api, label="fp32")
    assert not fp32_lookup.hit and fp32_lookup.key != lookup.key
    _, again = cache.get_or_build(int8, settings, api=api, label="int8")
    assert again.hit and again.key == lookup.key


def test_tensorrt_rtx_int8_resnet_block_is_smaller_than_fp32(tmp_path, make_prototxt):
    """A plan from Q/DQ ONNX stores INT8 weights: a weight-heavy net's plan shrinks."""
    api = rtx()
    path = make_prototxt(RESIDUAL_NET.replace("num_output: 10", "num_output: 2000"), "wide")  # 18 MiB of FP32
    net = hybrid_infer.load(path, random_weights=7, engine="onnxruntime")
    calibration = calibrate(net, batches_of({"data": RNG.standard_normal((4, 3, 12, 12)).astype(np.float32)}, 4),
                            method="minmax")
    cache = EngineCache(tmp_path)
    fp32, _ = cache.get_or_build(segment_onnx(net.graph, net.model, net.partition.segments[0]), api=api)
    int8, _ = cache.get_or_build(_qdq_model(net, calibration, QDQ_TENSORRT), api=api)
    assert int8.plan_size < 0.6 * fp32.plan_size


# --- FP16 ------------------------------------------------------------------------------

def test_fp16_calibration_runs_half_precision_and_builds(residual, tmp_path):
    _, net, _, x = residual
    calibration = calibrate(net, batches_of({"data": x}, 8), precision="fp16")
    assert calibration.method is None and calibration.segments[0].ranges
    half = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration, keep_fp32=["fc"])
    model = half.precision.segment_model(segment_onnx(net.graph, net.model, net.partition.segments[0]),
                                         net.partition.segments[0], "onnxruntime")
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types.values()
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [onnx.TensorProto.FLOAT] * 2
    got, want = half.run({"data": x}), net.run_caffe({"data": x})
    assert 1e-6 < relative_l2(got["fc"], want["fc"]) < 1e-2
    built, _ = EngineCache(tmp_path).get_or_build(model, api=rtx())
    assert built.plan_size > 1000


# --- per-layer precision by measured sensitivity -----------------------------------------

def test_sensitivity_search_keeps_layers_until_the_target_is_met(lenet_calibration):
    x = digits()[2][:64]
    net = lenet()
    reference = net.run_caffe({"data": x})
    calibration = load_calibration(lenet_calibration)
    plan = lenet(calibration=calibration).precision
    all_int8 = lenet(calibration=calibration).run({"data": x})
    start = relative_l2(all_int8["ip2"], reference["ip2"])
    target = AccuracyTarget("rel_l2", start / 3)
    make = lambda p: hybrid_infer.HybridNet(net.model, engine="onnxruntime", outputs=["ip2"], calibration=p)
    report = search(plan, make, {"data": x}, {"ip2": reference["ip2"]}, target,
                    layers=net.partition.segments[0].layers, runs=2)
    assert set(report.sensitivity) == {"conv1", "conv2", "ip1", "ip2"}
    assert report.met and report.kept
    assert report.steps[-1].rel_l2 <= target.value < report.steps[0].rel_l2
    ranked = sorted(report.sensitivity, key=lambda name: -report.sensitivity[name])
    assert report.kept == ranked[:len(report.kept)]  # most sensitive first
    assert all(s.latency_ms > 0 for s in report.steps) and "kept in FP32" in report.to_text()


@pytest.mark.parametrize("text", ["rel_l2", "top1=1.5", "accuracy=0.9", "rel_l2=-1", "rel_l2=x"])
def test_bad_accuracy_targets_are_option_errors(text):
    with pytest.raises(OptionError, match="--accuracy-target"):
        parse_target(text)


# --- the command line, as a user runs it -----------------------------------------------

def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", *args], capture_output=True,
                          text=True, check=check, cwd=REPO)


def test_calibrate_then_run_build_and_compare(tmp_path):
    x_train = digits()[0]
    np.save(tmp_path / "train.npy", x_train[:96])
    model = [str(LENET / "deploy.prototxt"), "--weights", str(LENET / "lenet_digits.caffemodel")]
    calib = tmp_path / "lenet.calib.json"
    proc = cli("calibrate", *model, "--input", str(tmp_path / "train.npy"), "--method", "minmax",
               "--calibration-batch", "32", "-o", str(calib))
    assert "INT8 minmax (onnxruntime) against Caffe FP32 on 96 input(s)" in proc.stdout and calib.is_file()
    samples = sorted(map(str, (LENET / "samples").glob("*.png")))
    proc = cli("run", *model, "--input", *samples, "--scale", "0.00392156862745098", "--calibration", str(calib),
               "--top", "1")
    assert "precision INT8 minmax" in proc.stdout
    for i, sample in enumerate(samples):
        assert f"[{i}] {Path(sample).name}: {Path(sample).stem.split('_')[1]} (" in proc.stdout
    if _rtx_importable():
        proc = cli("build", *model, "--calibration", str(calib), "--engine-cache", str(tmp_path / "engines"),
                   "--tensorrt-module", "tensorrt_rtx")
        assert "INT8 minmax" in proc.stdout and "built in" in proc.stdout
    proc = cli("compare", *model, "--input", *samples, "--scale", "0.00392156862745098", "--partition", "caffe",
               "--partition", "profile=tensorrt,min=3", "--calibration", str(calib), "--runs", "2", "--warmup", "1")
    assert "[INT8 minmax]" in proc.stdout and proc.returncode == 0
    proc = cli("run", str(LENET / "deploy.prototxt"), "--random-weights", "1", "--calibration", str(calib), check=False)
    assert proc.returncode == 2 and "stale" in proc.stderr and "Traceback" not in proc.stderr


def _rtx_importable() -> bool:
    try:
        trt_api.load("tensorrt_rtx")
        return True
    except EnvironmentProblem:
        return False


def test_calibrate_with_an_accuracy_target_keeps_sensitive_layers(tmp_path):
    x_train, _, x_test, _ = digits()
    np.save(tmp_path / "train.npy", x_train[:64])
    np.save(tmp_path / "eval.npy", x_test[:96])
    model = [str(LENET / "deploy.prototxt"), "--weights", str(LENET / "lenet_digits.caffemodel")]
    calib = tmp_path / "auto.calib.json"
    proc = cli("calibrate", *model, "--input", str(tmp_path / "train.npy"), "--eval-input", str(tmp_path / "eval.npy"),
               "--method", "minmax", "--output-blob", "ip2", "--accuracy-target", "rel_l2=0.003", "--runs", "1",
               "-o", str(calib), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "accuracy target rel_l2<=0.003: met" in proc.stdout and "(FP32 hybrid)" in proc.stdout
    saved = json.loads(calib.read_text())
    assert set(saved["keep_fp32"]) == {s["kept"] for s in saved["sensitivity"]["steps"] if s["kept"]}
    assert saved["sensitivity"]["steps"][-1]["rel_l2"] <= 0.003 < saved["sensitivity"]["steps"][0]["rel_l2"]
    proc = cli("run", *model, "--output-blob", "ip2", "--input", str(tmp_path / "eval.npy"), "--calibration", str(calib))
    assert f"kept in FP32: {', '.join(sorted(saved['keep_fp32']))}" in proc.stdout
