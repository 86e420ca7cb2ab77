"""PriorBox folded to a constant, against real pycaffe: bit for bit, at every batch size,
and for whatever input size the model is loaded with (``--input-shape``)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hybrid_infer
from hybrid_infer.errors import LoweringError
from hybrid_infer.partition.partitioner import TENSORRT
from hybrid_infer.testing import check_lowering, load_text, lower_whole_net, net

FEATURE, IMAGE = (2, 4, 5, 7), (2, 3, 40, 60)

PRIOR_BOX = {
    "ssd_default": "min_size: 30 max_size: 60 aspect_ratio: 2 aspect_ratio: 3",
    "fractional_sizes_truncate": "min_size: 30.7 max_size: 61.9 aspect_ratio: 2",
    "no_flip_no_clip": "min_size: 13 aspect_ratio: 2.5 aspect_ratio: 0.7 flip: false clip: false",
    "duplicate_and_unit_ratios": "min_size: 20 aspect_ratio: 1 aspect_ratio: 2 aspect_ratio: 2.0000001 "
                                 "aspect_ratio: 0.5",
    "several_min_max": "min_size: 10 min_size: 25 max_size: 20 max_size: 40 aspect_ratio: 3 clip: false",
    "four_variances": "min_size: 16 aspect_ratio: 2 variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2",
    "one_variance": "min_size: 16 max_size: 32 variance: 0.3",
    "step_and_offset": "min_size: 21 aspect_ratio: 1.7 step: 8 offset: 0.25 clip: false",
    "step_hw": "min_size: 21 step_h: 6 step_w: 9 clip: false",
    "img_size": "min_size: 30 aspect_ratio: 2 img_size: 300",
    "img_hw": "min_size: 30 max_size: 90 img_h: 280 img_w: 510 clip: false",
}


def prior_box_net(params: str, feature: tuple = FEATURE, image: tuple = IMAGE, bottoms: int = 2) -> str:
    inputs = {"feat": feature, "data": image} if bottoms == 2 else {"feat": feature}
    bottom = ' bottom: "feat" bottom: "data"' if bottoms == 2 else ' bottom: "feat"'
    return net(f'layer {{ name: "pb" type: "PriorBox"{bottom} top: "out" prior_box_param {{ {params} }} }}',
               **inputs)


@pytest.mark.parametrize("params", list(PRIOR_BOX.values()), ids=list(PRIOR_BOX))
def test_prior_box_is_bit_exact(params: str) -> None:
    # tolerance 0: the constant must equal Caffe's top exactly, also at batch 3 (batch axis stays 1)
    result = check_lowering(prior_box_net(params), tolerance=0.0)
    assert result.errors and result.max_error == 0.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(feature=st.tuples(st.integers(1, 9), st.integers(1, 9)), image=st.tuples(st.integers(8, 90), st.integers(8, 90)),
       min_size=st.floats(1.0, 80.0), ratios=st.lists(st.floats(0.2, 4.0), max_size=3), flip=st.booleans(),
       clip=st.booleans(), offset=st.floats(0.0, 1.0), extra=st.floats(1.5, 60.0))
def test_prior_box_geometry(feature, image, min_size, ratios, flip, clip, offset, extra) -> None:
    params = (f"min_size: {min_size} max_size: {min_size + extra} "
              + " ".join(f"aspect_ratio: {r}" for r in ratios)
              + f" flip: {str(flip).lower()} clip: {str(clip).lower()} offset: {offset}")
    check_lowering(prior_box_net(params, (1, 2, *feature), (1, 3, *image)), batches=(None,), tolerance=0.0)


def test_prior_box_with_one_bottom_needs_an_image_size() -> None:
    check_lowering(prior_box_net("min_size: 12 img_size: 64", bottoms=1), tolerance=0.0)
    model, graph = load_text(prior_box_net("min_size: 12 img_size: 64", bottoms=1).replace(" img_size: 64", ""))
    with pytest.raises(LoweringError, match="second bottom"):
        lower_whole_net(model, graph, graph.outputs)


SSD_HEAD = """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 stride: 4 } }
layer { name: "pb" type: "PriorBox" bottom: "conv" bottom: "data" top: "priors"
        prior_box_param { min_size: 12 max_size: 30 aspect_ratio: 2 clip: false } }
"""


def test_input_shape_changes_the_folded_priors(make_prototxt) -> None:
    path = make_prototxt(net(SSD_HEAD, data=(1, 3, 32, 48)))
    priors = {}
    for shape in ((1, 3, 32, 48), (1, 3, 56, 40)):
        hybrid = hybrid_infer.load(path, random_weights=4, engine="onnxruntime", input_shapes={"data": shape},
                                   min_segment_size=1, outputs=["priors"])
        assert [s.backend for s in hybrid.partition.segments] == [TENSORRT]
        for batch in (1, 3):
            image = np.random.default_rng(batch).standard_normal((batch, *shape[1:])).astype(np.float32)
            got, want = hybrid.run({"data": image})["priors"], hybrid.run_caffe({"data": image})["priors"]
            assert got.shape == want.shape and got.shape[0] == 1
            assert np.array_equal(got, want)
        priors[shape] = got
    first, second = priors.values()
    assert first.shape != second.shape
