"""Reduced precision from the command line, as a user runs it: calibrate, then run, build,
compare, export and diff with the file; the mistakes a user makes get one-line errors before
any long work. Real pycaffe, ONNX Runtime and (where importable) TensorRT-RTX throughout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import hybrid_infer
from hybrid_infer.cli.main import main
from hybrid_infer.detections import compare_detections, detection_outputs
from hybrid_infer.engines import trt_api
from hybrid_infer.errors import EnvironmentProblem
from hybrid_infer.metrics import relative_l2

from conftest import GRAPHS
from test_precision import digits
from hybrid_infer.detections import DETECTION_TOLERANCE

LENET = GRAPHS / "lenet_digits"
MODEL = [str(LENET / "deploy.prototxt"), "--weights", str(LENET / "lenet_digits.caffemodel")]
SAMPLES = sorted(map(str, (LENET / "samples").glob("*.png")))
SCALE = ["--scale", "0.00392156862745098"]
RNG = np.random.default_rng()

#: A small SSD: two convolutions, one head, PriorBox and DetectionOutput (lowered with the rest).
TINY_SSD = """
name: "tiny_ssd"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 16 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 16 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "loc" type: "Convolution" bottom: "conv2" top: "loc" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" flatten_param { axis: 1 } }
layer { name: "conf" type: "Convolution" bottom: "conv2" top: "conf" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" flatten_param { axis: 1 } }
layer { name: "prior" type: "PriorBox" bottom: "conv2" bottom: "data" top: "prior"
        prior_box_param { min_size: 10.0 aspect_ratio: 2.0 flip: false clip: false
                          variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 offset: 0.5 } }
layer { name: "conf_reshape" type: "Reshape" bottom: "conf_flat" top: "conf_reshape" reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax" softmax_param { axis: 2 } }
layer { name: "conf_sm_flat" type: "Flatten" bottom: "conf_softmax" top: "conf_sm_flat" flatten_param { axis: 1 } }
layer { name: "detection_out" type: "DetectionOutput" bottom: "loc_flat" bottom: "conf_sm_flat" bottom: "prior"
        top: "detection_out"
        detection_output_param { num_classes: 3 share_location: true background_label_id: 0
          nms_param { nms_threshold: 0.45 top_k: 100 } code_type: CENTER_SIZE keep_top_k: 50 confidence_threshold: 0.4 } }
"""


@pytest.fixture(scope="module")
def arrays(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("arrays")
    x_train, _, x_test, _ = digits()
    np.save(folder / "train.npy", x_train[:96])
    np.save(folder / "eval.npy", x_test[:96])
    np.save(folder / "one.npy", x_train[:1])
    np.save(folder / "bright.npy", 255 * x_test[:8])  # preprocessed without the 1/255 scale
    return folder


@pytest.fixture(scope="module")
def minmax_file(arrays, tmp_path_factory) -> Path:
    calib = tmp_path_factory.mktemp("calib") / "lenet.calib.json"
    assert main(["calibrate", *MODEL, "--input", str(arrays / "train.npy"), "--method", "minmax",
                 "--calibration-batch", "32", "-o", str(calib)]) == 0
    return calib


def _rtx_importable() -> bool:
    try:
        trt_api.load("tensorrt_rtx")
        return True
    except EnvironmentProblem:
        return False


def test_calibrate_then_run_build_and_compare(minmax_file, arrays, tmp_path, capsys):
    """Finding 1: compare --calibration on a net with a Softmax crashed (KeyError 'ip2'); the
    variant is measured on the outputs and Softmax inputs, and counted in the announcement.
    Finding 19: run shows the measured error and checks against a tolerance suited to INT8."""
    saved = json.loads(minmax_file.read_text())
    assert saved["accuracy"]["on"] == "calibration inputs" and 0 < saved["accuracy"]["rel_l2"] < 0.05
    assert saved["inputs"]["preprocessing"] is None  # .npy arrays: no image preprocessing to compare
    capsys.readouterr()
    assert main(["run", *MODEL, "--input", *SAMPLES, *SCALE, "--calibration", str(minmax_file), "--top", "1",
                 "--check"]) == 0
    out, err = capsys.readouterr()
    assert f"precision INT8 minmax from {minmax_file}; calibrate measured relative L2" in out
    assert "ONNX Runtime runs 3 of its 4 INT8 convolution/InnerProduct layers in integer kernels" in out
    assert "twice the relative L2 that calibrate measured" in out and "ABOVE" not in out
    assert "calibrated on .npy arrays; these images are preprocessed with --scale 0.00392157" in err
    for i, sample in enumerate(SAMPLES):
        assert f"[{i}] {Path(sample).name}: {Path(sample).stem.split('_')[1]} (" in out
    if _rtx_importable():
        assert main(["build", *MODEL, "--calibration", str(minmax_file), "--engine-cache", str(tmp_path / "engines"),
                     "--tensorrt-module", "tensorrt_rtx"]) == 0
        out = capsys.readouterr().out
        assert "INT8 minmax" in out and "built in" in out
    assert main(["compare", *MODEL, "--input", *SAMPLES, *SCALE, "--partition", "caffe", "--partition",
                 "profile=tensorrt,min=3", "--calibration", str(minmax_file), "--runs", "2", "--warmup", "1"]) == 0
    out, err = capsys.readouterr()
    assert "measuring 2 partition(s) and 1 calibrated variant(s)" in err
    assert "[INT8 minmax]" in out


def test_stale_and_mismatched_files_are_refused_before_any_long_work(minmax_file, capsys):
    """Finding 17: compare checks every file (here: other weights) before measuring anything."""
    assert main(["run", str(LENET / "deploy.prototxt"), "--random-weights", "1", "--calibration",
                 str(minmax_file)]) == 2
    assert "stale: the weights differ" in capsys.readouterr().err
    assert main(["compare", str(LENET / "deploy.prototxt"), "--random-weights", "1", "--calibration",
                 str(minmax_file), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert "stale" in err and "measuring" not in err
    # Finding 19: an INT8 file sets the engines' precision; --fp16 on top is refused, not ignored.
    assert main(["build", *MODEL, "--calibration", str(minmax_file), "--fp16"]) == 2
    assert "--fp16 with --calibration" in capsys.readouterr().err


def test_calibrate_keeps_named_layers_and_meets_a_target_on_the_logits(arrays, tmp_path, capsys):
    """Finding 2: calibrate --keep-fp32 crashed (AttributeError); finding 8: the target is
    judged on the logits, the Softmax's input."""
    calib = tmp_path / "auto.calib.json"
    status = main(["calibrate", *MODEL, "--input", str(arrays / "train.npy"), "--eval-input",
                   str(arrays / "eval.npy"), "--method", "minmax", "--keep-fp32", "conv1", "--accuracy-target",
                   "rel_l2=0.003", "--runs", "1", "-o", str(calib)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "accuracy target rel_l2<=0.003: met" in out and "(FP32 hybrid)" in out
    saved = json.loads(calib.read_text())
    searched = {s["kept"] for s in saved["sensitivity"]["steps"] if s["kept"] and not s["skipped"]}
    assert set(saved["keep_fp32"]) == {"conv1"} | searched
    assert saved["sensitivity"]["floor"]["rel_l2"] < 1e-5  # every layer kept: FP32 again
    assert saved["accuracy"]["rel_l2"] <= 0.003
    x_test = np.load(arrays / "eval.npy")
    want = hybrid_infer.load(*MODEL[:1], MODEL[2], engine="onnxruntime", outputs=["ip2"]).run_caffe({"data": x_test})
    got = hybrid_infer.load(*MODEL[:1], MODEL[2], engine="onnxruntime", outputs=["ip2"],
                            calibration=calib).run({"data": x_test})
    assert relative_l2(got["ip2"], want["ip2"]) <= 0.003  # on the logits, measured independently
    assert main(["run", *MODEL, "--input", str(arrays / "eval.npy"), "--calibration", str(calib)]) == 0
    assert f"kept in FP32: {', '.join(sorted(saved['keep_fp32']))}" in capsys.readouterr().out


def test_other_preprocessing_than_the_calibrations_is_refused(tmp_path, arrays, capsys, caplog):
    """Finding 6: calibrated with --scale, run without: refused, naming the option, instead of
    wrong digits; inputs far outside the calibrated range are reported."""
    calib = tmp_path / "images.calib.json"
    assert main(["calibrate", *MODEL, "--input", *SAMPLES, *SCALE, "--method", "minmax", "-o", str(calib)]) == 0
    capsys.readouterr()
    assert main(["run", *MODEL, "--input", *SAMPLES, "--calibration", str(calib)]) == 2
    err = capsys.readouterr().err
    assert "preprocessed with --scale 0.00392157, this run uses --scale 1" in err and err.count("\n") == 1
    assert main(["run", *MODEL, "--input", *SAMPLES, *SCALE, "--calibration", str(calib)]) == 0
    capsys.readouterr()
    assert main(["run", *MODEL, "--input", str(arrays / "bright.npy"), "--calibration", str(calib)]) == 0
    assert "input 'data' spans [0, 255], but" in caplog.text  # logged by net.run (the CLI prints the log)


def test_detections_target_on_an_ssd_and_refused_without_detection_output(make_prototxt, tmp_path, capsys):
    """Finding 10: detections=N counts detections found on one side only (detections.py) against
    Caffe FP32 with DetectionOutput lowered, without --output-blob; the table shows no top-1
    for a detector; a net without DetectionOutput is refused before calibrating."""
    prototxt = make_prototxt(TINY_SSD, "tiny_ssd")
    np.save(tmp_path / "x.npy", RNG.standard_normal((8, 3, 32, 32)).astype(np.float32))
    calib = tmp_path / "ssd.calib.json"
    seed = str(RNG.integers(1 << 30))
    status = main(["calibrate", str(prototxt), "--random-weights", seed, "--input", str(tmp_path / "x.npy"),
                   "--method", "minmax", "--accuracy-target", "detections=0", "--runs", "1", "-o", str(calib)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "accuracy target detections<=0: met" in out and "det. differ" in out and "top-1" not in out
    net = hybrid_infer.load(prototxt, random_weights=int(seed), engine="onnxruntime", calibration=calib)
    x = np.load(tmp_path / "x.npy")
    found = compare_detections(net.run({"data": x})["detection_out"], net.run_caffe({"data": x})["detection_out"],
                               detection_outputs(net.graph)["detection_out"], DETECTION_TOLERANCE)
    assert found.real_lone_rows == 0, found.summary()  # what detections=0 means
    assert main(["calibrate", *MODEL, "--input", *SAMPLES, "--accuracy-target", "detections=0",
                 "-o", str(tmp_path / "x.json")]) == 2
    _, err = capsys.readouterr()
    assert "has no DetectionOutput blob among its outputs" in err and "calibrating" not in err


@pytest.mark.parametrize("case", ["folder", "device", "eval shape"])
def test_calibrate_fails_fast(case, tmp_path, arrays, capsys):
    """Finding 17: a bad -o or evaluation input is refused before calibrating."""
    output = {"folder": tmp_path, "device": Path("/dev/null")}.get(case, tmp_path / "ok.json")
    extra = ["--eval-input", str(tmp_path / "wrong.npy")] if case == "eval shape" else []
    np.save(tmp_path / "wrong.npy", np.zeros((2, 1, 8, 8), np.float32) + 1)
    assert main(["calibrate", *MODEL, "--input", str(arrays / "train.npy"), *extra, "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "calibrating" not in err
    assert ("-o" in err) if case != "eval shape" else "has shape (2, 1, 8, 8)" in err


def test_calibrate_warns_about_a_set_too_small_to_mean_anything(arrays, tmp_path, capsys):
    """Finding 19: one image, and --batch repeating it, are warned about."""
    assert main(["calibrate", *MODEL, "--input", str(arrays / "one.npy"), "--batch", "4", "--method", "minmax",
                 "-o", str(tmp_path / "one.json")]) == 0
    err = capsys.readouterr().err
    assert "calibrating on a single input" in err and "--batch 4 would repeat the 1 input(s)" in err


def test_engine_caffe_says_nothing_runs_reduced(minmax_file, capsys):
    """Finding 15: with --engine caffe the file applies to no segment, and run says so."""
    assert main(["run", *MODEL, "--input", *SAMPLES, *SCALE, "--engine", "caffe", "--calibration",
                 str(minmax_file)]) == 0
    out = capsys.readouterr().out
    assert "applies to no segment here: everything runs in FP32" in out and "segment 0: FP32 (runs in Caffe)" in out


def test_export_and_diff_take_the_calibration(minmax_file, tmp_path, capsys):
    """Finding 19: export writes the Q/DQ ONNX TensorRT builds (for trtexec, Netron); diff
    compares every value of the INT8 hybrid with Caffe."""
    assert main(["export", *MODEL, "--calibration", str(minmax_file), "-o", str(tmp_path / "onnx")]) == 0
    model = onnx.load(str(tmp_path / "onnx" / "segment0.onnx"))
    zero_points = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(n.doc_string for n in zero_points)
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["segments"][0]["precision"] == "INT8 minmax"
    capsys.readouterr()
    assert main(["diff", *MODEL, "--input", *SAMPLES[:2], *SCALE, "--calibration", str(minmax_file),
                 "--tolerance", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "ip2" in out
    # without --tolerance, diff judges a calibrated run as run --check does (review of issue 12)
    main(["diff", *MODEL, "--input", *SAMPLES[:2], *SCALE, "--calibration", str(minmax_file)])
    assert "twice the relative L2 that calibrate measured" in capsys.readouterr().err


def test_fp16_calibration_keeps_overflowing_layers_fp32(arrays, tmp_path, capsys):
    """Finding 7: tensors beyond 65504 are named, their layers stay FP32, the result is finite."""
    big = tmp_path / "big.npy"
    np.save(big, 3000 * np.load(arrays / "eval.npy")[:16])
    assert main(["calibrate", *MODEL, "--input", str(big), "--precision", "fp16", "-o", str(tmp_path / "h.json")]) == 0
    out = capsys.readouterr().out
    assert "exceed FP16's range (65504) on these inputs" in out and "a tensor beyond FP16's range" in out
    accuracy = json.loads((tmp_path / "h.json").read_text())["accuracy"]
    assert accuracy["rel_l2"] is not None and accuracy["rel_l2"] < 1e-3
