"""Deploy nets that kept training-only layers (Accuracy, loss layers, Silence) reading blobs
nothing produces at inference: those layers are dropped with one warning, everywhere."""
from __future__ import annotations

import logging
import random
import subprocess
import sys

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.errors import ModelError
from hybrid_infer.metrics import relative_l2
from hybrid_infer.model.caffe_model import CaffeModel

from conftest import REPO
from pycaffe_reference import caffe_forward, repro_file

BODY = '''input: "data" input_shape { dim: 2 dim: 1 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
'''
LEFTOVERS = '''layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "l2" type: "EuclideanLoss" bottom: "fc" bottom: "target" top: "l2" }
layer { name: "bce" type: "SigmoidCrossEntropyLoss" bottom: "fc" bottom: "target" top: "bce" }
layer { name: "quiet" type: "Silence" bottom: "accuracy" }
'''
DROPPED = ["accuracy", "loss", "l2", "bce", "quiet"]


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def test_leftovers_are_dropped_with_one_warning_and_the_rest_matches_caffe(make_prototxt, caplog):
    seed = _seed()
    clean = make_prototxt(BODY)
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        net = hybrid_infer.load(make_prototxt(BODY + LEFTOVERS), random_weights=seed, engine="onnxruntime")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(f"'{name}'" in warnings[0] for name in DROPPED), warnings
    assert "Accuracy reads 'label', which nothing produces at inference" in warnings[0]
    assert [d.name for d in net.model.dropped_layers] == DROPPED
    # Gone from the model, the graph, the reference net and its prototxt.
    assert all(name not in net.graph.layers for name in DROPPED)
    reference = net.model.reference_net()
    assert not set(DROPPED) & set(reference._layer_names)
    assert "Accuracy" not in net.model.normalised_prototxt.read_text()
    assert net.output_blobs == ["prob"]
    x = {"data": np.random.default_rng(seed).standard_normal((2, 1, 8, 8)).astype(np.float32)}
    got = net.run(x)
    want = caffe_forward(clean, x, ["prob", "fc"], weights=net.model.weights)
    assert relative_l2(got["prob"], want["prob"]) <= 1e-5
    assert relative_l2(net.run_caffe(x)["prob"], want["prob"]) <= 1e-6
    with hybrid_infer.load(make_prototxt(BODY + LEFTOVERS), random_weights=seed, engine="caffe",
                           fallback=["InnerProduct"]) as in_caffe:  # generated Caffe sub-nets too
        assert relative_l2(in_caffe.run(x)["prob"], want["prob"]) <= 1e-5


def test_repro_training_leftover_cli_runs_with_the_warning():
    path = repro_file("training_leftover.prototxt")
    proc = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "run", str(path), "--random-weights",
                           str(_seed()), "--check"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "WARNING" in lines[0] and "'accuracy'" in lines[0], proc.stderr
    assert "prob: max abs error" in proc.stdout and "fc (input of Softmax 'prob')" in proc.stdout


def test_repro_training_leftover_python_api(caplog, tmp_path):
    path = repro_file("training_leftover.prototxt")
    seed = _seed()
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime")
    assert sum("'accuracy'" in r.getMessage() for r in caplog.records) == 1
    x = {"data": np.random.default_rng(seed).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    check = net.check(x)
    assert check.ok and [r.name for r in check.rows] == ["prob", "fc"]
    clean = tmp_path / "deploy.prototxt"  # what the user meant: the net without its Accuracy layer
    clean.write_text(path.read_text().split('layer { name: "accuracy"')[0])
    want = caffe_forward(clean, x, ["prob"], weights=net.model.weights)["prob"]
    assert relative_l2(net.run(x)["prob"], want) <= 1e-5


def test_leftover_layer_partition_report_names_it(make_prototxt, capsys):
    from hybrid_infer.cli.main import main
    assert main(["partition", str(make_prototxt(BODY + LEFTOVERS))]) == 0
    out = capsys.readouterr().out
    assert "training-only layers dropped" in out and "SoftmaxWithLoss reads 'label'" in out


def test_training_layer_with_its_inputs_stays(make_prototxt):
    # label is a net input here: the loss can be computed, so it is kept (and runs in Caffe).
    text = BODY.replace('input: "data" input_shape { dim: 2 dim: 1 dim: 8 dim: 8 }',
                        'input: "data" input_shape { dim: 2 dim: 1 dim: 8 dim: 8 }\n'
                        'input: "label" input_shape { dim: 2 }')
    model = CaffeModel(make_prototxt(text + LEFTOVERS.split("\n")[1] + "\n"))
    assert model.dropped_layers == [] and "loss" in [layer.name for layer in model.layers]


def test_other_dangling_bottoms_stay_errors(make_prototxt):
    with pytest.raises(ModelError, match=r"layer 'scale' reads blob 'label', which no earlier layer produces"):
        CaffeModel(make_prototxt(BODY + 'layer { name: "scale" type: "Eltwise" bottom: "fc" bottom: "label" '
                                        'top: "s" }\n'))
    with pytest.raises(ModelError, match=r"layer 'use' reads blob 'accuracy', whose producer 'accuracy' was "
                                         r"dropped as a training-only layer \(Accuracy reads 'label'"):
        CaffeModel(make_prototxt(BODY + LEFTOVERS.split("\n")[0] + "\n"
                                 + 'layer { name: "use" type: "ReLU" bottom: "accuracy" top: "r" }\n'))
