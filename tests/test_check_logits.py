"""`run --check`, `HybridNet.check`, `compare` and `--min-segment-size auto` compare the input
of every Softmax too, and their verdicts depend on it: saturated probabilities match even
when the logits do not."""
from __future__ import annotations

import json
import random

import numpy as np

import hybrid_infer
from hybrid_infer.analysis.auto_min import choose_min_segment_size
from hybrid_infer.api import HybridNet
from hybrid_infer.cli.main import main
from hybrid_infer.partition.partitioner import CAFFE

from conftest import GRAPHS

# Large logits: the softmax saturates to exactly 0 and 1 in both Caffe and ONNX Runtime,
# while the logits (sums of 2048 products) round differently in the two.
SATURATING = '''input: "data" input_shape { dim: 4 dim: 2048 }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
'''


def test_check_rows_include_the_logits_and_decide_the_verdict(make_prototxt, tmp_path, capsys):
    seed = random.SystemRandom().randrange(2**31)
    path = make_prototxt(SATURATING)
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime")
    x = {"data": (np.random.default_rng(seed).standard_normal((4, 2048)) * 300).astype(np.float32)}
    result = net.check(x, tolerance=0.0)
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["prob", "fc"] and result.softmax_inputs == {"fc": "prob"}
    assert rows["prob"].rel_l2 == 0.0, "the probabilities should saturate identically"
    assert rows["fc"].rel_l2 > 0.0 and not result.ok
    assert net.check(x, tolerance=1e-5).ok
    np.save(tmp_path / "x.npy", x["data"])
    args = ["run", str(path), "--random-weights", str(seed), "--input", f"data={tmp_path / 'x.npy'}", "--check"]
    assert main([*args, "--tolerance", "0"]) == 1
    out = capsys.readouterr().out
    assert "the input of every Softmax ('prob')" in out
    assert "prob: max abs error 0, relative L2 0 OK" in out and "fc (input of Softmax 'prob'):" in out
    assert main([*args, "--tolerance", "1e-5"]) == 0


def test_check_without_keep_logits_rebuilds_once(capsys):
    net = hybrid_infer.load(GRAPHS / "lenet_digits/deploy.prototxt", GRAPHS / "lenet_digits/lenet_digits.caffemodel",
                            engine="onnxruntime")
    x = {"data": np.load(next((GRAPHS / "lenet_digits/samples").glob("*.npy")))}
    net.run(x)
    result = net.check(x)
    assert result.ok and [r.name for r in result.rows] == ["prob", "ip2"]
    assert "ip2" in net.partition.segments[-1].outputs


# The Softmax is not the last layer: its saturated probabilities feed another layer, whose
# output then matches Caffe's whatever the logits were.
INNER = SATURATING + '''layer { name: "fc2" type: "InnerProduct" bottom: "prob" top: "out" inner_product_param { num_output: 3 } }
'''


def _saturating_input(seed: int) -> dict[str, np.ndarray]:
    return {"data": (np.random.default_rng(seed).standard_normal((4, 2048)) * 300).astype(np.float32)}


def test_check_compares_the_input_of_a_softmax_inside_the_net(make_prototxt, tmp_path, capsys):
    seed = random.SystemRandom().randrange(2**31)
    path = make_prototxt(INNER)
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime")
    x = _saturating_input(seed)
    result = net.check(x, tolerance=0.0)
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["out", "fc"] and result.softmax_inputs == {"fc": "prob"}
    assert rows["out"].rel_l2 == 0.0 and rows["fc"].rel_l2 > 0.0 and not result.ok
    np.save(tmp_path / "x.npy", x["data"])
    assert main(["run", str(path), "--random-weights", str(seed), "--input", f"data={tmp_path / 'x.npy'}",
                 "--check", "--tolerance", "0"]) == 1
    out = capsys.readouterr().out
    assert "check against pure Caffe: the outputs, and the input of every Softmax ('prob')" in out
    assert "fc (input of Softmax 'prob'): " in out and "ABOVE" in out


def test_ssd_check_compares_the_confidences_before_their_softmax(shared_models):
    """SSD's mbox_conf_softmax feeds Flatten and DetectionOutput, not a net output."""
    net = hybrid_infer.load(shared_models / "mobilenet_ssd/MobileNetSSD_deploy.prototxt", random_weights=5,
                            engine="onnxruntime", keep_logits=True)
    x = {"data": np.random.default_rng().standard_normal((1, 3, 300, 300)).astype(np.float32)}
    result = net.check(x)
    assert result.softmax_inputs == {"mbox_conf_reshape": "mbox_conf_softmax"}
    rows = {r.name: r for r in result.rows}
    assert rows["mbox_conf_reshape"].rel_l2 <= 1e-4 and result.ok


def test_compare_and_auto_judge_partitions_by_the_logits_too(make_prototxt, tmp_path, capsys):
    """At tolerance 0, a partition whose logits differ from Caffe's in the last bits is refused
    by `compare` and by `--min-segment-size auto` alike, though its probabilities match."""
    seed = random.SystemRandom().randrange(2**31)
    path = make_prototxt(SATURATING)
    x = _saturating_input(seed)
    np.save(tmp_path / "x.npy", x["data"])
    report = tmp_path / "compare.json"
    assert main(["compare", str(path), "--random-weights", str(seed), "--input", f"data={tmp_path / 'x.npy'}",
                 "--runs", "1", "--warmup", "0", "--tolerance", "0", "--partition", "caffe",
                 "--partition", "min=1,fallback=prob", "--json", str(report)]) == 1
    rows = {row["spec"]: row for row in json.loads(report.read_text())["partitions"]}
    hybrid = rows["profile=tensorrt,min=1,fallback=prob"]
    assert hybrid["refused"] and [a["output"] for a in hybrid["accuracy"]] == ["prob", "fc"]
    assert {a["output"]: a["rel_l2"] == 0.0 for a in hybrid["accuracy"]} == {"prob": True, "fc": False}
    assert not rows["caffe"]["refused"]
    net = hybrid_infer.load(path, random_weights=seed)
    make = lambda size: HybridNet(net.model, engine="onnxruntime", min_segment_size=size, fallback=["prob"])
    choice = choose_min_segment_size(make, x, net.reference_values(x), tolerance=0.0, runs=1, warmup=0)
    assert [s.backend for s in choice.net.partition.segments] == [CAFFE]
    assert "min 1: refused: relative L2" in choice.reason
    choice.net.close()
