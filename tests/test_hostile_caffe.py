"""Caffe's aborts and a model's structure (issue 13, kinds 1 and 6), with real pycaffe.

(V1 models leaving no glog files is tested in test_loading.py.)

What Caffe would abort on is refused before Caffe is asked, with a message saying what to
change; what cannot be foreseen is rehearsed in a forked child, so these tests calling
Caffe in-process survive every case (a regression would kill the test process itself).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.cli.main import main
from hybrid_infer.errors import InputError, ModelError
from hybrid_infer.metrics import relative_l2

from conftest import GRAPHS
from fuzz_mutators import HOSTILE_LAYERS

LENET = GRAPHS / "lenet_digits"
RNG = np.random.default_rng(13)


def _lenet_with(make_prototxt, old: str, new: str) -> str:
    text = (LENET / "deploy.prototxt").read_text()
    assert old in text
    return str(make_prototxt(text.replace(old, new)))


def _inputs(shape) -> dict[str, np.ndarray]:
    return {"data": RNG.standard_normal(shape).astype(np.float32)}


def test_stochastic_pooling_is_refused_on_the_cpu_before_caffe_aborts(make_prototxt, capsys):
    path = _lenet_with(make_prototxt, "pool: MAX", "pool: STOCHASTIC")
    for engine in ("auto", "caffe"):
        assert main(["run", path, "--random-weights", "1", "--engine", engine, "--check"]) == 2
        err = capsys.readouterr().err.strip()
        assert "pool1" in err and "STOCHASTIC" in err and "--device" in err and len(err.splitlines()) == 1
    net = hybrid_infer.load(path, random_weights=2)
    with pytest.raises(ModelError, match="stochastic pooling only on the GPU"):
        net.run_caffe(_inputs((1, 1, 16, 16)))


def test_memory_data_layer_is_refused_with_the_input_layer_to_write(make_prototxt):
    text = (LENET / "deploy.prototxt").read_text().replace(
        'type: "Input"\n  top: "data"\n  input_param { shape { dim: 1 dim: 1 dim: 16 dim: 16 } }',
        'type: "MemoryData"\n  top: "data"\n  top: "label"\n'
        '  memory_data_param { batch_size: 1 channels: 1 height: 16 width: 16 }')
    text += 'layer { name: "silence" type: "Silence" bottom: "label" }\n'
    with pytest.raises(ModelError, match=r"MemoryData.*Replace it with an Input layer.*dim: 1 dim: 1 dim: 16 dim: 16"):
        hybrid_infer.load(make_prototxt(text), random_weights=1)


def test_reshape_fixing_the_batch_runs_at_its_batch_and_is_refused_at_another(make_prototxt):
    path = make_prototxt('''
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                convolution_param { num_output: 4 kernel_size: 1 } }
        layer { name: "rs" type: "Reshape" bottom: "conv" top: "rs" reshape_param { shape { dim: 1 dim: 64 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "rs" top: "ip" inner_product_param { num_output: 3 } }''')
    net = hybrid_infer.load(path, random_weights=3, min_segment_size=1)
    x = _inputs((1, 2, 4, 4))
    assert relative_l2(net.run(x)["ip"], net.run_caffe(x)["ip"]) < 1e-5
    with pytest.raises(InputError, match=r"run at batch 2: layer 'rs' \(Reshape\) writes the batch axis as 1"):
        net.run_caffe(_inputs((2, 2, 4, 4)))  # Caffe would abort: refused before it reshapes
    # The lowered Reshape keeps the prototxt's size too, and ONNX Runtime fails on it; running
    # 'rs' in Caffe would not help (the reviewer's wrong --fallback advice), the batch does.
    with pytest.raises(InputError) as caught:
        net.run(_inputs((2, 2, 4, 4)))
    assert "layer 'rs' (Reshape) writes the batch axis as 1" in str(caught.value)
    assert "--input-shape data=2x2x4x4" in str(caught.value) and "--fallback" not in str(caught.value)


SLICE_ON_BATCH = '''
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 2 dim: 4 dim: 4 } } }
    layer { name: "sl" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { axis: 0 slice_point: 1 } }
    layer { name: "ca" type: "Convolution" bottom: "a" top: "ca" convolution_param { num_output: 2 kernel_size: 1 } }
    layer { name: "cb" type: "Convolution" bottom: "b" top: "cb" convolution_param { num_output: 2 kernel_size: 1 } }
'''


def test_an_unforeseen_caffe_abort_becomes_an_error_with_caffes_message(make_prototxt):
    """Slicing the batch axis at 1 cannot work at batch 1; nothing predicts it, Caffe's
    reshape CHECK fires, in the rehearsal child, and this process lives on."""
    net = hybrid_infer.load(make_prototxt(SLICE_ON_BATCH), random_weights=4, engine="caffe")
    x = _inputs((2, 2, 4, 4))
    reference = net.run_caffe(x)
    assert relative_l2(net.run(x)["ca"], reference["ca"]) < 1e-6
    one = _inputs((1, 2, 4, 4))
    with pytest.raises(ModelError, match=r"Caffe segment0 \(sl, ca, cb\): Caffe failed: .*slice_layer\.cpp"):
        net.run(one)
    with pytest.raises(ModelError, match=r"in pure Caffe: Caffe failed: .*slice_layer\.cpp"):
        net.run_caffe(one)
    # The nets are still usable at the shape that works.
    assert relative_l2(net.run(x)["cb"], net.run_caffe(x)["cb"]) < 1e-6


COUNTING_LAYER = HOSTILE_LAYERS + '''

class CountForward(caffe.Layer):
    """Appends a line per forward call to the file named by param_str (child or parent)."""
    def setup(self, bottom, top): pass
    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
    def forward(self, bottom, top):
        import os
        with open(self.param_str, "a") as f:
            f.write(f"{os.getpid()}\\n")
        top[0].data[...] = bottom[0].data * 2
'''


@pytest.fixture
def python_layer_net(make_prototxt, tmp_path, monkeypatch):
    """A net with one Python layer of the given class from COUNTING_LAYER."""
    (tmp_path / "hostile_layers.py").write_text(COUNTING_LAYER)
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(layer: str, param: str = "") -> str:
        return str(make_prototxt(f'''
            layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 2 dim: 3 dim: 3 }} }} }}
            layer {{ name: "py" type: "Python" bottom: "data" top: "py"
                    python_param {{ module: "hostile_layers" layer: "{layer}" param_str: "{param}" }} }}'''))
    return make


def test_each_new_input_shape_is_rehearsed_once_in_a_child(python_layer_net, tmp_path):
    log = tmp_path / "calls.txt"
    net = hybrid_infer.load(python_layer_net("CountForward", str(log)), random_weights=0)

    def calls() -> list[int]:
        return [int(pid) for pid in log.read_text().split()] if log.exists() else []

    x = _inputs((1, 2, 3, 3))
    np.testing.assert_array_equal(net.run(x)["py"], 2 * x["data"])
    first = calls()
    assert len(first) == 2 and first[0] != os.getpid() and first[1] == os.getpid()  # child, then here
    net.run(x)
    assert len(calls()) == 3  # same shape: this process only
    net.run(_inputs((3, 2, 3, 3)))
    assert len(calls()) == 5  # a new shape is rehearsed again


def test_a_python_layer_raising_in_forward_is_a_clear_error(python_layer_net):
    net = hybrid_infer.load(python_layer_net("RaiseInForward"), random_weights=0)
    for call in (net.run, net.run_caffe):
        with pytest.raises(ModelError, match=r"ValueError: hostile layer: forward refuses "
                                             r"\(raised in hostile_layers\.py:\d+, forward\)"):
            call(_inputs((1, 2, 3, 3)))


def test_a_python_layer_raising_after_the_rehearsal_is_a_clear_error_too(python_layer_net):
    net = hybrid_infer.load(python_layer_net("RaiseOnSecondCall"), random_weights=0)
    x = _inputs((1, 2, 3, 3))
    np.testing.assert_array_equal(net.run(x)["py"], x["data"])  # the child's call does not count here
    with pytest.raises(ModelError, match=r"a layer raised ArithmeticError: hostile layer: second call refused"):
        net.run(x)


def test_input_layer_without_a_shape_names_the_fix(make_prototxt):
    path = make_prototxt('''
        layer { name: "data" type: "Input" top: "data" }
        layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }''')
    with pytest.raises(ModelError, match=r"Input layer 'data' gives no shape for 'data'.*--input-shape data="):
        hybrid_infer.load(path)
    net = hybrid_infer.load(path, input_shapes={"data": (2, 3, 4, 5)}, random_weights=0)
    x = _inputs((2, 3, 4, 5))
    np.testing.assert_allclose(net.run(x)["relu"], np.maximum(x["data"], 0), rtol=0, atol=0)
    np.testing.assert_allclose(net.run_caffe(x)["relu"], np.maximum(x["data"], 0), rtol=0, atol=0)


def test_input_dimension_below_one_is_refused(make_prototxt):
    path = make_prototxt('''
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 0 dim: 4 } } }
        layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }''')
    with pytest.raises(ModelError, match=r"gives 'data' the shape \(1, 0, 4\); every dimension must be 1 or more"):
        hybrid_infer.load(path)
