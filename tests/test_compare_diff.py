"""`compare`, `diff` and `--min-segment-size auto` on real models: the bundled graphs, and the
shared third-party models where present. No timing is asserted: only that every figure is
there, that accuracy is measured against Caffe, and that mistakes get clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

import hybrid_infer
import hybrid_infer.api
from hybrid_infer.analysis.auto_min import choose_min_segment_size
from hybrid_infer.analysis.bisect import bisect, ddmin
from hybrid_infer.analysis.layer_diff import Settings, caffe_values, computed_values, layer_diff
from hybrid_infer.analysis.partition_spec import PURE_CAFFE, PartitionSpec, default_specs, parse_spec
from hybrid_infer.cli.main import main
from hybrid_infer.errors import OptionError
from hybrid_infer.partition.partitioner import CAFFE

from conftest import GRAPHS

LENET = [str(GRAPHS / "lenet_digits/deploy.prototxt"), "--weights", str(GRAPHS / "lenet_digits/lenet_digits.caffemodel")]
LENET_SAMPLES = sorted(str(p) for p in (GRAPHS / "lenet_digits/samples").glob("*.npy"))
PYTHON_NET = str(GRAPHS / "python_layer_net/deploy.prototxt")


@pytest.fixture
def python_layers(monkeypatch):
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))


def test_spec_syntax_round_trips():
    spec = parse_spec("profile=tensorrt-2, min=1, fallback=LRN+conv1")
    assert spec == PartitionSpec(False, "tensorrt-2", 1, ("LRN", "conv1"))
    assert parse_spec(spec.label) == spec
    assert parse_spec("caffe") == PURE_CAFFE and parse_spec("min=10") == PartitionSpec(min_segment_size=10)
    labels = [s.label for s in default_specs([["LRN"]])]
    assert labels == ["caffe", "profile=tensorrt,min=3", "profile=tensorrt-2,min=3", "profile=tensorrt,min=1",
                      "profile=tensorrt,min=10", "profile=tensorrt,min=3,fallback=LRN"]


@pytest.mark.parametrize("text,message", [
    ("fast", "expected 'caffe' or key=value"), ("speed=1", "cannot read 'speed=1'"),
    ("profile=tensorrt-9", "unknown profile 'tensorrt-9'"), ("min=three", "whole number"),
    ("min=-1", "0 or more"), ("min=1,min=2", "given twice"), ("", "expected 'caffe'")])
def test_bad_specs_say_what_is_wrong(text, message):
    with pytest.raises(OptionError, match=message):
        parse_spec(text)


def test_compare_reports_every_partition_with_json_and_chart(python_layers, tmp_path, capsys):
    report, chart = tmp_path / "compare.json", tmp_path / "compare.png"
    status = main(["compare", PYTHON_NET, "--random-weights", "4", "--batch", "2", "--runs", "2", "--warmup", "0",
                   "--partition", "profile=tensorrt,min=1", "--partition", "profile=tensorrt-2,min=1",
                   "--fallback", "Pooling", "--json", str(report), "--plot", str(chart)])
    out = capsys.readouterr().out
    assert status == 0, out
    data = json.loads(report.read_text())
    rows = {row["spec"]: row for row in data["partitions"]}
    assert list(rows) == ["caffe", "profile=tensorrt,min=1", "profile=tensorrt-2,min=1",
                          "profile=tensorrt,min=3,fallback=Pooling"]
    caffe, hybrid = rows["caffe"], rows["profile=tensorrt,min=1"]
    assert caffe["accuracy"][0]["rel_l2"] == 0 and caffe["layer_share_tensorrt"] == 0
    # TensorRT | Caffe (the Python layer) | TensorRT: two hand-offs of the 32x16x16 activations.
    assert (hybrid["segments"], hybrid["tensorrt_segments"], hybrid["boundaries"]) == (3, 2, 2)
    assert hybrid["boundary_bytes_per_image"] == 2 * 32 * 16 * 16 * 4
    assert 0.5 < hybrid["layer_share_tensorrt"] < 1 and hybrid["flop_share_tensorrt"] > 0.9
    for row in rows.values():
        assert row["batch"] == 2 and len(row["samples_ms"]) == 2 and row["within_tolerance"]
        assert row["latency_p90_ms"] >= row["latency_median_ms"] > 0 and row["throughput_items_per_s"] > 0
        assert row["accuracy"][0]["top1_agreement"] == 1.0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in rows:
        assert label in out


@pytest.mark.parametrize("args,message", [
    (["--partition", "profile=tensorrt,speed=9"], "cannot read 'speed=9'"),
    (["--partition", "fallback=NoSuchLayer"], "partition profile=tensorrt,min=3,fallback=NoSuchLayer: "
                                               "--fallback NoSuchLayer: no layer or layer type"),
    (["--fallback", "Nope"], "no layer or layer type of that name"),
    (["--plot", "/nonexistent-folder/c.png"], "folder /nonexistent-folder does not exist"),
    (["--plot", "chart.txt"], "must end in .png"),
])
def test_compare_mistakes_are_one_line_errors(args, message, capsys):
    assert main(["compare", *LENET, "--runs", "1", *args]) == 2
    assert message in capsys.readouterr().err


def test_auto_min_segment_size_says_what_it_chose_and_why(python_layers, capsys):
    assert main(["run", PYTHON_NET, "--random-weights", "2", "--min-segment-size", "auto", "--check"]) == 0
    out = capsys.readouterr().out
    assert "--min-segment-size auto chose" in out and "distinct partition(s) measured" in out
    assert "min 1:" in out and "OK" in out


def test_partitions_beyond_tolerance_are_refused_not_timed(tmp_path, capsys):
    """At tolerance 0 only bit-exact partitions qualify: pure Caffe, and a hybrid whose every
    layer is in Caffe; every partition with a lowered convolution is refused."""
    report = tmp_path / "refused.json"
    status = main(["compare", *LENET, "--input", *LENET_SAMPLES, "--runs", "2", "--warmup", "0", "--tolerance", "0",
                   "--partition", "caffe", "--partition", "min=1", "--partition", "min=11,fallback=ip2", "--json", str(report)])
    assert status == 1
    rows = {row["spec"]: row for row in json.loads(report.read_text())["partitions"]}
    assert rows["profile=tensorrt,min=1"]["refused"] and rows["profile=tensorrt,min=1"]["latency_median_ms"] is None
    assert not rows["caffe"]["refused"] and rows["caffe"]["latency_median_ms"] > 0
    # With ip2 in Caffe, min=11 hands both small TensorRT segments around it to Caffe (each
    # would add a hand-off): every layer in Caffe, exact, so timed. (Without a Caffe neighbour,
    # lenet's one segment would stay on TensorRT whatever the minimum.)
    assert not rows["profile=tensorrt,min=11,fallback=ip2"]["refused"]
    assert "refused: outputs differ from Caffe's by relative L2" in capsys.readouterr().out


def test_auto_never_chooses_a_partition_that_differs_from_caffe(python_layers):
    # TensorRT | Python layer | TensorRT: a minimum above both TensorRT segments puts every
    # layer in Caffe, the one partition that is bit-exact. (A net with no Caffe layer is one
    # TensorRT segment without neighbours, which no minimum moves.)
    net = hybrid_infer.load(PYTHON_NET, random_weights=3)
    x = {name: np.random.default_rng().standard_normal(shape).astype(np.float32)
         for name, shape in net.input_shapes().items()}
    make = lambda size: hybrid_infer.api.HybridNet(net.model, engine="onnxruntime", min_segment_size=size)
    choice = choose_min_segment_size(make, x, net.run_caffe(x), tolerance=0.0, runs=1, warmup=0)
    assert [s.backend for s in choice.net.partition.segments] == [CAFFE]
    assert "refused: relative L2" in choice.reason
    choice.net.close()


def test_partition_command_refuses_auto(python_layers, capsys):
    with pytest.raises(SystemExit):
        main(["partition", PYTHON_NET, "--min-segment-size", "auto"])
    assert "invalid int value: 'auto'" in capsys.readouterr().err


def test_diff_reports_every_value_of_the_bundled_classifier(capsys, tmp_path):
    report = tmp_path / "diff.json"
    assert main(["diff", *LENET, "--input", *LENET_SAMPLES, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "all 10 values within relative L2 0.0001 of Caffe" in out
    data = json.loads(report.read_text())
    # conv1 before relu1 overwrites it in place is a value of its own, on both sides.
    assert [v["value"] for v in data["values"][:3]] == ["conv1", "conv1@relu1", "pool1"]
    assert {v["backend"] for v in data["values"]} == {"onnxruntime"} and data["first_above"] is None


def test_diff_names_backend_and_segment_of_a_python_layer(python_layers):
    net = hybrid_infer.load(PYTHON_NET, random_weights=8)
    x = {"data": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    diff = layer_diff(net, Settings(engine="onnxruntime"), x, tolerance=1e-5)
    assert diff.first_above is None
    rows = {r.value: r for r in diff.rows}
    assert (rows["act2"].backend, rows["act2"].segment) == ("caffe", 1)
    assert (rows["conv1"].backend, rows["prob"].backend) == ("onnxruntime", "onnxruntime")
    assert [r.value for r in diff.rows] == computed_values(net.graph)


SHARED_DIFF = [("mtcnn/det1.prototxt", "mtcnn/det1.caffemodel"), ("squeezenet_v1.1/deploy.prototxt", None),
               ("hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt", "hyperlpr_mininet_ssd/mininet_ssd_v1.caffemodel")]


@pytest.mark.parametrize("prototxt,weights", SHARED_DIFF)
def test_diff_on_shared_models_is_within_tolerance(shared_models, prototxt, weights):
    net = hybrid_infer.load(shared_models / prototxt, weights and shared_models / weights,
                            random_weights=None if weights else 3)
    x = {name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)
         for name, shape in net.input_shapes().items()}
    diff = layer_diff(net, Settings(engine="onnxruntime"), x, tolerance=1e-4)
    assert diff.first_above is None, diff.first_above
    assert len(diff.rows) == len(computed_values(net.graph))


def test_ddmin_finds_a_one_minimal_set():
    calls = []

    def fails(kept: frozenset[str]) -> bool:
        calls.append(kept)
        return {"c", "f"} <= kept
    assert sorted(ddmin(list("abcdefgh"), fails)) == ["c", "f"]
    assert len(set(calls)) < 30


def test_bisect_finds_a_layer_that_really_differs_in_the_last_bits():
    """At tolerance 0 any rounding difference counts: ONNX Runtime's convolutions and inner
    products sum in another order than Caffe's GEMM, while ReLU and max pooling are exact.
    Bisect must return a set whose lowering alone reproduces a difference, and be 1-minimal."""
    folder = GRAPHS / "lenet_digits"
    net = hybrid_infer.load(folder / "deploy.prototxt", folder / "lenet_digits.caffemodel")
    x = {"data": np.concatenate([np.load(p) for p in LENET_SAMPLES])}
    settings = Settings(engine="onnxruntime")
    reference = caffe_values(net, x)
    found = bisect(net, settings, x, reference, tolerance=0.0)
    assert found.culprits and found.diff_with_culprits.first_above is not None
    assert {net.graph.layers[n].type for n in found.culprits} <= {"Convolution", "InnerProduct", "Softmax"}
    every = [n for n in net.graph.layers if not net.graph.layers[n].is_input]
    for left_out in found.culprits:
        kept = [n for n in found.culprits if n != left_out]
        only = Settings(engine="onnxruntime", min_segment_size=0,
                        fallback=tuple(n for n in every if n not in kept))
        assert layer_diff(net, only, x, tolerance=0.0).first_above is None
    exact = Settings(engine="onnxruntime", min_segment_size=0,
                     fallback=tuple(n for n in every if n not in ("relu1", "pool1")))
    assert layer_diff(net, exact, x, tolerance=0.0).first_above is None


def test_diff_cli_bisect(capsys):
    assert main(["diff", *LENET, "--input", *LENET_SAMPLES, "--tolerance", "0", "--bisect"]) == 1
    out = capsys.readouterr().out
    assert "<- first above tolerance" in out and "bisect: smallest set found after" in out
