"""What Caffe itself does with prototxts that say one thing and make it compute another
(issue 13, the review's kinds 3, 4, 5, 11, 18): the hybrid either reproduces Caffe exactly
or refuses with one line naming the layer. Every expectation is Caffe's own behaviour, seen
through a fresh pycaffe net on the same prototxt.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.cli.main import main
from hybrid_infer.errors import InputError, ModelError
from hybrid_infer.metrics import relative_l2
from hybrid_infer.model.caffe_limits import IN_PLACE_TYPES, VALUE_CHECKED_TYPES
from hybrid_infer.model.caffe_import import registered_layer_types
from hybrid_infer.model.isolated import CaffeFailure, call_isolated
from hybrid_infer.testing import net

from pycaffe_reference import caffe_forward


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _x(shape, seed: int) -> dict[str, np.ndarray]:
    return {"data": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


CONV = ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
        'convolution_param { num_output: 4 kernel_size: 1 } }\n')


# --- a layer's own phase: TRAIN (layer.hpp: phase_ = param.phase(); net.cpp sets only unset ones) ----

def test_batch_norm_with_its_own_train_phase_uses_batch_statistics_as_caffe_does(make_prototxt):
    seed = _seed()
    path = make_prototxt(net(CONV + 'layer { name: "bn" type: "BatchNorm" bottom: "c" top: "bn" phase: TRAIN }',
                             data=(4, 3, 5, 5)))
    x = _x((4, 3, 5, 5), seed)
    with hybrid_infer.load(path, random_weights=seed, min_segment_size=1) as hybrid:
        assert "normalises by the statistics of the batch" in hybrid.partition.fallback_reasons["bn"]
        want = caffe_forward(path, x, ["bn"], weights=hybrid.model.weights)["bn"]
        # Caffe really used the batch's statistics, not the (random) stored ones.
        per_channel = want.transpose(1, 0, 2, 3).reshape(4, -1)
        assert np.abs(per_channel.mean(axis=1)).max() < 1e-4
        assert relative_l2(hybrid.run(x)["bn"], want) <= 1e-5


def test_batch_norm_with_train_phase_and_explicit_global_stats_is_lowered(make_prototxt):
    seed = _seed()
    path = make_prototxt(net(CONV + 'layer { name: "bn" type: "BatchNorm" bottom: "c" top: "bn" phase: TRAIN '
                                    'batch_norm_param { use_global_stats: true } }', data=(2, 3, 5, 5)))
    x = _x((2, 3, 5, 5), seed)
    with hybrid_infer.load(path, random_weights=seed, min_segment_size=1) as hybrid:
        assert "bn" not in hybrid.partition.fallback_reasons
        want = caffe_forward(path, x, ["bn"], weights=hybrid.model.weights)["bn"]
        assert relative_l2(hybrid.run(x)["bn"], want) <= 1e-5


def test_dropout_with_its_own_train_phase_is_refused_since_caffe_drops_at_random(make_prototxt):
    path = make_prototxt(net(CONV + 'layer { name: "d" type: "Dropout" bottom: "c" top: "d" phase: TRAIN }',
                             data=(1, 3, 6, 6)))
    weights = {"c": [np.ones((4, 3, 1, 1), np.float32), np.zeros(4, np.float32)]}
    x = {"data": np.ones((1, 3, 6, 6), np.float32)}
    runs = [caffe_forward(path, x, ["d"], weights=weights)["d"] for _ in range(2)]
    assert (runs[0] == 0).any() and not np.array_equal(runs[0], runs[1])  # Caffe: random zeros
    with pytest.raises(ModelError, match=r"layer 'd' \(Dropout\) has phase: TRAIN, so Caffe zeroes random units"):
        hybrid_infer.load(path)


# --- in place (bottom == top) -------------------------------------------------------------------

REFUSED_IN_PLACE = {  # each: Caffe computes something else in place than into a new top
    "Convolution": 'convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" } }',
    "Pooling": "pooling_param { kernel_size: 3 stride: 1 pad: 1 }",
    "LRN": "lrn_param { local_size: 3 }",
}


@pytest.mark.parametrize("layer_type", sorted(REFUSED_IN_PLACE))
def test_layers_caffe_cannot_compute_in_place_are_refused(make_prototxt, layer_type):
    seed = _seed()
    params = REFUSED_IN_PLACE[layer_type]
    in_place = make_prototxt(net(f'layer {{ name: "op" type: "{layer_type}" bottom: "data" top: "data" {params} }}',
                                 data=(2, 3, 6, 6)))
    apart = make_prototxt(net(f'layer {{ name: "op" type: "{layer_type}" bottom: "data" top: "out" {params} }}',
                              data=(2, 3, 6, 6)))
    x = _x((2, 3, 6, 6), seed)
    weights = {"op": [np.random.default_rng(seed).standard_normal((3, 3, 1, 1)).astype(np.float32),
                      np.zeros(3, np.float32)]} if layer_type == "Convolution" else None
    caffe_in_place = caffe_forward(in_place, x, ["data"], weights=weights)["data"]
    caffe_apart = caffe_forward(apart, x, ["out"], weights=weights)["out"]
    assert relative_l2(caffe_in_place, caffe_apart) > 1e-3  # why it is refused
    with pytest.raises(ModelError, match=rf"layer 'op' \({layer_type}\) computes in place \(its top 'data' is its "
                                         r"bottom\).*give the layer a new top"):
        hybrid_infer.load(in_place)


@pytest.mark.parametrize("layer_type, params", [
    ("ReLU", "relu_param { negative_slope: 0.2 }"), ("TanH", ""), ("Power", "power_param { power: 2 shift: 1 }"),
    ("Scale", "scale_param { bias_term: true }"), ("BatchNorm", ""), ("Softmax", ""),
    ("MVN", ""), ("LRN", "lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL }"),
])
def test_layers_safe_in_place_match_caffe_in_place(make_prototxt, layer_type, params):
    seed = _seed()
    path = make_prototxt(net(CONV + f'layer {{ name: "op" type: "{layer_type}" bottom: "c" top: "c" {params} }}'
                                    'layer { name: "t" type: "TanH" bottom: "c" top: "t" }', data=(2, 3, 6, 6)))
    x = _x((2, 3, 6, 6), seed)
    with hybrid_infer.load(path, random_weights=seed, engine="onnxruntime") as hybrid:
        want = caffe_forward(path, x, ["t"], weights=hybrid.model.weights)["t"]
        assert relative_l2(hybrid.run(x)["t"], want) <= 1e-5


def test_the_in_place_table_names_layer_types_of_this_caffe():
    assert (IN_PLACE_TYPES | VALUE_CHECKED_TYPES) <= registered_layer_types()


# --- shapes this fork no longer checks (eltwise_layer.cpp, scale_layer.cpp) ------------------------------

def test_eltwise_of_two_shapes_is_refused_naming_both(make_prototxt):
    path = make_prototxt(net(
        'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { kernel_size: 2 stride: 2 } }\n'
        'layer { name: "e" type: "Eltwise" bottom: "p" bottom: "data" top: "e" }', data=(1, 3, 8, 8)))
    with pytest.raises(ModelError, match=r"layer 'e' \(Eltwise\) combines 'p' of shape \(1, 3, 4, 4\) with 'data' "
                                         r"of shape \(1, 3, 8, 8\)"):
        hybrid_infer.load(path)


def test_scale_with_a_second_bottom_of_the_wrong_shape_is_refused(make_prototxt):
    path = make_prototxt(net(CONV + 'layer { name: "sc" type: "Scale" bottom: "c" bottom: "s" top: "o" '
                                    'scale_param { axis: 1 } }', data=(1, 3, 8, 8), s=(1, 1, 8)))
    with pytest.raises(ModelError, match=r"layer 'sc' \(Scale\) multiplies 'c' of shape \(1, 4, 8, 8\) by 's' of "
                                         r"shape \(1, 1, 8\), which must equal the first bottom's shape from axis 1 "
                                         r"on, \(4, 8, 8\)"):
        hybrid_infer.load(path)


def test_scale_with_a_fitting_second_bottom_matches_caffe(make_prototxt):
    seed = _seed()
    path = make_prototxt(net(CONV + 'layer { name: "sc" type: "Scale" bottom: "c" bottom: "s" top: "o" '
                                    'scale_param { axis: 0 } }', data=(2, 3, 5, 5), s=(2, 4)))
    rng = np.random.default_rng(seed)
    x = {"data": rng.standard_normal((2, 3, 5, 5)).astype(np.float32),
         "s": rng.standard_normal((2, 4)).astype(np.float32)}
    with hybrid_infer.load(path, random_weights=seed) as hybrid:
        want = caffe_forward(path, x, ["o"], weights=hybrid.model.weights)["o"]
        assert relative_l2(hybrid.run(x)["o"], want) <= 1e-5


# --- BatchReindex: Caffe CHECKs its indices at every forward ---------------------------------------

INDEX_LAYER = 'layer { name: "INDEX" type: "Power" bottom: "idx" top: "pidx" power_param { scale: 1 } }'
REINDEX = '''layer { name: "data" type: "Input" top: "data" top: "idx"
                input_param { shape { dim: 3 dim: 2 dim: 4 dim: 4 } shape { dim: 3 } } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 1 } }
INDEX_LAYER
layer { name: "br" type: "BatchReindex" bottom: "c" bottom: "IDXBLOB" top: "b" }
layer { name: "t" type: "TanH" bottom: "b" top: "t" }
'''


@pytest.mark.parametrize("through_a_layer", [False, True], ids=["input", "computed"])
def test_batch_reindex_out_of_range_never_aborts_and_valid_indices_match_caffe(make_prototxt, through_a_layer):
    text = REINDEX.replace("IDXBLOB", "pidx" if through_a_layer else "idx")
    text = text.replace("INDEX_LAYER", INDEX_LAYER if through_a_layer else "")
    path = make_prototxt(text)
    seed = _seed()
    data = np.random.default_rng(seed).standard_normal((3, 2, 4, 4)).astype(np.float32)
    good = {"data": data, "idx": np.array([2, 0, 1.5], np.float32)}
    with hybrid_infer.load(path, random_weights=seed) as hybrid:
        want = caffe_forward(path, good, ["t"], weights=hybrid.model.weights)["t"]
        assert relative_l2(hybrid.run(good)["t"], want) <= 1e-5  # shape (3, ...) rehearsed here
        for bad in (3, -1, np.nan):
            feeds = {"data": data, "idx": np.array([0, bad, 1], np.float32)}
            # The same shape again: Caffe's CHECK would abort this process.
            expected = (r"Caffe failed: Check failed: .*reindex" if through_a_layer else
                        r"input 'idx' holds .* at \(1,\), but layer 'br' \(BatchReindex\) takes indices in \[0, 3\)")
            for call in (hybrid.run, hybrid.run_caffe):
                with pytest.raises((InputError, ModelError), match=expected):
                    call(feeds)
        assert relative_l2(hybrid.run(good)["t"], want) <= 1e-5  # still usable


def test_batch_reindex_indices_without_an_input_file_are_valid(make_prototxt, capsys):
    path = make_prototxt(REINDEX.replace("IDXBLOB", "idx").replace("INDEX_LAYER", ""))
    assert main(["run", str(path), "--random-weights", "1", "--batch", "2", "--check"]) == 0
    out = capsys.readouterr().out
    assert "random whole numbers in [0, 2)" in out and "'br'" in out


# --- inputs without a batch axis -------------------------------------------------------------------

def test_inputs_differing_on_their_first_axis_are_explained(make_prototxt, tmp_path, capsys):
    """Caffe takes any shapes; the hybrid shares one batch axis between all inputs, so a
    second input without one is refused with what to change, and the suggested
    --input-shape runs and matches pycaffe."""
    path = make_prototxt(net(CONV + 'layer { name: "sc" type: "Scale" bottom: "c" bottom: "w" top: "o" '
                                    'scale_param { axis: 1 } }', data=(1, 3, 8, 8), w=(4,)))
    assert main(["run", str(path), "--random-weights", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "its inputs differ on their first axis ('data' (1, 3, 8, 8), 'w' (4,))" in err and "\n" not in err
    assert "--input-shape" in err
    seed = _seed()
    rng = np.random.default_rng(seed)
    x = {"data": rng.standard_normal((4, 3, 8, 8)).astype(np.float32), "w": rng.standard_normal(4).astype(np.float32)}
    with hybrid_infer.load(path, random_weights=seed, input_shapes={"data": (4, 3, 8, 8)}) as hybrid:
        wider = make_prototxt(net(CONV + 'layer { name: "sc" type: "Scale" bottom: "c" bottom: "w" top: "o" '
                                         'scale_param { axis: 1 } }', data=(4, 3, 8, 8), w=(4,)))
        want = caffe_forward(wider, x, ["o"], weights=hybrid.model.weights)["o"]
        assert relative_l2(hybrid.run(x)["o"], want) <= 1e-5


# --- prototxt bytes: Caffe's parser reads bytes, comments may hold anything --------------------------

def test_a_latin1_comment_is_read_as_caffe_reads_it(tmp_path):
    text = (b'name: "t" # caf\xe9\n' + net(CONV, data=(1, 3, 4, 4)).encode()
            + b'layer { name: "r#1" type: "ReLU" bottom: "c" top: "r" } # \xff\xfe "\n')
    path = tmp_path / "latin1.prototxt"
    path.write_bytes(text)

    def caffe_loads() -> None:
        from hybrid_infer.model.caffe_import import caffe
        caffe().Net(str(path), caffe().TEST)
    call_isolated(caffe_loads)  # Caffe accepts the file
    seed = _seed()
    with hybrid_infer.load(path, random_weights=seed) as hybrid:
        assert "r#1" in hybrid.graph.layers
        x = _x((1, 3, 4, 4), seed)
        want = caffe_forward(path, x, ["r"], weights=hybrid.model.weights)["r"]
        assert relative_l2(hybrid.run(x)["r"], want) <= 1e-5


def test_a_non_utf8_name_names_the_line(tmp_path):
    path = tmp_path / "name.prototxt"
    path.write_bytes(b'name: "t"\n' + b'layer { name: "caf\xe9" type: "Input" top: "data" '
                     b'input_param { shape { dim: 1 } } }\n')
    with pytest.raises(ModelError, match=r"name\.prototxt:2: byte 0xe9 \(outside a # comment\) is not UTF-8"):
        hybrid_infer.load(path)


def test_binary_data_is_not_a_prototxt(tmp_path):
    path = tmp_path / "nul.prototxt"
    path.write_bytes(b'name: "t"\x00\n')
    with pytest.raises(ModelError, match=r"holds binary data \(a NUL byte on line 1\)"):
        hybrid_infer.load(path)
    with pytest.raises(CaffeFailure):  # nor would Caffe read it

        def caffe_loads() -> None:
            from hybrid_infer.model.caffe_import import caffe
            caffe().Net(str(path), caffe().TEST)
        call_isolated(caffe_loads)
