"""Reduced precision: calibration on real inputs, the calibration file, Q/DQ placement, INT8
and FP16 engines (ONNX Runtime runs them here, TensorRT-RTX builds them), per-layer precision.

Everything runs for real: pycaffe for the reference, ONNX Runtime's calibrators and
quantizer, ONNX Runtime sessions, the TensorRT-RTX builder. Accuracy is measured with the
bundled LeNet's trained weights on scikit-learn's digits (calibrated on training digits,
evaluated on the test split). The command line is tested in test_precision_cli.py.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
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
from hybrid_infer.errors import CalibrationError, EnvironmentProblem, InputError, OptionError
from hybrid_infer.executor.engine_factory import segment_onnx
from hybrid_infer.metrics import relative_l2
from hybrid_infer.partition.partitioner import TENSORRT
from hybrid_infer.precision.calibrate import batches_of, calibrate
from hybrid_infer.precision.calibration_file import load_calibration
from hybrid_infer.precision.qdq import prepare
from hybrid_infer.precision.ranges import RangeCollector
from hybrid_infer.precision.sensitivity import AccuracyTarget, measuring_points, parse_target, search

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

#: Eltwise PROD beside a residual Add, a weighted Eltwise SUM of two InnerProducts (logits),
#: LRN, a grouped convolution, Concat of a Deconvolution and a convolution, and a Softmax.
MIXED_NET = """
name: "mixed"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "add" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "add" }
layer { name: "relu3" type: "ReLU" bottom: "add" top: "add" }
layer { name: "pool" type: "Pooling" bottom: "add" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "deconv" type: "Deconvolution" bottom: "pool" top: "deconv" convolution_param { num_output: 4 kernel_size: 2 stride: 2 } }
layer { name: "dw" type: "Convolution" bottom: "add" top: "dw" convolution_param { num_output: 8 group: 8 kernel_size: 3 pad: 1 } }
layer { name: "cat" type: "Concat" bottom: "deconv" bottom: "dw" top: "cat" }
layer { name: "prod" type: "Eltwise" bottom: "dw" bottom: "add" top: "prod" eltwise_param { operation: PROD } }
layer { name: "lrn" type: "LRN" bottom: "cat" top: "lrn" }
layer { name: "gpool" type: "Pooling" bottom: "lrn" top: "gpool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gpool" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "fc2" type: "InnerProduct" bottom: "prod" top: "fc2" inner_product_param { num_output: 10 } }
layer { name: "sum2" type: "Eltwise" bottom: "fc" bottom: "fc2" top: "sum2" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "prob" type: "Softmax" bottom: "sum2" top: "prob" }
"""

#: A grouped Deconvolution: weights 8 x (8/group) x 4 x 4.
GROUPED_DECONV = """
name: "gdeconv"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "up" type: "Deconvolution" bottom: "conv1" top: "up"
        convolution_param { num_output: 8 group: GROUP kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "conv2" type: "Convolution" bottom: "up" top: "conv2" convolution_param { num_output: 4 kernel_size: 1 } }
"""

#: FSRCNN's pattern: convolutions followed by PReLU, then a Deconvolution.
PRELU_NET = """
name: "prelu"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "prelu2" type: "PReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "prelu3" type: "PReLU" bottom: "conv3" top: "conv3" }
layer { name: "deconv" type: "Deconvolution" bottom: "conv3" top: "deconv" convolution_param { num_output: 1 kernel_size: 9 stride: 3 pad: 4 } }
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


def random_net(make_prototxt, text: str, name: str, shape: tuple[int, ...], method: str = "minmax", **load):
    """A net with fresh random weights, fresh random inputs, and its calibration on them."""
    path = make_prototxt(text, name)
    net = hybrid_infer.load(path, random_weights=int(RNG.integers(1 << 30)), engine="onnxruntime", **load)
    x = RNG.standard_normal(shape).astype(np.float32)
    return net, calibrate(net, batches_of({"data": x}, 8), method=method), x


@pytest.fixture
def residual(make_prototxt):
    """A small net with BatchNorm+Scale, a residual Eltwise, Deconvolution and InnerProduct."""
    return random_net(make_prototxt, RESIDUAL_NET, "residual", (16, 3, 12, 12))


def rtx() -> trt_api.TrtApi:
    try:
        return trt_api.load("tensorrt_rtx")
    except EnvironmentProblem as exc:
        pytest.skip(str(exc))


def placed(net, calibration, target, keep=(), **kwargs) -> onnx.ModelProto:
    """The ONNX the plan gives ``target`` for ``net``'s first segment, as the engine factory asks."""
    planned = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration, keep_fp32=keep,
                                     **kwargs)
    segment = planned.partition.segments[0]
    return planned.precision.segment_model(segment_onnx(planned.graph, planned.model, segment), segment, target)


def _ops_after_onnxruntime(model: onnx.ModelProto) -> collections.Counter:
    """Operator types of ``model`` after ONNX Runtime's graph optimizations (what it executes)."""
    import tempfile

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def graph_maps(model: onnx.ModelProto):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    return inits, producers, consumers


def dequantized(producers, name: str) -> bool:
    return producers.get(name) is not None and producers[name].op_type == "DequantizeLinear"


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
    record = int8_net.precision.applied[0]
    assert _ops_after_onnxruntime(record.model)["QLinearConv"] == 2  # ONNX Runtime's integer convolutions
    kernels, floating = record.integer_kernels()
    assert kernels["QLinearConv"] == 2 and floating == ["ip2"]  # ip2 writes the float logits


# --- the calibration file --------------------------------------------------------------

def test_calibration_file_records_what_it_belongs_to(lenet_calibration):
    data = json.loads(lenet_calibration.read_text())
    assert data["version"] == 2 and data["precision"] == "int8" and data["method"] == "entropy"
    assert data["inputs"]["count"] == 320 and len(data["inputs"]["sha256"]) == 64
    assert len(data["model"]["prototxt_sha256"]) == 64 and len(data["model"]["weights_sha256"]) == 64
    assert data["model"]["input_shapes"] == {"data": [1, 1, 16, 16]}
    (segment,) = data["segments"]
    assert segment["layers"][0] == "conv1" and len(segment["onnx_sha256"]) == 64
    lo, hi = segment["ranges"]["data"]
    assert lo == 0.0 < hi <= 1.0  # the digits are scaled to [0, 1]
    assert all(lo <= 0 <= hi for lo, hi in segment["ranges"].values())  # every range contains 0
    assert not list(lenet_calibration.parent.glob(".*.tmp"))  # written atomically, nothing left over


@pytest.mark.parametrize("text, message", [
    ("{not json", "not a readable calibration file"),
    ('{"format": "something else"}', "not a hybrid_infer calibration file"),
    ('{"format": "hybrid_infer calibration", "version": 1}', "format version 1 is not 2"),
    ('{"format": "hybrid_infer calibration", "version": 2, "precision": "int8"}', "'segments' is missing"),
])
def test_unreadable_calibration_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.calib.json"
    path.write_text(text)
    with pytest.raises(CalibrationError, match=message):
        lenet(calibration=path)
    with pytest.raises(CalibrationError, match="does not exist"):
        lenet(calibration=tmp_path / "missing.json")


def edited(path: Path, tmp_path: Path, edit) -> Path:
    """A copy of calibration file ``path`` after ``edit(data)``, as a hand edit would make it."""
    data = json.loads(path.read_text())
    edit(data)
    out = tmp_path / f"edited{len(list(tmp_path.iterdir()))}.json"
    out.write_text(json.dumps(data))
    return out


def set_range(tensor: str, value):
    def edit(data):
        data["segments"][0]["ranges"][tensor] = value
    return edit


@pytest.mark.parametrize("tensor, value, message", [
    ("conv1@relu1", "nan", "not finite"),
    ("conv1@relu1", [0.0, "inf"], "not finite"),
    ("conv1@relu1", [-1e30, 1e30], "outside the magnitudes"),
    ("conv1@relu1", [-1e-30, 1e-30], "outside the magnitudes"),
    ("data", [-5.0, -1.0], "does not contain 0"),
    ("conv1@relu1", [5.0, -5.0], "lowest above its highest"),
    ("conv1@relu1", [True, 3], "not a pair of numbers"),
    ("conv1@relu1", ["a", "b"], "not a pair of numbers"),
    ("conv1@relu1", [0, 1, 2], "not a pair"),
    ("conv1@relu1", [1.0], "not a pair"),
])
def test_impossible_ranges_are_refused_naming_the_tensor(lenet_calibration, tmp_path, tensor, value, message):
    """Findings 4 and 5: a hand-edited range that no calibration writes is refused on loading."""
    value = [math.nan, math.nan] if value == "nan" else [math.inf if v == "inf" else v for v in value]
    path = edited(lenet_calibration, tmp_path, set_range(tensor, value))
    with pytest.raises(CalibrationError, match=f"range of tensor '{tensor}' .*{message}.*calibrate again"):
        load_calibration(path)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["segments"][0].__setitem__("ranges", [1, 2]), "'ranges' must be an object, not a list"),
    (lambda d: d.__setitem__("keep_fp32", "conv1"), "'keep_fp32' must be a list, not a string"),
    (lambda d: d.__setitem__("partition", "x"), "'partition' must be an object"),
    (lambda d: d.__setitem__("method", None), "method 'None' is not one of"),
])
def test_wrongly_typed_fields_are_refused_with_one_mention_of_the_file(lenet_calibration, tmp_path, edit, message):
    path = edited(lenet_calibration, tmp_path, edit)
    with pytest.raises(CalibrationError, match=message) as raised:
        load_calibration(path)
    assert str(raised.value).count(str(path)) == 1  # finding 16: the path once, not twice


def test_a_deleted_or_foreign_tensor_is_named(lenet_calibration, tmp_path, caplog):
    def delete(data):
        del data["segments"][0]["ranges"]["conv1@relu1"]
    missing = lenet(calibration=edited(lenet_calibration, tmp_path, delete))
    with pytest.raises(CalibrationError, match="needs a range for tensor 'conv1@relu1', which the file lacks"):
        missing.run({"data": digits()[2][:2]})
    extra = lenet(calibration=edited(lenet_calibration, tmp_path, set_range("no_such_tensor", [0, 1])))
    extra.run({"data": digits()[2][:2]})
    assert "ignoring the ranges of 1 tensor(s) that segment 0 does not have: no_such_tensor" in caplog.text

    def junk(data):
        data["segments"][0]["ranges"].update({f"junk{i}": [0, 1] for i in range(3000)})
    many = lenet(calibration=edited(lenet_calibration, tmp_path, junk))
    with pytest.raises(CalibrationError, match="ranges for 3000 others .* not a calibration of this model"):
        many.run({"data": digits()[2][:2]})


def test_oversized_calibration_files_are_refused_unread(tmp_path):
    """Finding 18: a file beyond 64 MiB is not parsed (its size alone says it is not one)."""
    path = tmp_path / "huge.calib.json"
    with open(path, "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(CalibrationError, match="more than the 67108864 this can be"):
        load_calibration(path)


def test_stale_calibration_is_refused_with_what_to_do(lenet_calibration, tmp_path):
    with pytest.raises(CalibrationError, match="weights differ .* run hybrid-infer calibrate again"):
        hybrid_infer.load(LENET / "deploy.prototxt", random_weights=3, calibration=lenet_calibration)
    edited_model = tmp_path / "deploy.prototxt"
    edited_model.write_text((LENET / "deploy.prototxt").read_text().replace("pool: MAX", "pool: AVE", 1))
    with pytest.raises(CalibrationError, match="different prototxt"):
        hybrid_infer.load(edited_model, LENET / "lenet_digits.caffemodel", calibration=lenet_calibration)
    # Finding 16: only the input shape changed: the shapes are named, and the option.
    with pytest.raises(CalibrationError, match=r"calibrated for input shape data=1x1x16x16, .* now has "
                                               r"data=1x1x20x20 \(--input-shape\)"):
        hybrid_infer.load(LENET / "deploy.prototxt", random_weights=1,  # the trained ip1 fits 16x16 only
                          input_shapes={"data": (1, 1, 20, 20)}, calibration=lenet_calibration)
    # Only the batch changed: ranges do not depend on it, so the file serves (review of issue 12).
    batch4 = hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", engine="onnxruntime",
                               input_shapes={"data": (4, 1, 16, 16)}, calibration=lenet_calibration)
    assert batch4.run({"data": digits()[2][:4]})["prob"].shape == (4, 10)
    # Other output blobs (run --check adds the logits) compute the same tensors: accepted.
    default_outputs = hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel",
                                        engine="onnxruntime", calibration=lenet_calibration)
    assert default_outputs.run({"data": digits()[2][:4]})["prob"].shape == (4, 10)
    # Same model and weights, another partition: the segment's ONNX is not the calibrated one.
    moved = lenet(calibration=lenet_calibration, fallback=["ip2"], min_segment_size=1)
    with pytest.raises(CalibrationError, match="stale: TensorRT segment 0 .* --min-segment-size 3"):
        moved.run({"data": digits()[2][:2]})


def test_segment_number_is_not_part_of_the_identity(lenet_calibration):
    """Finding 16: the same segment under another number (other segments moved) is not stale."""
    net = lenet(calibration=lenet_calibration)
    segment = net.partition.segments[0]
    renumbered = dataclasses.replace(segment, id=7)
    model = net.precision.segment_model(segment_onnx(net.graph, net.model, renumbered), renumbered, "onnxruntime")
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_keep_fp32_needs_a_calibration_and_known_layers(lenet_calibration):
    with pytest.raises(OptionError, match="needs --calibration"):
        lenet(keep_fp32=["conv1"])
    with pytest.raises(OptionError, match="--keep-fp32 conv9: no layer"):
        lenet(calibration=lenet_calibration, keep_fp32=["conv9"])
    # Finding 16: a string is not read letter by letter; a calibration of another type is an OptionError.
    with pytest.raises(OptionError, match="keep_fp32 must be a list of layer names or types, not str"):
        lenet(calibration=lenet_calibration, keep_fp32="conv1")
    with pytest.raises(OptionError, match="calibration must be a calibration file's path .* not int 42"):
        lenet(calibration=42)
    with pytest.raises(OptionError, match="fp16 build settings with a calibration"):
        lenet(calibration=lenet_calibration, build_settings=BuildSettings(fp16=True))


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
    assert lo == pytest.approx(min(float(clipped.min()), 0), rel=1e-6)
    assert hi == pytest.approx(max(float(clipped.max()), 0), rel=1e-6)
    assert max(abs(lo), abs(hi)) < 3.0  # SoftClip's limits, not the raw inputs' range


def _blob(net: hybrid_infer.HybridNet, name: str) -> np.ndarray:
    return np.array(net.model.reference_net().blobs[name].data, copy=True)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_nan_or_inf_in_calibration_inputs_is_a_clear_error(method):
    """Finding 4: each calibrator failed on NaN/Inf with its own message ("scale issue",
    "range ... is not finite"); now one InputError naming the input, or the tensor inside."""
    x = digits()[0][:16].copy()
    x[5, 0, 3, 3] = np.nan if method != "entropy" else np.inf
    with pytest.raises(InputError, match=r"calibration input 'data' holds NaN or Inf \(item 5\)"):
        calibrate(lenet(), batches_of({"data": x}, 8), method=method)
    huge = np.full((4, 1, 16, 16), 3e38, dtype=np.float32)  # finite, but conv1 overflows to inf
    with pytest.raises(InputError, match=r"tensor '[\w@/]+' of segment 0 holds NaN or Inf on the calibration inputs"):
        calibrate(lenet(), batches_of({"data": huge}, 4), method=method)


def test_entropy_threshold_search_reports_progress():
    """Finding 19: the slow part of entropy calibration ticks once per tensor."""
    net = lenet()
    segment = net.partition.segments[0]
    prepared = prepare(segment_onnx(net.graph, net.model, segment))
    collector = RangeCollector(prepared, "entropy")
    try:
        collector.add({"data": digits()[0][:32]})
        ticks = []
        ranges = collector.ranges(lambda: ticks.append(1))
    finally:
        collector.close()
    assert len(ticks) == len(ranges) == collector.tensor_count > 5


# --- Q/DQ placement ----------------------------------------------------------------------

def test_tensorrt_placement_quantizes_weighted_inputs_and_only_the_residual_input(residual):
    """Finding 11: TensorRT fuses Conv + residual Add only when the convolution's input to the
    Add is not quantized; Q/DQ goes on the other (residual) input."""
    net, calibration, _ = residual
    model = placed(net, calibration, "tensorrt")
    inits, producers, consumers = graph_maps(model)
    quantized_inputs = collections.Counter()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = inits[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any()  # TensorRT: signed, zero point 0
        elif any(dequantized(producers, i) for i in node.input):
            quantized_inputs[node.op_type] += 1
            if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
                weight_dq = producers[node.input[1]]
                axis = next((a.i for a in weight_dq.attribute if a.name == "axis"), 1)
                assert axis == (1 if node.op_type == "ConvTranspose" else 0)  # per output channel
                channels = inits[node.input[1] if node.input[1] in inits else weight_dq.input[0]].shape[axis]
                assert inits[weight_dq.input[1]].size == channels  # one scale per output channel
                if len(node.input) > 2:
                    assert node.input[2] in inits  # bias left in FP32
    assert quantized_inputs == {"Conv": 2, "ConvTranspose": 1, "Gemm": 1, "Add": 1}
    (add,) = [n for n in model.graph.node if n.op_type == "Add" and n.doc_string == "sum"]
    residual_input, conv_input = add.input
    assert dequantized(producers, residual_input) and producers[conv_input].op_type == "Conv"
    for node in model.graph.node:  # Q/DQ pairs only feed those layers, never follow them for their own sake
        if node.op_type == "QuantizeLinear":
            (dq,) = consumers[node.output[0]]
            assert {c.op_type for c in consumers[dq.output[0]]} <= {"Conv", "ConvTranspose", "Gemm", "Add"}


def test_tensorrt_placement_leaves_products_and_weighted_sums_in_high_precision(make_prototxt):
    """Finding 11: an Eltwise PROD reads float tensors (the quantizer had rewired it to a pair
    it made for the residual Add), and a SUM of two InnerProducts with coefficients (logits)
    is no residual Add: no Q/DQ there."""
    net, calibration, _ = random_net(make_prototxt, MIXED_NET, "mixed", (8, 3, 16, 16))
    model = placed(net, calibration, "tensorrt")
    _, producers, _ = graph_maps(model)
    by_layer = collections.defaultdict(list)
    for node in model.graph.node:
        by_layer[node.doc_string].append(node)
    for layer in ("prod", "sum2", "lrn", "cat", "prob"):
        for node in by_layer[layer]:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                assert not any(dequantized(producers, i) for i in node.input), (layer, node.name)
    (add,) = [n for n in by_layer["add"] if n.op_type == "Add"]
    assert [dequantized(producers, i) for i in add.input] == [True, False]  # conv2's input fuses


def test_cpu_placement_runs_on_integer_kernels_and_stays_close(residual):
    net, calibration, x = residual
    model = placed(net, calibration, "onnxruntime")
    ops = _ops_after_onnxruntime(model)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0
    int8 = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration)
    got, want = int8.run({"data": x}), net.run_caffe({"data": x})
    assert 1e-4 < relative_l2(got["fc"], want["fc"]) < 0.1


def test_cpu_placement_fuses_convolutions_before_prelu_and_says_what_stays_float(make_prototxt):
    """Finding 12: Conv -> PReLU (FSRCNN) now keeps the convolution's output quantized, so ONNX
    Runtime fuses every convolution into QLinearConv; the ConvTranspose, which has no CPU
    integer kernel, is reported as float, from ONNX Runtime's own optimized graph."""
    net, calibration, x = random_net(make_prototxt, PRELU_NET, "prelu", (4, 1, 16, 16))
    int8 = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration)
    got, want = int8.run({"data": x}), net.run_caffe({"data": x})
    assert 1e-4 < relative_l2(got["deconv"], want["deconv"]) < 0.1
    kernels, floating = int8.precision.applied[0].integer_kernels()
    assert kernels == {"QLinearConv": 3} and floating == ["deconv"]
    assert _ops_after_onnxruntime(int8.precision.applied[0].model)["Conv"] == 0


def test_segment_outputs_leave_in_fp32_also_after_a_folded_relu(lenet_calibration):
    """Finding 13: a segment output that a ReLU writes, and that an INT8 layer inside reads, is
    the float result (many more than 256 levels, clipped at 0), not the 8-bit one."""
    x = digits()[2][:32]
    net = hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", engine="onnxruntime",
                            outputs=["conv1", "prob"])
    reference = net.run_caffe({"data": x})
    calibration = calibrate(net, batches_of({"data": x}, 16), method="minmax")
    got = hybrid_infer.HybridNet(net.model, engine="onnxruntime", outputs=["conv1", "prob"],
                                 calibration=calibration).run({"data": x})
    assert len(np.unique(got["conv1"])) > 1000 and got["conv1"].min() == 0.0
    assert 1e-4 < relative_l2(got["conv1"], reference["conv1"]) < 0.02


def test_grouped_deconvolution_stays_fp32_instead_of_sharing_scales(make_prototxt, tmp_path):
    """Finding 3: ConvTranspose weights are C_in x C_out/group x k x k, so with groups (4, and
    group == channels) no axis has one slice per output channel: the layer stays FP32 (no Q/DQ
    on its weights), both placements build and run, close to Caffe."""
    for group in (4, 8):
        net, calibration, x = random_net(make_prototxt, GROUPED_DECONV.replace("GROUP", str(group)),
                                         f"gdeconv{group}", (6, 3, 16, 16))
        int8 = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration)
        got, want = int8.run({"data": x}), net.run_caffe({"data": x})
        assert 1e-4 < relative_l2(got["conv2"], want["conv2"]) < 0.1
        assert "grouped Deconvolution" in int8.precision.applied[0].also_fp32["up"]
        model = placed(net, calibration, "tensorrt")
        _, producers, _ = graph_maps(model)
        (deconv,) = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
        assert not any(dequantized(producers, i) for i in deconv.input)
        if group == 8:
            built, _ = EngineCache(tmp_path).get_or_build(model, api=rtx())
            assert built.plan_size > 1000


def test_keep_fp32_restores_fp32_on_the_cpu_with_the_neighbours(make_prototxt):
    """Finding 9: keeping every quantizable layer gives back the FP32 result (ReLU, pooling and
    Concat around them no longer stay 8-bit), and a kept layer's output reaches the next kept
    layer through FP32 pooling, not an 8-bit copy."""
    net, calibration, x = random_net(make_prototxt, MIXED_NET, "mixed", (8, 3, 16, 16))
    want = net.run_caffe({"data": x})
    every = ["Convolution", "Deconvolution", "InnerProduct", "Eltwise"]
    kept = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration, keep_fp32=every)
    assert relative_l2(kept.run({"data": x})["prob"], want["prob"]) < 1e-5
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in kept.precision.applied[0].model.graph.node)
    model = placed(net, calibration, "onnxruntime", keep=["conv1", "conv2", "add", "deconv"])
    _, producers, _ = graph_maps(model)
    for node in model.graph.node:  # after kept layers, up to a kept Deconvolution: float all the way
        if node.doc_string in ("relu3", "pool", "deconv") and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            assert not any(dequantized(producers, i) for i in node.input), node.name
    assert any(n.doc_string == "dw" and n.op_type == "QuantizeLinear" for n in model.graph.node)  # dw is INT8


# --- TensorRT-RTX builds --------------------------------------------------------------

def test_tensorrt_rtx_builds_int8_engines_cached_apart_from_fp32(residual, tmp_path):
    api = rtx()
    net, calibration, _ = residual
    int8 = placed(net, calibration, "tensorrt")
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


def test_tensorrt_rtx_builds_the_mixed_placement(make_prototxt, tmp_path):
    net, calibration, _ = random_net(make_prototxt, MIXED_NET, "mixed", (8, 3, 16, 16))
    built, _ = EngineCache(tmp_path).get_or_build(placed(net, calibration, "tensorrt"), api=rtx())
    assert built.plan_size > 1000


def test_tensorrt_rtx_int8_resnet_block_is_smaller_than_fp32(tmp_path, make_prototxt):
    """A plan from Q/DQ ONNX stores INT8 weights: a weight-heavy net's plan shrinks."""
    api = rtx()
    net, calibration, _ = random_net(make_prototxt, RESIDUAL_NET.replace("num_output: 10", "num_output: 2000"),
                                     "wide", (4, 3, 12, 12))  # 18 MiB of FP32
    cache = EngineCache(tmp_path)
    fp32, _ = cache.get_or_build(segment_onnx(net.graph, net.model, net.partition.segments[0]), api=api)
    int8, _ = cache.get_or_build(placed(net, calibration, "tensorrt"), api=api)
    assert int8.plan_size < 0.6 * fp32.plan_size


# --- FP16 ------------------------------------------------------------------------------

def test_fp16_runs_fp16_activations_on_the_cpu_and_builds_for_tensorrt(residual, tmp_path):
    """Finding 7: ONNX Runtime's CPU provider runs an FP16 model in FP32 ("precision free"
    casts); the CPU now rounds every activation to FP16, so values beyond 65504 overflow as
    in a real FP16 engine, and outputs lie on FP16's grid. TensorRT gets the FP16 model."""
    net, _, x = residual
    calibration = calibrate(net, batches_of({"data": x}, 8), precision="fp16")
    assert calibration.method is None and calibration.segments[0].ranges
    half = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration)
    got, want = half.run({"data": x}), net.run_caffe({"data": x})
    assert 1e-6 < relative_l2(got["fc"], want["fc"]) < 1e-2
    assert np.array_equal(got["fc"], got["fc"].astype(np.float16).astype(np.float32))
    big = beyond_fp16(net, x)  # far beyond the calibration: FP16 overflows, FP32 does not
    assert np.isfinite(net.run_caffe({"data": big})["fc"]).all() and not np.isfinite(half.run({"data": big})["fc"]).all()
    trt = placed(net, calibration, "tensorrt")
    assert onnx.TensorProto.FLOAT16 in {i.data_type for i in trt.graph.initializer}
    assert [v.type.tensor_type.elem_type for v in (*trt.graph.input, *trt.graph.output)] == [onnx.TensorProto.FLOAT] * 2
    built, _ = EngineCache(tmp_path).get_or_build(trt, api=rtx())
    assert built.plan_size > 1000


def beyond_fp16(net: hybrid_infer.HybridNet, x: np.ndarray) -> np.ndarray:
    """``x`` scaled so that the largest FP32 activation is about 4 x FP16's 65504."""
    values = net.run_caffe_values({"data": x}, [v for v in net.graph.values if v not in net.graph.inputs])
    return x * np.float32(4 * 65504 / max(float(np.abs(v).max()) for v in values.values()))


def test_fp16_keeps_the_layers_around_overflowing_tensors_in_fp32(residual):
    """Finding 7: calibrated on inputs whose activations exceed FP16's range, the layers that
    write or read those tensors stay FP32 (the ReLU and pooling between kept convolutions too),
    so the result is finite and close to Caffe instead of NaN."""
    net, _, x = residual
    big = beyond_fp16(net, x)
    calibration = calibrate(net, batches_of({"data": big}, 8), precision="fp16")
    half = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration)
    got, want = half.run({"data": big}), net.run_caffe({"data": big})
    assert np.isfinite(got["fc"]).all() and relative_l2(got["fc"], want["fc"]) < 1e-2
    also = half.precision.applied[0].also_fp32
    assert any("beyond FP16's range" in why for why in also.values())


# --- per-layer precision by measured sensitivity -----------------------------------------

def checked_reference(net: hybrid_infer.HybridNet, x: np.ndarray) -> dict[str, np.ndarray]:
    """Pure Caffe on the values the search compares: checked values and measuring points."""
    return net.run_caffe_values({"data": x}, list(dict.fromkeys([*net.checked_values(), *measuring_points(net)])))


def test_sensitivity_search_keeps_layers_until_the_target_on_the_logits_is_met(lenet_calibration):
    """Finding 8: judged on every Softmax's input (the logits), not the saturated probabilities."""
    x = digits()[2][:64]
    net = hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", engine="onnxruntime")
    reference = checked_reference(net, x)
    calibration = load_calibration(lenet_calibration)
    plan = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration).precision
    int8 = hybrid_infer.HybridNet(net.model, engine="onnxruntime", outputs=["ip2", "prob"],
                                  calibration=calibration).run({"data": x})
    logits_error = relative_l2(int8["ip2"], reference["ip2"])
    probabilities_error = relative_l2(int8["prob"], reference["prob"])
    assert probabilities_error < logits_error  # saturated probabilities hide part of it
    target = AccuracyTarget("rel_l2", (probabilities_error + logits_error) / 2)
    make = lambda p: hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=p, keep_logits=True)
    report = search(plan, make, {"data": x}, reference, target, layers=net.partition.segments[0].layers, runs=2)
    assert set(report.sensitivity) == {"conv1", "conv2", "ip1", "ip2"}
    assert report.steps[0].rel_l2 == pytest.approx(logits_error, rel=1e-3)
    assert report.met and report.kept and report.floor.rel_l2 < 1e-5
    best = [s for s in report.steps if not s.skipped][-1]
    assert best.rel_l2 <= target.value < report.steps[0].rel_l2
    for i, step in enumerate(report.steps):  # an undone step was worse than the best before it
        if step.skipped:
            assert step.rel_l2 > min(s.rel_l2 for s in report.steps[:i] if not s.skipped)
    assert all(s.latency_ms > 0 for s in report.steps) and "kept in FP32" in report.to_text()


def test_unreachable_targets_and_overflow_are_never_met(residual):
    """Findings 7 and 9: a target below what every layer in FP32 achieves stops at once; an FP16
    configuration that overflows (infinite error) is never "met", and ranks first."""
    net, _, x = residual
    calibration = calibrate(net, batches_of({"data": x}, 8), precision="fp16")
    plan = hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=calibration).precision
    make = lambda p: hybrid_infer.HybridNet(net.model, engine="onnxruntime", calibration=p, keep_logits=True)
    layers = net.partition.segments[0].layers
    report = search(plan, make, {"data": x}, checked_reference(net, x), AccuracyTarget("rel_l2", 1e-12),
                    layers=layers, runs=1)
    assert not report.met and len(report.steps) == 1 and not report.sensitivity
    assert "unreachable: even with every candidate layer in FP32" in report.to_text()
    big = beyond_fp16(net, x)  # beyond the calibrated FP16 ranges: overflows unless layers are kept
    report = search(plan, make, {"data": big}, checked_reference(net, big), AccuracyTarget("rel_l2", 1e-2),
                    layers=layers, runs=1)
    assert report.steps[0].rel_l2 == math.inf and not AccuracyTarget("rel_l2", 1).met(report.steps[0].error)
    assert report.met and report.kept and math.isfinite([s for s in report.steps if not s.skipped][-1].rel_l2)
    assert report.to_json()["steps"][0]["rel_l2"] is None  # JSON has no infinity


@pytest.mark.parametrize("text", ["rel_l2", "top1=1.5", "accuracy=0.9", "rel_l2=-1", "rel_l2=x"])
def test_bad_accuracy_targets_are_option_errors(text):
    with pytest.raises(OptionError, match="--accuracy-target"):
        parse_target(text)


def test_inputs_far_from_the_calibrated_range_warn_in_the_api(lenet_calibration, caplog):
    """Review of issue 12: LeNet calibrated on 0..1 inputs and fed 0..255 (or the reverse) lost most of its
    accuracy without a word from the Python API; the first run now warns, naming the input."""
    net = hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", engine="onnxruntime",
                            calibration=lenet_calibration)
    x = digits()[2][:4]
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        net.run({"data": x * 255})
    assert "input 'data' spans [" in caplog.text and "clip in INT8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        net.run({"data": x * 255})  # once per net
    assert "spans" not in caplog.text
    tiny = hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", engine="onnxruntime",
                             calibration=lenet_calibration)
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        tiny.run({"data": x / 255})
    assert "spans only" in caplog.text and "a few INT8 levels" in caplog.text
