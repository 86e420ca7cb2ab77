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
# protobuf's own varint encoder: the files are written byte by byte to get layouts Caffe's writer never makes
from google.protobuf.internal.encoder import _VarintBytes
import pytest

import hybrid_infer
from hybrid_infer.cli.main import main
from hybrid_infer.errors import ModelError
from hybrid_infer.metrics import relative_l2
from hybrid_infer.model.caffe_import import caffe, caffe_pb2
from hybrid_infer.model.caffe_model import CaffeModel
from hybrid_infer.model.caffemodel import read_caffemodel

from pycaffe_reference import REPRO, caffe_forward, caffe_refuses

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


def test_other_fork_weights_repro_runs_and_matches_caffe_on_the_original(shared_models, tmp_path, capsys):
    prototxt = shared_models / "lenet_mnist/mnist_deploy.prototxt"
    original = shared_models / "lenet_mnist/lenet_iter_10000.caffemodel"
    forked = tmp_path / "fork.caffemodel"
    script = REPRO / "other_fork_weights.py"
    if script.is_file():
        subprocess.run([sys.executable, str(script), str(original), str(forked)], check=True)
    else:
        _fork_file(original, forked)
    assert "Failed to parse NetParameter file" in caffe_refuses(prototxt, forked)
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
        (bytes([0xA2, 0x06]) + _VarintBytes(len(raw)) + raw) for raw in
        [net.layer[0].SerializeToString(), conv, *[la.SerializeToString() for la in net.layer[2:]]]))
    for variant in (forked, odd):
        _assert_same_weights(CaffeModel(path, variant), _caffe_params(path, weights))



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
             r"layer 'fc' \(InnerProduct\): blob count 1 vs 2 in the caffemodel \(its layer at byte \d+; Caffe "
             r"refuses: \"Incompatible number of blobs for layer fc\"\)"),
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


def _key(field: int, wire: int) -> bytes:
    return _VarintBytes(field << 3 | wire)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _VarintBytes(len(payload)) + payload


def _unpacked_blob(values: np.ndarray, shape: tuple[int, ...], double: bool = False, split: int = 0) -> bytes:
    """A BlobProto whose values are stored one key per value (valid protobuf, which Caffe's
    writer never produces), after ``split`` of them stored packed."""
    dims = b"".join(_VarintBytes(d) for d in shape)
    out = _length_delimited(7, _length_delimited(1, dims))
    field, wire, code = (8, 1, "<f8") if double else (5, 5, "<f4")
    if split:
        out += _length_delimited(field, values[:split].astype(code).tobytes())
    key = _key(field, wire)
    out += b"".join(key + v.tobytes() for v in values[split:].astype(code))
    return out


def test_unpacked_values_read_as_caffe_reads_them_in_bounded_memory(make_prototxt, tmp_path):
    """Float and double values stored unpacked (one key each), alone or after a packed run:
    the same values as Caffe's own reader gives, with memory about that of the values
    (the reviewer's 5 MB file took 656 MiB and seconds)."""
    import tracemalloc
    rng = np.random.default_rng()
    path = make_prototxt('''input: "data" input_shape { dim: 1 dim: 400 }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 500 } }
''')
    weight, bias = rng.standard_normal((500, 400)).astype(np.float32), rng.standard_normal(500).astype(np.float32)
    for double, split in ((False, 0), (True, 0), (False, 1000)):
        layer = _length_delimited(1, b"fc") + _length_delimited(7, _unpacked_blob(weight.ravel(), weight.shape,
                                                                                 double, split)) \
            + _length_delimited(7, _unpacked_blob(bias, bias.shape, double))
        file = tmp_path / f"unpacked{int(double)}{split}.caffemodel"
        file.write_bytes(_length_delimited(100, layer))
        expected = _caffe_params(path, file)
        np.testing.assert_array_equal(expected["fc"][0], weight)
        tracemalloc.start()
        try:
            stored = read_caffemodel(file)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        np.testing.assert_array_equal(stored[0].blobs[0].data.reshape(500, 400), weight)
        np.testing.assert_array_equal(stored[0].blobs[1].data, bias)
        values_bytes = weight.nbytes * (2 if double else 1)
        assert peak < 2.5 * values_bytes, f"peak {peak} bytes for {values_bytes} bytes of values"
        _assert_same_weights(CaffeModel(path, file), expected)


def _solver_state(path) -> None:
    state = caffe_pb2().SolverState(iter=1234, learned_net="snapshots/net_iter_1234.caffemodel", current_step=1)
    state.history.add().data.extend([0.5, 0.25])
    path.write_bytes(state.SerializeToString())


@pytest.mark.parametrize("content, message", [
    ("\ufeffname: \"net\"\nlayer { name: \"a\" }\n".encode(), r"a text file, not a binary \.caffemodel \(is it a prototxt\?\)"),
    ("# réseau pour la détection\nname: \"net\"\n".encode(), r"a text file, not a binary \.caffemodel"),
    ("# 检测网络\n".encode() * 60, r"a text file, not a binary \.caffemodel"),
    (b"\n", r"truncated: the file ends at byte 1"),
    (None, r"a Caffe solver state \(\.solverstate: iteration 1234, its weights saved as "
           r"'snapshots/net_iter_1234\.caffemodel'\), not weights; pass the \.caffemodel written with it"),
])
def test_what_a_weights_file_really_is(make_prototxt, tmp_path, content, message):
    path = make_prototxt(NET)
    file = tmp_path / "given.caffemodel"
    if content is None:
        _solver_state(file)
    else:
        file.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        CaffeModel(path, file)


def test_negative_dims_and_mixed_layer_formats(make_prototxt, tmp_path):
    path, _, weights = _saved(make_prototxt, tmp_path)
    net = caffe_pb2().NetParameter()
    net.ParseFromString(weights.read_bytes())
    conv = next(layer for layer in net.layer if layer.name == "conv")
    del conv.blobs[0].shape.dim[:]
    conv.blobs[0].shape.dim.extend([-2, 3, 3, 3])
    negative = tmp_path / "negative.caffemodel"
    negative.write_bytes(net.SerializeToString())
    with pytest.raises(ModelError, match=r"layer 'conv' blob 0: shape mismatch: the caffemodel holds -2x3x3x3, "):
        CaffeModel(path, negative)
    mixed = caffe_pb2().NetParameter()
    mixed.ParseFromString(weights.read_bytes())
    mixed.layers.add(name="old")
    both = tmp_path / "both.caffemodel"
    both.write_bytes(mixed.SerializeToString())
    assert "Refusing to upgrade inconsistent NetParameter input" in caffe_refuses(path, both)
    with pytest.raises(ModelError, match=r"holds both 'layer' \(current\) and 'layers' \(V1\) entries, which "
                                         r"Caffe refuses"):
        CaffeModel(path, both)
    text = make_prototxt(NET + 'layers { name: "old" type: RELU bottom: "fc" top: "fc" }\n')
    with pytest.raises(ModelError, match=r"uses both 'layer \{\}' and the old 'layers \{\}' entries, which Caffe "
                                         r"refuses"):
        CaffeModel(text)


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
