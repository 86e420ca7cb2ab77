"""Loading prototxt/caffemodel files: the formats Caffe accepts and the errors users get."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hybrid_infer.errors import EnvironmentProblem, ModelError
from hybrid_infer.graph.layer_graph import LayerGraph
from hybrid_infer.model.caffe_model import CaffeModel

CONV = 'convolution_param { num_output: 4 kernel_size: 3 }'


def test_legacy_input_fields(make_prototxt):
    for inputs in ('input: "data" input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8',
                   'input: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }'):
        model = CaffeModel(make_prototxt(f'{inputs}\nlayer {{ name: "c" type: "Convolution" bottom: "data" top: "c" {CONV} }}'))
        graph = LayerGraph(model)
        assert graph.inputs == ["data"]
        assert graph.values["data"].shape == (2, 3, 8, 8)
        assert graph.values["c"].shape == (2, 4, 6, 6)


def test_phase_rules_and_multiple_tops(make_prototxt):
    model = CaffeModel(make_prototxt('''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "train_only" type: "Dropout" bottom: "data" top: "d" include { phase: TRAIN } }
layer { name: "not_test" type: "ReLU" bottom: "data" top: "r" exclude { phase: TEST } }
layer { name: "slice" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { slice_point: 1 } }
layer { name: "test_only" type: "TanH" bottom: "a" top: "a" include { phase: TEST } }
'''))
    names = [layer.name for layer in model.layers]
    assert names == ["data", "slice", "test_only"]
    graph = LayerGraph(model)
    assert graph.values["a"].shape == (1, 1, 8, 8) and graph.values["b"].shape == (1, 2, 8, 8)
    assert sorted(graph.outputs) == ["a@test_only", "b"]


def test_v1_prototxt_is_upgraded(make_prototxt):
    model = CaffeModel(make_prototxt('''
input: "data" input_dim: 1 input_dim: 3 input_dim: 5 input_dim: 5
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
'''))
    # Caffe's upgrade turns the legacy input fields into an Input layer of its own naming.
    assert [layer.type for layer in model.layers] == ["Input", "Convolution", "ReLU"]
    assert [layer.name for layer in model.layers][1:] == ["conv", "relu"]
    assert LayerGraph(model).inputs == ["data"]


def test_malformed_prototxt_names_file_and_line(make_prototxt):
    path = make_prototxt('layer {\n  name: "x"\n  type: "ReLU"\n  bottom: "data" top "x"\n}\n')
    with pytest.raises(ModelError, match=rf"{path}:4: "):
        CaffeModel(path)


def test_unknown_layer_type(make_prototxt):
    path = make_prototxt('input: "data" input_shape { dim: 1 dim: 1 }\n'
                         'layer { name: "mystery" type: "NoSuchLayer" bottom: "data" top: "y" }')
    with pytest.raises(ModelError, match="layer 'mystery' has type 'NoSuchLayer'"):
        CaffeModel(path)


def test_dangling_blob(make_prototxt):
    path = make_prototxt('input: "data" input_shape { dim: 1 dim: 1 }\n'
                         'layer { name: "r" type: "ReLU" bottom: "nowhere" top: "y" }')
    with pytest.raises(ModelError, match="reads blob 'nowhere', which no earlier layer produces"):
        CaffeModel(path)


def test_python_layer_with_missing_module(make_prototxt):
    path = make_prototxt('input: "data" input_shape { dim: 1 dim: 1 }\n'
                         'layer { name: "py" type: "Python" bottom: "data" top: "y" '
                         'python_param { module: "no_such_module_xyz" layer: "L" } }')
    with pytest.raises(EnvironmentProblem, match="needs module 'no_such_module_xyz'.*PYTHONPATH"):
        CaffeModel(path)


def test_bad_layer_parameters_give_caffes_message(make_prototxt):
    path = make_prototxt('input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }\n'
                         'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                         'convolution_param { num_output: 2 kernel_size: 9 } }')
    with pytest.raises(ModelError, match="Caffe cannot set this net up"):
        CaffeModel(path)


def test_missing_files():
    with pytest.raises(ModelError, match="does not exist"):
        CaffeModel("/nonexistent/deploy.prototxt")


def test_weights_from_caffemodel_and_missing_weights(make_prototxt, tmp_path):
    from hybrid_infer.model.caffe_import import caffe
    text = 'input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n' \
           f'layer {{ name: "c" type: "Convolution" bottom: "data" top: "c" {CONV} }}\n'
    model = CaffeModel(make_prototxt(text))
    model.set_random_weights(3)
    net = model.reference_net()
    weights_file = tmp_path / "w.caffemodel"
    net.save(str(weights_file))
    loaded = CaffeModel(make_prototxt(text), weights_file)
    np.testing.assert_array_equal(loaded.weights["c"][0], model.weights["c"][0])
    bigger = text + 'layer { name: "c2" type: "Convolution" bottom: "c" top: "c2" convolution_param { num_output: 2 kernel_size: 1 } }\n'
    with pytest.raises(ModelError, match="no weights for layer\\(s\\) c2"):
        CaffeModel(make_prototxt(bigger), weights_file)
    assert caffe() is not None


def test_weights_of_other_model_are_rejected(shared_models):
    # cifar10's ip1 is the closest to lenet's ip2; conv1's shapes differ too, but a layer
    # without weights is named first.
    with pytest.raises(ModelError, match=r"cifar10_full_iter_70000.caffemodel has no weights for layer\(s\) ip2 "
                                         r"\(closest in the caffemodel: ip1\) of .*mnist_deploy.prototxt"):
        CaffeModel(shared_models / "lenet_mnist/mnist_deploy.prototxt",
                   shared_models / "cifar10_full/cifar10_full_iter_70000.caffemodel")


def test_caffemodel_layers_absent_from_prototxt_are_ignored(shared_models):
    # MTCNN's det2.caffemodel carries a layer conv5-3 that det2.prototxt lacks.
    model = CaffeModel(shared_models / "mtcnn/det2.prototxt", shared_models / "mtcnn/det2.caffemodel")
    assert "conv5-3" not in model.weights
    assert model.weights["conv1"][0].shape[0] == 28


def test_cli_error_is_one_line_with_exit_code_2(make_prototxt):
    path = make_prototxt('layer { name: "x" type: "ReLU" bottom: "nothing" top: "x" }')
    proc = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "partition", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "no earlier layer produces" in proc.stderr


def test_v1_upgrade_leaves_no_log_files(make_prototxt, tmp_path, monkeypatch):
    # glog writes its log files to $TMPDIR unless told to log to stderr.
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setenv("TMPDIR", str(logs))
    CaffeModel(make_prototxt('input: "data" input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4\n'
                             'layers { name: "relu" type: RELU bottom: "data" top: "r" }'))
    assert list(logs.iterdir()) == []
