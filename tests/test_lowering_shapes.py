"""A user's lowering whose ONNX gives a top another shape than Caffe's: the layer moves to
Caffe (ONNX shape inference on that layer's nodes alone), so `run` prints Caffe's shape and
`--check`, `diff`, `compare` report real numbers; and arrays of different shapes compare as
an infinite error that says why, not a numpy traceback."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import hybrid_infer
from conftest import GRAPHS, REPO
from hybrid_infer.lowering import REGISTRY, register_lowering
from hybrid_infer.metrics import compare_outputs, relative_l2
from hybrid_infer.partition.partitioner import CAFFE

from pycaffe_reference import caffe_forward

NET = GRAPHS / "python_layer_net" / "deploy.prototxt"
TARGET = {"python_module": "hybrid_example_layers", "python_layer": "HardSwish"}
WRONG_SHAPE = '''from hybrid_infer.lowering import register_lowering

@register_lowering("Python", python_module="hybrid_example_layers", python_layer="HardSwish")
def doubled(ctx, layer, inputs, outputs):  # wrong: Concat of the input with itself on axis 1
    ctx.node("Concat", [inputs[0], inputs[0]], outputs, layer=layer.name, axis=1)
'''


@pytest.fixture
def python_layers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))
    with REGISTRY.scope():
        yield


def _lower_with(emit) -> None:
    register_lowering("Python", **TARGET)(emit)


@pytest.mark.parametrize("emit, shown", [
    (lambda ctx, layer, i, o: ctx.node("Concat", [i[0], i[0]], o, layer=layer.name, axis=1), r"\(N, \d+, 16, 16\)"),
    (lambda ctx, layer, i, o: ctx.node("Concat", [i[0], i[0]], o, layer=layer.name, axis=0), r"\(\?, \d+, 16, 16\)"),
    (lambda ctx, layer, i, o: ctx.node("Reshape", [i[0], ctx.const(np.array([2, -1]), "s")], o, layer=layer.name),
     r"\(2, \?\)"),
])
def test_wrongly_shaped_user_lowering_moves_its_layer_to_caffe(python_layers, emit, shown):
    _lower_with(emit)
    net = hybrid_infer.load(NET, random_weights=3, engine="onnxruntime", outputs=["act2", "prob"])
    x = {"data": np.random.default_rng().standard_normal((2, 3, 32, 32)).astype(np.float32)}
    got = net.run(x)
    assert net.partition.segment_of("act2").backend == CAFFE
    reason = net.partition.fallback_reasons["act2"]
    assert "the lowering refused it" in reason and "gives top 'act2' the shape " in reason
    assert reason.endswith(f"(ONNX shape inference), but Caffe's is {net.graph.values['act2'].shape}")
    assert re.search(shown, reason), reason
    want = caffe_forward(NET, x, ["act2", "prob"], weights=net.model.weights)
    assert got["act2"].shape == want["act2"].shape
    assert relative_l2(got["prob"], want["prob"]) <= 1e-5
    assert net.check(x).ok


def test_cli_run_check_with_a_wrongly_shaped_lowering(tmp_path):
    (tmp_path / "wrong_shape.py").write_text(WRONG_SHAPE)
    env = {**os.environ, "PYTHONPATH": str(GRAPHS / "python_layers")}
    proc = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "run", str(NET), "--random-weights", "1",
                           "--lowerings", str(tmp_path / "wrong_shape.py"), "--output-blob", "act2", "--check"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "moving act2 to Caffe" in proc.stderr and "doubled (--lowerings" in proc.stderr
    assert "act2: shape (1, 32, 16, 16)" in proc.stdout and "act2: max abs error" in proc.stdout


def test_comparing_arrays_of_different_shapes_gives_an_infinite_row_that_says_why():
    (row,) = compare_outputs({"prob": np.zeros((2, 20), np.float32)}, {"prob": np.zeros((2, 10), np.float32)})
    assert row.rel_l2 == row.max_abs == float("inf") and row.note == "shape (2, 20) where Caffe gives (2, 10)"
