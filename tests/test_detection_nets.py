"""Nets around DetectionOutput, against real pycaffe: layers after its data-dependent top,
priors that make Caffe's DetectionOutput abort, and nets without learned parameters."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from hybrid_infer.api import load
from hybrid_infer.cli.main import main
from hybrid_infer.errors import ModelError
from hybrid_infer.lowering.detection import caffe_abort
from hybrid_infer.partition.partitioner import CAFFE, TENSORRT
from hybrid_infer.testing import fresh_seed, load_text

CELLS, CLASSES = 4, 3
PRIORS = CELLS * CELLS * 3  # min_size plus aspect ratio 2 flipped


def ssd_head(prior_box: str = "min_size: 20 aspect_ratio: 2 flip: true", batch: int = 2, tail: str = "") -> str:
    """PriorBox on a 4 x 4 feature map of a 64 x 64 image, then DetectionOutput, then ``tail``."""
    return (f'input: "data" input_shape {{ dim: {batch} dim: 3 dim: 64 dim: 64 }}\n'
            f'input: "f0" input_shape {{ dim: {batch} dim: 2 dim: {CELLS} dim: {CELLS} }}\n'
            f'input: "loc" input_shape {{ dim: {batch} dim: {PRIORS * 4} }}\n'
            f'input: "conf" input_shape {{ dim: {batch} dim: {PRIORS * CLASSES} }}\n'
            f'layer {{ name: "pb" type: "PriorBox" bottom: "f0" bottom: "data" top: "prior" prior_box_param {{ '
            f'{prior_box} variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }} }}\n'
            'layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" top: "out" '
            f'detection_output_param {{ num_classes: {CLASSES} code_type: CENTER_SIZE nms_param {{ nms_threshold: '
            '0.45 } confidence_threshold: 0.3 keep_top_k: 20 } }\n' + tail)


def feeds(batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(fresh_seed())
    return {"data": rng.normal(size=(batch, 3, 64, 64)).astype(np.float32),
            "f0": rng.normal(size=(batch, 2, CELLS, CELLS)).astype(np.float32),
            "loc": rng.normal(0, 0.3, (batch, PRIORS * 4)).astype(np.float32),
            "conf": rng.uniform(0, 1, (batch, PRIORS * CLASSES)).astype(np.float32)}


TAILS = {
    "flatten": 'layer { name: "t" type: "Flatten" bottom: "out" top: "t" }',
    "power": 'layer { name: "t" type: "Power" bottom: "out" top: "t" power_param { scale: 2 } }',
    "slice_columns": 'layer { name: "t" type: "Slice" bottom: "out" top: "t" top: "t2" slice_param { axis: 3 '
                     'slice_point: 3 } }',
    "reshape": 'layer { name: "t" type: "Reshape" bottom: "out" top: "t" reshape_param { shape { dim: -1 dim: 7 } } }',
    "python_then_power": 'layer { name: "p" type: "Python" bottom: "out" top: "p" python_param { module: '
                         '"hybrid_example_layers" layer: "HardSwish" } }\n'
                         'layer { name: "t" type: "Power" bottom: "p" top: "t" power_param { scale: 2 } }',
}


@pytest.mark.parametrize("min_size", [1, 3])
@pytest.mark.parametrize("tail", list(TAILS.values()), ids=list(TAILS))
def test_layers_after_the_data_dependent_top_run_in_caffe(make_prototxt, monkeypatch, tail, min_size):
    monkeypatch.syspath_prepend("graphs/python_layers")
    path = make_prototxt(ssd_head(tail=tail + "\n"))
    net = load(path, min_segment_size=min_size)
    readers = [name for name in net.graph.layers if name not in ("pb", "det") and not net.graph.layers[name].is_input]
    for name in readers:
        assert net.partition.segment_of(name).backend == CAFFE
        if "out" in net.graph.layers[name].bottoms:
            assert "decides at run time" in net.partition.fallback_reasons[name]
    if min_size == 1:
        assert net.partition.segment_of("det").backend == TENSORRT
    inputs = feeds()
    got, want = net.run(inputs), net.run_caffe(inputs)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape and want[name].size > 7, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    net.close()


CLIPPED = "min_size: 10 aspect_ratio: 2 flip: true clip: true step: 32"  # centres at 16, 48, 80, 112 px: half outside the 64 px image


def test_priors_that_abort_caffe_are_found_before_caffe_runs(make_prototxt, caplog):
    _, graph = load_text(ssd_head(CLIPPED))
    why = caffe_abort(graph.layers["det"], graph)
    assert why is not None and "prior_width > 0" in why and "clip" in why
    _, fine = load_text(ssd_head())
    assert caffe_abort(fine.layers["det"], fine) is None
    path = make_prototxt(ssd_head(CLIPPED))
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        net = load(path)
    assert any("pure Caffe cannot run this net" in r.getMessage() for r in caplog.records)
    inputs = feeds()
    out = net.run(inputs)["out"]  # lowered, the layer runs
    assert out.shape[:2] == (1, 1) and out.shape[3] == 7
    for pure_caffe in (lambda: net.run_caffe(inputs), lambda: net.check(inputs)):
        with pytest.raises(ModelError, match="pure Caffe cannot run this net.*prior_width"):
            pure_caffe()
    net.close()
    with pytest.raises(ModelError, match="would run in Caffe here .*--fallback DetectionOutput"):
        load(path, fallback=["DetectionOutput"])


def test_check_on_such_priors_is_a_one_line_error(make_prototxt, capsys):
    path = make_prototxt(ssd_head(CLIPPED, batch=1))
    assert main(["run", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "prior_width > 0" in err and "Traceback" not in err


def test_a_net_without_parameters_needs_no_weights(make_prototxt, shared_models, capsys):
    path = make_prototxt(ssd_head(batch=1))
    assert main(["run", str(path), "--check"]) == 0, capsys.readouterr()
    assert "same rows in the same order OK" in capsys.readouterr().out
    assert main(["run", str(shared_models / "mobilenet_ssd/MobileNetSSD_deploy.prototxt")]) == 2
    err = capsys.readouterr().err
    assert "needs weights" in err and "--random-weights" in err and "Traceback" not in err
