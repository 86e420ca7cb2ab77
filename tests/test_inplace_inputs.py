"""In-place layers on a net input (``bottom: "data" top: "data"``): the value the caller feeds
and the values the in-place layers write stay distinct everywhere, and every result matches
pycaffe run on the user's own prototxt."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.analysis.layer_diff import Settings, layer_diff
from hybrid_infer.cli.main import main
from hybrid_infer.metrics import relative_l2
from hybrid_infer.partition.partitioner import CAFFE, TENSORRT

from conftest import REPO
from pycaffe_reference import caffe_forward, repro_file

INPUT = 'input: "data" input_shape { dim: 2 dim: 3 dim: 9 dim: 9 }\n'
# Several in-place layers on the input, one of them (Power) easy to force to Caffe, then two
# readers of the rewritten input. (Caffe refuses a net that reads a blob and rewrites it in
# place afterwards: "produced by multiple sources".)
CHAIN = INPUT + '''
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data" batch_norm_param { use_global_stats: true } }
layer { name: "sc" type: "Scale" bottom: "data" top: "data" scale_param { bias_term: true } }
layer { name: "pw" type: "Power" bottom: "data" top: "data" power_param { scale: 0.5 shift: -1 } }
layer { name: "relu0" type: "ReLU" bottom: "data" top: "data" }
layer { name: "early" type: "Convolution" bottom: "data" top: "early" convolution_param { num_output: 2 kernel_size: 3 stride: 2 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "cat" type: "Concat" bottom: "pool" bottom: "early" top: "cat" concat_param { axis: 1 } }
'''


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _inputs(net: hybrid_infer.HybridNet, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) + 2.0).astype(np.float32)  # Power keeps it finite
            for name, shape in net.input_shapes().items()}


def _assert_matches_pycaffe(path, net: hybrid_infer.HybridNet, seed: int, blobs=None) -> None:
    x = _inputs(net, seed)
    got = net.run(x)
    want = caffe_forward(path, x, list(got), weights=net.model.weights)
    for blob in blobs or got:
        error = relative_l2(got[blob], want[blob])
        assert error <= 1e-5, f"{blob}: relative L2 {error:.3g} against pycaffe (seed {seed})"


@pytest.mark.parametrize("fallback, min_size, backends", [
    ((), 1, [TENSORRT]),                               # every rewrite inside one TensorRT segment
    (("pw",), 1, [TENSORRT, CAFFE, TENSORRT]),         # data@sc and data@pw cross boundaries
    (("BatchNorm", "Scale", "Power", "ReLU"), 1, None),  # the whole chain in Caffe
    (("conv",), 1, None),                              # the rewritten input handed to Caffe
])
def test_chain_of_inplace_layers_on_the_input(make_prototxt, fallback, min_size, backends):
    seed = _seed()
    path = make_prototxt(CHAIN)
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime", fallback=fallback,
                            min_segment_size=min_size, outputs=["cat", "data"])
    graph = net.graph
    assert graph.inputs == ["data"] and graph.input_value("data") == "data"
    assert [graph.layers[n].tops[0] for n in ("bn", "sc", "pw", "relu0")] == \
        ["data@bn", "data@sc", "data@pw", "data@relu0"]
    assert graph.layers["bn"].bottoms == ("data",)
    assert graph.layers["early"].bottoms == graph.layers["conv"].bottoms == ("data@relu0",)
    assert graph.value_of_blob("data") == "data@relu0"  # what Caffe's net.blobs['data'] holds after forward
    if backends:
        assert [s.backend for s in net.partition.segments] == backends
    for segment in net.partition.segments:  # the fed value is never a segment's output
        assert "data" not in segment.outputs
    _assert_matches_pycaffe(path, net, seed)


def test_repro_inplace_input_inside_tensorrt(make_prototxt):
    path = repro_file("inplace_input.prototxt")
    seed = _seed()
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime")
    assert [s.backend for s in net.partition.segments] == [TENSORRT]
    assert net.partition.segments[0].inputs == ["data"]
    _assert_matches_pycaffe(path, net, seed)


def test_repro_inplace_input_rewritten_in_caffe():
    path = repro_file("inplace_input_power.prototxt")
    seed = _seed()
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime", fallback=["pw"])
    assert [(s.backend, s.inputs, s.outputs) for s in net.partition.segments] == [
        (CAFFE, ["data"], ["data@pw"]), (TENSORRT, ["data@pw"], ["conv2"])]
    _assert_matches_pycaffe(path, net, seed)
    with hybrid_infer.load(path, random_weights=seed, engine="caffe", fallback=["pw"]) as all_caffe:
        _assert_matches_pycaffe(path, all_caffe, seed)


@pytest.mark.parametrize("name, extra", [("inplace_input.prototxt", []),
                                         ("inplace_input_power.prototxt", ["--fallback", "pw"])])
def test_repro_cli_run_check(name, extra):
    path = repro_file(name)
    proc = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "run", str(path), "--random-weights",
                           str(_seed()), "--check", *extra], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "conv2: max abs error" in proc.stdout and "OK" in proc.stdout


def test_output_blob_data_is_caffes_last_write(make_prototxt, capsys, tmp_path):
    """``--output-blob data`` returns what Caffe's net.blobs['data'] holds after forward: the
    last in-place rewrite, not the array fed."""
    seed = _seed()
    path = make_prototxt(CHAIN)
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime", outputs=["data"])
    x = _inputs(net, seed)
    got = net.run(x)["data"]
    want = caffe_forward(path, x, ["data"], weights=net.model.weights)["data"]
    assert relative_l2(got, want) <= 1e-5 and relative_l2(got, x["data"]) > 0.1
    np.testing.assert_allclose(net.run_caffe(x)["data"], want, rtol=1e-6, atol=1e-6)
    np.save(tmp_path / "x.npy", x["data"])
    out = tmp_path / "out.npz"
    assert main(["run", str(path), "--random-weights", str(seed), "--input", f"data={tmp_path / 'x.npy'}",
                 "--output-blob", "data", "--check", "-o", str(out)]) == 0
    assert "data: max abs error" in capsys.readouterr().out
    with np.load(out) as saved:
        assert relative_l2(saved["data"], want) <= 1e-5


def test_diff_reports_each_rewrite_of_the_input(make_prototxt, capsys, tmp_path):
    seed = _seed()
    path = make_prototxt(CHAIN)
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime")
    x = _inputs(net, seed)
    diff = layer_diff(net, Settings(engine="onnxruntime", fallback=("pw",), min_segment_size=1), x, 1e-5)
    assert [r.value for r in diff.rows][:5] == ["data@bn", "data@sc", "data@pw", "data@relu0", "early"]
    assert diff.first_above is None
    assert {r.value: r.backend for r in diff.rows}["data@pw"] == "caffe"
    report = tmp_path / "diff.json"
    assert main(["diff", str(path), "--random-weights", str(seed), "--fallback", "pw", "--min-segment-size", "1",
                 "--output-blob", "data", "--tolerance", "1e-5", "--json", str(report)]) == 0
    assert "data@relu0" in capsys.readouterr().out
    assert json.loads(report.read_text())["first_above"] is None


def test_partition_report_keeps_fed_and_rewritten_values_apart(make_prototxt, capsys):
    path = make_prototxt(CHAIN)
    assert main(["partition", str(path), "--fallback", "pw", "--min-segment-size", "1", "--format", "json",
                 "--output-blob", "data"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"data", "data@sc", "data@pw"} <= set(report["tensors"])
    boundary = {b["value"] for b in report["boundaries"]}
    assert "data" not in boundary and {"data@sc", "data@pw"} <= boundary
    assert [(s["inputs"], s["outputs"]) for s in report["segments"]] == [
        (["data"], ["data@sc"]), (["data@sc"], ["data@pw"]), (["data@pw"], ["data@relu0", "cat"])]


def test_opencv_prelu_layer_runs(shared_models):
    # PReLU in place on the input of OpenCV's test net.
    path = shared_models / "opencv_dnn_layers/layer_prelu.prototxt"
    seed = _seed()
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime")
    _assert_matches_pycaffe(path, net, seed)
