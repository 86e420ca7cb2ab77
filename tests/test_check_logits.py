"""`run --check` and `HybridNet.check` compare the input of every final Softmax too, and
their verdict depends on it: saturated probabilities match even when the logits do not."""
from __future__ import annotations

import random

import numpy as np

import hybrid_infer
from hybrid_infer.cli.main import main

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
    assert "the input of each final Softmax" in out
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
