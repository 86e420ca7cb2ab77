"""Caffemodels as they come: written by other Caffe forks, in old formats, damaged, huge.

Only each layer's name and blobs are read (hybrid_infer.model.caffemodel); the weights must
equal what Caffe's own reader gives wherever Caffe can read the file, and runs must match
pycaffe on the original file.
"""
from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.cli.main import main
from hybrid_infer.errors import ModelError
from hybrid_infer.metrics import relative_l2
from hybrid_infer.model.caffe_import import caffe, caffe_pb2
from hybrid_infer.model.caffe_model import CaffeModel
from hybrid_infer.model.caffemodel import read_caffemodel
from hybrid_infer.model.isolated import CaffeFailure, call_isolated

from pycaffe_reference import REPRO, caffe_forward

NET = '''input: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 5 } }
'''
TRAINED = [(f"{m}/{p}", f"{m}/{w}") for m, p, w in (
    ("lenet_mnist", "mnist_deploy.prototxt", "lenet_iter_10000.caffemodel"),
    ("cifar10_full", "cifar10_full.prototxt", "cifar10_full_iter_70000.caffemodel"),
    ("fsrcnn", "FSRCNN_mat.prototxt", "snapshot_iter_2546000.caffemodel"),
    ("hyperlpr_mininet_ssd", "mininet_ssd_v1.prototxt", "mininet_ssd_v1.caffemodel"),
    *[("mtcnn", f"det{i}.prototxt", f"det{i}.caffemodel") for i in range(1, 5)])]


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _caffe_params(prototxt, caffemodel) -> dict[str, list[np.ndarray]]:
    cf = caffe()
    cf.set_mode_cpu()
    net = cf.Net(str(prototxt), cf.TEST, weights=str(caffemodel))
    return {name: [np.array(b.data, copy=True) for b in blobs] for name, blobs in net.params.items()}


def _assert_same_weights(model: CaffeModel, expected: dict[str, list[np.ndarray]]) -> None:
    assert sorted(model.weights) == sorted(expected)
    for name, arrays in expected.items():
        assert len(model.weights[name]) == len(arrays)
        for got, want in zip(model.weights[name], arrays):
            np.testing.assert_array_equal(got, want, err_msg=name)


def _saved(make_prototxt, tmp_path, text=NET, seed=None):
    """A prototxt, its model with random weights, and those weights saved by Caffe's writer."""
    path = make_prototxt(text)
    model = CaffeModel(path)
    model.set_random_weights(_seed() if seed is None else seed)
    weights = tmp_path / "w.caffemodel"
    model.reference_net().save(str(weights))
    return path, model, weights


@pytest.mark.parametrize("prototxt, caffemodel", TRAINED)
def test_trained_models_read_as_caffe_reads_them(shared_models, prototxt, caffemodel):
    expected = _caffe_params(shared_models / prototxt, shared_models / caffemodel)
    _assert_same_weights(CaffeModel(shared_models / prototxt, shared_models / caffemodel), expected)


def _fork_file(src, out) -> None:
    """What ../shared/repro/other_fork_weights.py makes: layer 1 carries an empty message
    under field 149, which this Caffe reads as psroi_pooling_param with required fields."""
    net = caffe_pb2().NetParameter()
    net.ParseFromString(src.read_bytes())
    net.layer[1].psroi_pooling_param.SetInParent()
    out.write_bytes(net.SerializePartialToString())


def _caffe_refuses(prototxt, caffemodel) -> str:
    def load() -> None:
        cf = caffe()
        cf.Net(str(prototxt), cf.TEST, weights=str(caffemodel))
    with pytest.raises(CaffeFailure) as caught:
        call_isolated(load)
    return str(caught.value)


def test_other_fork_weights_repro_runs_and_matches_caffe_on_the_original(shared_models, tmp_path, capsys):
    prototxt = shared_models / "lenet_mnist/mnist_deploy.prototxt"
    original = shared_models / "lenet_mnist/lenet_iter_10000.caffemodel"
    forked = tmp_path / "fork.caffemodel"
    script = REPRO / "other_fork_weights.py"
    if script.is_file():
        subprocess.run([sys.executable, str(script), str(original), str(forked)], check=True)
    else:
        _fork_file(original, forked)
    assert "Failed to parse NetParameter file" in _caffe_refuses(prototxt, forked)
    x = np.random.default_rng().uniform(0, 1, (3, 1, 28, 28)).astype(np.float32)
    want = caffe_forward(prototxt, x_in := {"data": x}, ["ip2", "loss"], caffemodel=original)
    net = hybrid_infer.load(prototxt, forked, engine="onnxruntime", outputs=["ip2", "loss"])
    got = net.run(x_in)
    for blob in ("ip2", "loss"):
        assert relative_l2(got[blob], want[blob]) <= 1e-5, blob
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    assert main(["run", str(prototxt), "--weights", str(forked), "--input", f"data={tmp_path / 'x.npy'}",
                 "--check", "-o", str(out)]) == 0
    assert "ip2 (input of Softmax 'loss')" in capsys.readouterr().out
    with np.load(out) as saved:
        assert relative_l2(saved["loss"], want["loss"]) <= 1e-5


def test_foreign_fields_of_any_kind_are_skipped(make_prototxt, tmp_path):
    path, model, weights = _saved(make_prototxt, tmp_path)
    original = weights.read_bytes()
    forked = tmp_path / "fork.caffemodel"
    _fork_file(weights, forked)
    # Append, to the conv layer, a field 149 with the wrong wire type (a number instead of a
    # message), a field number no Caffe uses, and a (deprecated) group holding a fixed64:
    # a fork's parameters this Caffe cannot read.
    net = caffe_pb2().NetParameter()
    net.ParseFromString(original)
    group = bytes([0xAB, 0x09]) + bytes([0x09]) + bytes(8) + bytes([0xAC, 0x09])  # field 149: start, 1, end
    conv = net.layer[1].SerializeToString() + bytes([0xA8, 0x09, 0x07]) + bytes([0xF8, 0xBF, 0x18, 0x01]) + group
    odd = tmp_path / "odd.caffemodel"
    odd.write_bytes(b"".join(
        (bytes([0xA2, 0x06]) + _varint(len(raw)) + raw) for raw in
        [net.layer[0].SerializeToString(), conv, *[la.SerializeToString() for la in net.layer[2:]]]))
    for variant in (forked, odd):
        _assert_same_weights(CaffeModel(path, variant), _caffe_params(path, weights))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_v1_and_v0_caffemodels_read_as_caffe_reads_them(make_prototxt, tmp_path):
    """Old formats: V1 ``layers`` with 4-D legacy blob shapes, and V0 layers nested in V1."""
    path, model, _ = _saved(make_prototxt, tmp_path)
    pb2 = caffe_pb2()
    for nested in (False, True):
        old = pb2.NetParameter(name="old")
        for name, kind in (("conv", pb2.V1LayerParameter.CONVOLUTION), ("fc", pb2.V1LayerParameter.INNER_PRODUCT)):
            layer = old.layers.add()
            target = layer.layer if nested else layer
            target.name = name
            if nested:
                layer.layer.type = "conv" if name == "conv" else "innerproduct"
            else:
                layer.type = kind
            for array in model.weights[name]:
                blob = target.blobs.add()
                legacy = (1,) * (4 - array.ndim) + array.shape
                blob.num, blob.channels, blob.height, blob.width = legacy
                blob.data.extend(array.ravel().tolist())
        file = tmp_path / f"old{int(nested)}.caffemodel"
        file.write_bytes(old.SerializeToString())
        _assert_same_weights(CaffeModel(path, file), _caffe_params(path, file))
    # The V1 prototxt too (upgraded by Caffe's tool), with the V1 caffemodel.
    v1 = make_prototxt(NET.replace("input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }",
                                   "input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8")
                       .replace("layer {", "layers {").replace('"Convolution"', "CONVOLUTION")
                       .replace('"ReLU"', "RELU").replace('"InnerProduct"', "INNER_PRODUCT"))
    _assert_same_weights(CaffeModel(v1, tmp_path / "old0.caffemodel"), _caffe_params(v1, tmp_path / "old0.caffemodel"))


def test_double_data_and_legacy_shapes_in_the_current_format(make_prototxt, tmp_path):
    path, model, weights = _saved(make_prototxt, tmp_path)
    net = caffe_pb2().NetParameter()
    net.ParseFromString(weights.read_bytes())
    for layer in net.layer:
        for blob in layer.blobs:
            values = list(blob.data)
            dims = list(blob.shape.dim)
            del blob.data[:]
            blob.ClearField("shape")
            blob.double_data.extend(np.asarray(values, np.float64) * (1 + 1e-9))
            blob.num, blob.channels, blob.height, blob.width = [1] * (4 - len(dims)) + dims
    file = tmp_path / "double.caffemodel"
    file.write_bytes(net.SerializeToString())
    _assert_same_weights(CaffeModel(path, file), _caffe_params(path, file))


def test_repeated_layer_names_get_the_stored_blobs_with_a_shape_check(make_prototxt, tmp_path):
    """Two layers named "fc" (Caffe allows it): the renamed copy fc#2 gets the stored fc, checked."""
    _, model, weights = _saved(make_prototxt, tmp_path)
    twice = NET + 'layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc_b" inner_product_param { num_output: 5 } }\n'
    loaded = CaffeModel(make_prototxt(twice), weights)
    assert loaded.renamed_layers == {"fc#2": "fc"}
    for index in (0, 1):
        np.testing.assert_array_equal(loaded.weights["fc#2"][index], model.weights["fc"][index])
    with hybrid_infer.load(make_prototxt(twice), weights, engine="onnxruntime") as net:
        x = {"data": np.random.default_rng().standard_normal((2, 3, 8, 8)).astype(np.float32)}
        got, want = net.run(x), net.run_caffe(x)
        assert relative_l2(got["fc_b"], want["fc_b"]) <= 1e-5
        np.testing.assert_allclose(got["fc_b"], got["fc"], rtol=1e-5, atol=1e-6)
    wider = twice.replace('top: "fc_b" inner_product_param { num_output: 5 }', 'top: "fc_b" inner_product_param { num_output: 7 }')
    with pytest.raises(ModelError, match=r"layer 'fc#2' blob 0: shape mismatch: the caffemodel holds 5x144, "
                                         r"the prototxt needs 7x144"):
        CaffeModel(make_prototxt(wider), weights)


def test_errors_say_what_is_wrong(make_prototxt, tmp_path):
    path, _, weights = _saved(make_prototxt, tmp_path)
    data = weights.read_bytes()
    short = caffe_pb2().NetParameter()
    short.ParseFromString(data)
    conv = next(layer for layer in short.layer if layer.name == "conv")
    del conv.blobs[0].data[-1]
    cases = {
        "short.caffemodel": (short.SerializeToString(), r"layer 'conv' \(at byte \d+\) blob 0 holds 107 values but its "
                                                        r"shape 4x3x3x3 needs 108: the file is damaged"),
        "empty.caffemodel": (b"", r"the file is empty"),
        "text.caffemodel": (path.read_bytes(), r"a text file, not a binary \.caffemodel \(is it a prototxt\?\)"),
        "png.caffemodel": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, r"not a valid binary \.caffemodel: the "
                                                                          r"protobuf encoding breaks at byte \d+"),
        "weights.h5": (b"\x89HDF\r\n\x1a\n" + bytes(100), r"HDF5 weights, which hybrid_infer does not read"),
        "onnx.caffemodel": (bytes([0x08, 0x07, 0x3A, 0x02, 0x10, 0x01]), r"holds no named layers"),
        "cut.caffemodel": (data[: len(data) - 100], rf"truncated: the file ends at byte {len(data) - 100}, inside "
                                                    r"a field that starts at byte \d+ \(after \d+ complete layer"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelError, match=message):
            CaffeModel(path, tmp_path / name)
    for text, message in (
            (NET.replace('name: "fc"', 'name: "fc2"'),
             r"w\.caffemodel has no weights for layer\(s\) fc2 \(closest in the caffemodel: fc\) of .*; pass the "
             r"caffemodel trained for this prototxt"),
            (NET.replace("num_output: 5 }", "num_output: 5 bias_term: false }"),
             r"layer 'fc' has 1 parameter blob\(s\) in the prototxt but 2 in the caffemodel"),
            (NET.replace("num_output: 4 kernel_size: 3", "num_output: 6 kernel_size: 3"),
             r"does not fit .*: layer 'conv' blob 0: shape mismatch: the caffemodel holds 4x3x3x3, the prototxt "
             r"needs 6x3x3x3")):
        with pytest.raises(ModelError, match=message):
            CaffeModel(make_prototxt(text), weights)


def test_any_damage_is_a_model_error_or_a_readable_file(make_prototxt, tmp_path):
    """Flipped bytes, truncations and noise: read_caffemodel raises ModelError or reads the
    file, never anything else (which the CLI would show as a traceback)."""
    _, _, weights = _saved(make_prototxt, tmp_path)
    original = weights.read_bytes()
    rng = np.random.default_rng()
    damaged = tmp_path / "damaged.caffemodel"
    for i in range(300):
        data = bytearray(original)
        if i % 3 == 0:
            for where in rng.integers(len(data), size=rng.integers(1, 20)):
                data[where] = int(rng.integers(256))
        elif i % 3 == 1:
            data = data[:rng.integers(1, len(data))]
        else:
            data = bytearray(rng.integers(256, size=rng.integers(1, 400), dtype=np.uint8).tobytes())
        damaged.write_bytes(bytes(data))
        try:
            read_caffemodel(damaged)
        except ModelError:
            pass


def test_cli_error_for_a_damaged_caffemodel_is_one_line(make_prototxt, tmp_path):
    path, _, weights = _saved(make_prototxt, tmp_path)
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(weights.read_bytes()[:300])
    proc = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "run", str(path), "--weights", str(cut)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "truncated" in proc.stderr


@pytest.mark.big_file
def test_caffemodel_over_512_mib_loads(make_prototxt, tmp_path):
    """A VGG-16-sized file (600 MiB, one 157M-parameter InnerProduct) written by Caffe."""
    path = make_prototxt('input: "data" input_shape { dim: 1 dim: 38400 }\n'
                         'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                         'inner_product_param { num_output: 4096 bias_term: false } }\n')
    weights = tmp_path / "big.caffemodel"
    try:
        cf = caffe()
        cf.set_mode_cpu()
        net = cf.Net(str(path), cf.TEST)
        blob = net.params["fc"][0].data
        np.random.default_rng().standard_normal(out=blob.reshape(-1), dtype=np.float32)
        expected = hashlib.sha256(blob.data).hexdigest()
        net.save(str(weights))
        del net, blob
        assert weights.stat().st_size > 600 * 2**20
        model = CaffeModel(path, weights)
        assert hashlib.sha256(model.weights["fc"][0].data).hexdigest() == expected
    finally:
        weights.unlink(missing_ok=True)
