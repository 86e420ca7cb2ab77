"""Small TensorRT segments: moved to Caffe when they would add hand-offs, kept on TensorRT
when nothing but net inputs feeds them and nothing but the caller reads them; the partition
report says which and why."""
from __future__ import annotations

import json
import random

import numpy as np

import hybrid_infer
from hybrid_infer.cli.main import main
from hybrid_infer.metrics import relative_l2
from hybrid_infer.partition.partitioner import CAFFE, TENSORRT

from conftest import GRAPHS
from pycaffe_reference import caffe_forward, repro_file

TINY = '''input: "data" input_shape { dim: 2 dim: 2 dim: 3 dim: 4 }
layer { name: "reshape" type: "Reshape" bottom: "data" top: "r" reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
layer { name: "prob" type: "Softmax" bottom: "r" top: "prob" softmax_param { axis: -1 } }
'''
# One small branch beside a Python layer (isolated: net input in, net output out), one small
# segment between two Caffe layers (not isolated).
BRANCHES = '''input: "data" input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }
layer { name: "act" type: "TanH" bottom: "data" top: "act" }
layer { name: "hs" type: "Python" bottom: "data" top: "hs" python_param { module: "hybrid_example_layers" layer: "HardSwish" } }
layer { name: "mid" type: "ReLU" bottom: "hs" top: "mid" }
layer { name: "hs2" type: "Python" bottom: "mid" top: "out" python_param { module: "hybrid_example_layers" layer: "HardSwish" } }
'''


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def test_tiny_whole_net_goes_to_tensorrt_and_matches_caffe(make_prototxt):
    seed = _seed()
    path = make_prototxt(TINY)
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime")  # --min-segment-size 3
    assert [(s.backend, s.layers) for s in net.partition.segments] == [(TENSORRT, ["reshape", "prob"])]
    [decision] = net.partition.small_segments
    assert not decision.moved_to_caffe and "adds no hand-off" in decision.reason
    x = {"data": np.random.default_rng(seed).standard_normal((3, 2, 3, 4)).astype(np.float32)}
    assert [se.engine.kind for se in net.segment_engines] == ["onnxruntime"]
    assert relative_l2(net.run(x)["prob"], caffe_forward(path, x, ["prob"])["prob"]) <= 1e-5


def test_repro_tiny_whole_net(capsys):
    path = repro_file("tiny_whole_net.prototxt")
    assert main(["run", str(path), "--random-weights", "1", "--check"]) == 0
    out = capsys.readouterr().out
    assert "segment 0: onnxruntime" in out and "prob: max abs error" in out and "ABOVE" not in out
    assert main(["partition", str(path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["backend"] for s in report["segments"]] == [TENSORRT]
    assert report["small_segments"] == [{"layers": ["reshape", "prob"], "compute_layers": 1, "moved_to_caffe": False,
                                         "reason": report["small_segments"][0]["reason"]}]


def test_isolated_branch_stays_and_a_sandwiched_segment_moves(make_prototxt, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))
    seed = _seed()
    path = make_prototxt(BRANCHES)
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime")
    backend = {name: s.backend for s in net.partition.segments for name in s.layers}
    assert backend == {"act": TENSORRT, "hs": CAFFE, "mid": CAFFE, "hs2": CAFFE}
    moved = {d.layers: d for d in net.partition.small_segments}
    assert not moved[("act",)].moved_to_caffe and moved[("mid",)].moved_to_caffe
    assert "exchanges tensors with other segments" in net.partition.fallback_reasons["mid"]
    x = {"data": np.random.default_rng(seed).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    got = net.run(x)
    want = caffe_forward(path, x, ["act", "out"])
    for blob in ("act", "out"):
        assert relative_l2(got[blob], want[blob]) <= 1e-5, blob
    assert main(["partition", str(path)]) == 0
    text = capsys.readouterr().out
    assert "TensorRT segments below --min-segment-size 3" in text
    assert "stays on TensorRT although below --min-segment-size 3" in text and "moved to Caffe" in text
