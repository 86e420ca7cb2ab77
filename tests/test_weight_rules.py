"""Which values a layer's parameters get, exactly as Caffe decides (Net::CopyTrainedLayersFrom,
Net::AppendParam / ShareWeights): repeated layer names, parameters shared by name, blob
counts of every stored layer. Expected values come from a fresh pycaffe net reading the
same files with Caffe's own reader."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.cli.main import main
from hybrid_infer.errors import ModelError
from hybrid_infer.metrics import relative_l2
from hybrid_infer.model.caffe_import import caffe, caffe_pb2
from hybrid_infer.model.caffe_model import CaffeModel

from pycaffe_reference import caffe_forward, caffe_refuses


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _write(path, layers) -> None:
    """A caffemodel holding ``layers``: (name, [arrays]) in this order, as Caffe stores them."""
    net = caffe_pb2().NetParameter(name="written")
    for name, arrays in layers:
        layer = net.layer.add(name=name)
        for array in arrays:
            blob = layer.blobs.add()
            blob.shape.dim.extend(array.shape)
            blob.data.extend(np.asarray(array, np.float32).ravel().tolist())
    path.write_bytes(net.SerializeToString())


def _random(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _assert_runs_as_pycaffe(path, caffemodel, blobs, **options) -> hybrid_infer.HybridNet:
    x = {"data": np.random.default_rng().standard_normal((2, 3)).astype(np.float32)}
    want = caffe_forward(path, x, blobs, caffemodel=caffemodel)
    with hybrid_infer.load(path, caffemodel, outputs=blobs, **options) as net:
        got = net.run(x)
        for blob in blobs:
            assert relative_l2(got[blob], want[blob]) <= 1e-5, (blob, options)
    return net


DUP = '''input: "data" input_shape { dim: 2 dim: 3 }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "a" top: "b"
        inner_product_param { num_output: 3 weight_filler { type: "constant" value: 0.5 }
                              bias_filler { type: "constant" value: 0.25 } } }
'''


def test_repeated_layer_name_only_the_first_gets_stored_blobs(make_prototxt, tmp_path, caplog):
    """The reviewer's dup repro: the file stores "fc" twice; Caffe copies both into the first
    "fc" (the later wins) and the second "fc" keeps its fillers' values."""
    rng = np.random.default_rng()
    path = make_prototxt(DUP)
    first, second = [_random(rng, 3, 3), _random(rng, 3)], [_random(rng, 3, 3), _random(rng, 3)]
    weights = tmp_path / "dup.caffemodel"
    _write(weights, [("fc", first), ("fc", second)])
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        model = CaffeModel(path, weights)
    assert model.renamed_layers == {"fc#2": "fc"}
    for got, want in zip(model.weights["fc"], second):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(model.weights["fc#2"][0], np.full((3, 3), 0.5, np.float32))
    np.testing.assert_array_equal(model.weights["fc#2"][1], np.full(3, 0.25, np.float32))
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "'fc' (fc#2) repeat(s) the name of an earlier layer" in warning and "random" not in warning
    for options in ({"engine": "onnxruntime"}, {"engine": "caffe"},
                    {"engine": "onnxruntime", "fallback": ["fc#2"], "min_segment_size": 1}):
        _assert_runs_as_pycaffe(path, weights, ["a", "b"], **options)
    # Each stored "fc" must fit the first "fc": Caffe checks them all against it.
    _write(weights, [("fc", first), ("fc", [_random(rng, 5, 3), _random(rng, 5)])])
    assert "shape mismatch" in caffe_refuses(path, weights)
    with pytest.raises(ModelError, match=r"layer 'fc' blob 0: shape mismatch: the caffemodel holds 5x3, the "
                                         r"prototxt needs 3x3"):
        CaffeModel(path, weights)


def test_repeated_layer_name_with_a_random_filler_says_so(make_prototxt, tmp_path, caplog):
    path = make_prototxt(DUP.replace('type: "constant" value: 0.5', 'type: "gaussian" std: 1'))
    weights = tmp_path / "dup.caffemodel"
    rng = np.random.default_rng()
    _write(weights, [("fc", [_random(rng, 3, 3), _random(rng, 3)])])
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        model = CaffeModel(path, weights)
    assert "the fillers of fc#2 are random, so Caffe itself gives other values" in caplog.text
    assert np.unique(model.weights["fc#2"][0]).size > 1
    with hybrid_infer.load(path, weights, engine="onnxruntime") as net:  # one draw, used by every net built
        x = {"data": rng.standard_normal((2, 3)).astype(np.float32)}
        assert relative_l2(net.run(x)["b"], net.run_caffe(x)["b"]) <= 1e-5


SHARED = '''input: "data" input_shape { dim: 2 dim: 3 }
layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 } }
layer { name: "fc2" type: "InnerProduct" bottom: "a" top: "c" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 } }
'''
SHARED_CUTS = [{"engine": "onnxruntime"}, {"engine": "caffe"},
               {"engine": "onnxruntime", "fallback": ["fc1"], "min_segment_size": 1}]


@pytest.mark.parametrize("options", SHARED_CUTS)
def test_shared_parameters_with_random_weights_are_drawn_once(make_prototxt, options):
    seed = _seed()
    path = make_prototxt(SHARED)
    with hybrid_infer.load(path, random_weights=seed, outputs=["a", "c"], **options) as net:
        for a, b in zip(net.model.weights["fc1"], net.model.weights["fc2"]):
            np.testing.assert_array_equal(a, b)
        x = {"data": np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)}
        want = caffe_forward(path, x, ["a", "c"], weights=net.model.weights)
        got = net.run(x)
        assert all(relative_l2(got[b], want[b]) <= 1e-5 for b in ("a", "c"))
    assert main(["run", str(path), "--random-weights", str(seed), "--check", "--min-segment-size", "1"]) == 0


def test_shared_parameters_of_another_shape_share_share_mode_permissive(make_prototxt):
    """A 1x1 convolution sharing an InnerProduct's weights (PERMISSIVE: same count, its own shape)."""
    seed = _seed()
    path = make_prototxt('''input: "data" input_shape { dim: 2 dim: 3 dim: 1 dim: 1 }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } inner_product_param { num_output: 3 } }
layer { name: "rs" type: "Reshape" bottom: "a" top: "a4" reshape_param { shape { dim: 0 dim: 3 dim: 1 dim: 1 } } }
layer { name: "cv" type: "Convolution" bottom: "a4" top: "c" param { name: "w" share_mode: PERMISSIVE }
        convolution_param { num_output: 3 kernel_size: 1 } }
''')
    with hybrid_infer.load(path, random_weights=seed, engine="onnxruntime") as net:
        np.testing.assert_array_equal(net.model.weights["cv"][0], net.model.weights["fc"][0].reshape(3, 3, 1, 1))
        x = {"data": np.random.default_rng(seed).standard_normal((2, 3, 1, 1)).astype(np.float32)}
        want = caffe_forward(path, x, ["c"], weights=net.model.weights)
        assert relative_l2(net.run(x)["c"], want["c"]) <= 1e-5


@pytest.mark.parametrize("order", ["fc1 then fc2", "fc2 then fc1", "fc1 only"])
def test_shared_parameters_from_a_caffemodel_take_the_last_write(make_prototxt, tmp_path, order):
    """The sharing layers hold different blobs in the file: both use the one written last."""
    rng = np.random.default_rng()
    path = make_prototxt(SHARED)
    stored = {name: [_random(rng, 3, 3), _random(rng, 3)] for name in ("fc1", "fc2")}
    names = {"fc1 then fc2": ["fc1", "fc2"], "fc2 then fc1": ["fc2", "fc1"], "fc1 only": ["fc1"]}[order]
    weights = tmp_path / "shared.caffemodel"
    _write(weights, [(name, stored[name]) for name in names])
    model = CaffeModel(path, weights)
    for layer in ("fc1", "fc2"):
        for got, want in zip(model.weights[layer], stored[names[-1]]):
            np.testing.assert_array_equal(got, want)
    for options in SHARED_CUTS:
        _assert_runs_as_pycaffe(path, weights, ["a", "c"], **options)


IP = '''input: "data" input_shape { dim: 2 dim: 3 }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2 } }
layer { name: "act" type: "ReLU" bottom: "fc" top: "fc" }
'''
FC = [np.arange(6, dtype=np.float32).reshape(2, 3) / 4, np.array([0.1, -0.2], np.float32)]


@pytest.mark.parametrize("stored, message", [
    # Blobs stored for a layer without parameters (a PReLU saved, a ReLU in the prototxt).
    ([("fc", FC), ("act", [np.array([0.1, 0.2], np.float32)])],
     r"layer 'act' \(ReLU\): blob count 0 vs 1 in the caffemodel \(its layer at byte \d+; Caffe refuses: "
     r"\"Incompatible number of blobs for layer act\"\); the prototxt's layer has no parameters: is its type right"),
    # The layer is in the file, without blobs.
    ([("fc", []), ("fc2", FC)],
     r"layer 'fc' \(InnerProduct\): blob count 2 vs 0 in the caffemodel \(its layer at byte \d+; Caffe refuses: "
     r"\"Incompatible number of blobs for layer fc\"\); the caffemodel stores no weights for it"),
])
def test_every_stored_layer_of_the_net_is_checked_as_caffe_does(make_prototxt, tmp_path, stored, message):
    path = make_prototxt(IP)
    weights = tmp_path / "w.caffemodel"
    _write(weights, stored)
    assert "Incompatible number of blobs" in caffe_refuses(path, weights)
    with pytest.raises(ModelError, match=message):
        CaffeModel(path, weights)


def test_closest_names_skip_claimed_layers_and_ignore_case(make_prototxt, tmp_path):
    path = make_prototxt(IP + 'layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "o" '
                              'inner_product_param { num_output: 2 } }\n')
    weights = tmp_path / "w.caffemodel"
    _write(weights, [("fc", FC), ("FC2_b", [FC[0][:, :2], FC[1]])])
    with pytest.raises(ModelError, match=r"has no weights for layer\(s\) fc2 \(closest in the caffemodel: FC2_b\) "):
        CaffeModel(path, weights)


def test_file_cut_at_a_layer_boundary_gets_a_hint(make_prototxt, tmp_path):
    text = IP + 'layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "o" inner_product_param { num_output: 2 } }\n'
    path = make_prototxt(text)
    cf = caffe()
    cf.set_mode_cpu()
    net = cf.Net(str(path), cf.TEST)
    whole = tmp_path / "whole.caffemodel"
    net.save(str(whole))
    stored = caffe_pb2().NetParameter()
    stored.ParseFromString(whole.read_bytes())
    assert stored.layer[-1].name == "fc2" and len(stored.layer[-1].blobs) == 2
    del stored.layer[-1]  # the file as if cut right after its layer before
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(stored.SerializeToString())
    end = cut.stat().st_size
    assert whole.read_bytes().startswith(cut.read_bytes())
    with pytest.raises(ModelError, match=rf"has no weights for layer\(s\) fc2 of .*; pass the caffemodel trained "
                                         rf"for this prototxt \(the file, {end} bytes, ends right after its layer "
                                         r"'act' \(layer \d of the file\): if it was cut short at a layer boundary"):
        CaffeModel(path, cut)
