"""Embed reads its input as row indices: net inputs holding anything else are refused before
any engine runs, an index that goes bad inside a segment stops ONNX Runtime with a one-line
error naming the layer, and valid indices match pycaffe (index_inputs.py, the Embed lowering).
"""
from __future__ import annotations

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.errors import InputError
from hybrid_infer.testing import net, rel_l2
from pycaffe_reference import caffe_forward

DIRECT = net("""
layer { name: "emb" type: "Embed" bottom: "data" top: "emb" embed_param { num_output: 4 input_dim: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "emb" top: "fc" inner_product_param { num_output: 3 axis: 2 } }
layer { name: "relu" type: "ReLU" bottom: "fc" top: "out" }
""", data=(2, 5))

# The indices are computed inside the segment (x + 1), so only the engine can see them.
SHIFTED = net("""
layer { name: "shift" type: "Power" bottom: "data" top: "idx" power_param { shift: 1 } }
layer { name: "emb" type: "Embed" bottom: "idx" top: "emb" embed_param { num_output: 4 input_dim: 3 } }
layer { name: "relu" type: "ReLU" bottom: "emb" top: "out" }
""", data=(2, 5))

GOOD = np.array([[0, 1, 2, 0, 1], [2, 2, 0, 1, 0]], np.float32)


@pytest.mark.parametrize("fallback", [[], ["emb"]], ids=["lowered", "in_caffe"])
@pytest.mark.parametrize("value", [3, -1, 0.5, np.nan, np.inf])
def test_bad_direct_indices_are_refused(make_prototxt, fallback, value) -> None:
    x = GOOD.copy()
    x[1, 3] = value
    with hybrid_infer.load(make_prototxt(DIRECT), random_weights=1, fallback=fallback, min_segment_size=1) as hybrid:
        for run in (hybrid.run, hybrid.run_caffe):
            with pytest.raises(InputError) as caught:
                run({"data": x})
            assert str(caught.value) == (f"input 'data' holds {value:g} at (1, 3), but layer 'emb' (Embed) takes "
                                         "whole numbers in [0, 3) as row indices")


@pytest.mark.parametrize("fallback", [[], ["emb"]], ids=["lowered", "in_caffe"])
@pytest.mark.parametrize("prototxt", [DIRECT, SHIFTED], ids=["direct", "computed"])
def test_valid_indices_match_caffe(make_prototxt, fallback, prototxt) -> None:
    path = make_prototxt(prototxt)
    x = GOOD - 1 if prototxt is SHIFTED else GOOD
    with hybrid_infer.load(path, random_weights=2, fallback=fallback, min_segment_size=1) as hybrid:
        want = caffe_forward(path, {"data": x}, ["out"], weights=hybrid.model.weights)["out"]
        assert rel_l2(hybrid.run({"data": x})["out"], want) <= 1e-6


@pytest.mark.parametrize("index", [3, 7, -1, -3], ids=["end", "past_end", "minus_1", "minus_input_dim"])
def test_bad_computed_index_stops_onnx_runtime(make_prototxt, index) -> None:
    """ONNX Gather would wrap -1 and -3 to valid rows (Caffe reads before its weights): the
    lowering sends them past the end, so every bad index fails, named by layer."""
    x = GOOD - 1
    x[0, 2] = index - 1
    with hybrid_infer.load(make_prototxt(SHIFTED), random_weights=1, engine="onnxruntime") as hybrid:
        assert [s.backend for s in hybrid.partition.segments] == ["tensorrt"]
        with pytest.raises(InputError) as caught:
            hybrid.run({"data": x})
    message = str(caught.value)
    assert message.startswith("layer 'emb' (Embed) takes whole numbers in [0, 3) as row indices, and got one "
                              "outside that in this run") and "\n" not in message


def test_fractional_computed_indices_truncate_like_caffe(make_prototxt) -> None:
    """Caffe's static_cast<int> truncates toward zero (-0.5 reads row 0): so does the Cast."""
    path = make_prototxt(SHIFTED)
    fraction = np.random.default_rng(4).choice([-0.75, -0.25, 0.25, 0.75], GOOD.shape)
    x = (GOOD - 1 + fraction).astype(np.float32)  # x + 1 in (-1, 3): truncates into [0, 2]
    with hybrid_infer.load(path, random_weights=3) as hybrid:
        want = caffe_forward(path, {"data": x}, ["out"], weights=hybrid.model.weights)["out"]
        assert rel_l2(hybrid.run({"data": x})["out"], want) <= 1e-6
