"""Every lowered layer type against real pycaffe: each CPU engine (ONNX Runtime, OpenVINO;
the ``engine`` fixture) must match Caffe within a relative L2 error of 1e-5, at the
prototxt's batch and at another one.

Weights and inputs are random with a fresh seed per run (printed on failure; set
HYBRID_INFER_TEST_SEED to replay one).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import CONFORMANCE_ENGINES, GRAPHS, require_engine
from hybrid_infer.errors import LoweringError, ModelError
from hybrid_infer.lowering.segment_to_onnx import lower_segment
from hybrid_infer.testing import (LAYER_TOLERANCE, check_lowering, cpu_engine, load_text, lower_whole_net, net,
                                  one_layer, rel_l2)


def cases(table: dict[str, tuple]) -> pytest.MarkDecorator:
    """Parametrize over a {case id: (params, input shape)} table."""
    return pytest.mark.parametrize("params, shape", list(table.values()), ids=list(table))


CONVOLUTION = {
    "3x3": ("num_output: 4 kernel_size: 3", (2, 3, 8, 8)),
    "pad_stride": ("num_output: 5 kernel_size: 3 pad: 1 stride: 2", (2, 3, 9, 8)),
    "hw_forms": ("num_output: 4 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1",
                 (2, 3, 9, 7)),
    "group_dilation": ("num_output: 6 kernel_size: 3 group: 3 dilation: 2 pad: 2", (2, 6, 9, 9)),
    "depthwise_no_bias": ("num_output: 4 kernel_size: 3 group: 4 bias_term: false", (2, 4, 6, 6)),
    "per_axis_lists": ("num_output: 3 kernel_size: 3 kernel_size: 1 pad: 1 pad: 0 stride: 1 stride: 2 "
                       "dilation: 1 dilation: 1", (2, 2, 7, 8)),
    "1x1": ("num_output: 7 kernel_size: 1", (2, 5, 4, 3)),
    "1d": ("num_output: 4 kernel_size: 3 stride: 2 pad: 1", (2, 3, 11)),
    "3d": ("num_output: 3 kernel_size: 3 kernel_size: 2 kernel_size: 3 pad: 1 stride: 2", (2, 2, 5, 6, 5)),
}


@cases(CONVOLUTION)
def test_convolution(params: str, shape: tuple, engine: str) -> None:
    check_lowering(one_layer("Convolution", f"convolution_param {{ {params} }}", data=shape), engine=engine)


DECONVOLUTION = {
    "stride2": ("num_output: 4 kernel_size: 4 stride: 2", (2, 3, 5, 5)),
    "group_pad_stride": ("num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 3", (2, 3, 5, 6)),
    "dilation_no_bias": ("num_output: 2 kernel_size: 3 dilation: 2 bias_term: false", (2, 4, 4, 4)),
    "hw_forms": ("num_output: 3 kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 0 pad_w: 1",
                 (2, 2, 4, 5)),
    "1d": ("num_output: 3 kernel_size: 3 stride: 3", (2, 2, 6)),
}


@cases(DECONVOLUTION)
def test_deconvolution(params: str, shape: tuple, engine: str) -> None:
    check_lowering(one_layer("Deconvolution", f"convolution_param {{ {params} }}", data=shape),
                   engine=engine)


POOLING = {
    # ceil rounding: the last window (start 5) reaches into the padding
    "max_6_k3_s2_p1": ("pool: MAX kernel_size: 3 stride: 2 pad: 1", (2, 3, 6, 6)),
    "ave_6_k3_s2_p1": ("pool: AVE kernel_size: 3 stride: 2 pad: 1", (2, 3, 6, 6)),
    # ceil gives 4 windows; the 4th would start in the padding (6 >= 5 + 1), Caffe drops it
    "max_drops_window_in_padding": ("pool: MAX kernel_size: 2 stride: 2 pad: 1", (2, 3, 5, 5)),
    "ave_drops_window_in_padding": ("pool: AVE kernel_size: 2 stride: 2 pad: 1", (2, 3, 5, 5)),
    "max_ceil_no_pad": ("pool: MAX kernel_size: 3 stride: 2", (2, 3, 8, 8)),
    "ave_ceil_no_pad": ("pool: AVE kernel_size: 3 stride: 2", (2, 3, 8, 8)),
    "ave_pad_2": ("pool: AVE kernel_size: 5 stride: 3 pad: 2", (2, 2, 9, 10)),
    "max_floor_mode": ("pool: MAX kernel_size: 3 stride: 2 ceil_mode: false", (2, 3, 8, 8)),
    "ave_floor_mode_pad": ("pool: AVE kernel_size: 3 stride: 2 pad: 1 ceil_mode: false", (2, 3, 8, 8)),
    "max_non_square": ("pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
                       (2, 3, 7, 6)),
    "ave_non_square": ("pool: AVE kernel_h: 2 kernel_w: 4 stride_h: 1 stride_w: 3 pad_h: 1 pad_w: 2",
                       (2, 3, 5, 9)),
    "global_max": ("pool: MAX global_pooling: true", (2, 4, 5, 7)),
    "global_ave": ("pool: AVE global_pooling: true", (2, 4, 5, 7)),
}


@cases(POOLING)
def test_pooling(params: str, shape: tuple, engine: str) -> None:
    check_lowering(one_layer("Pooling", f"pooling_param {{ {params} }}", data=shape), engine=engine)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["MAX", "AVE"]), size=st.tuples(st.integers(2, 9), st.integers(2, 9)),
       kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       pad=st.tuples(st.integers(0, 2), st.integers(0, 2)), ceil_mode=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@pytest.mark.parametrize("engine", CONFORMANCE_ENGINES)  # hypothesis takes no function-scoped fixtures
def test_pooling_geometry(method: str, size: tuple, kernel: tuple, stride: tuple, pad: tuple,
                          ceil_mode: bool, seed: int, engine: str) -> None:
    require_engine(engine)
    for n, k, s, p in zip(size, kernel, stride, pad):
        assume(p < k <= n + 2 * p)
        # With no padding, ceil rounding can yield a window past the input when stride > kernel;
        # Caffe then outputs -FLT_MAX or divides by a non-positive count (not a real use).
        assume(p > 0 or s <= k or not ceil_mode)
    params = (f"pool: {method} kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} "
              f"stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]} ceil_mode: {str(ceil_mode).lower()}")
    check_lowering(one_layer("Pooling", f"pooling_param {{ {params} }}", data=(2, 2, *size)),
                   batches=(None,), seed=seed, engine=engine)


def test_pooling_window_past_the_input_is_refused() -> None:
    """Stride 4 over kernel 1 without padding: ceil rounding makes a window start at 8 of 6."""
    model, graph = load_text(one_layer("Pooling", "pooling_param { pool: MAX kernel_size: 1 stride: 4 }",
                                  data=(2, 2, 6, 6)))
    with pytest.raises(LoweringError, match="starts past the input"):
        lower_whole_net(model, graph, graph.outputs)


INNER_PRODUCT = {
    "4d_axis1": ("num_output: 5", (2, 3, 4, 4)),
    "2d": ("num_output: 6", (2, 7)),
    "no_bias": ("num_output: 5 bias_term: false", (2, 3, 2, 2)),
    "transpose": ("num_output: 4 transpose: true", (2, 3, 2, 3)),
    "axis2": ("num_output: 5 axis: 2", (2, 3, 4, 4)),
    "axis2_transpose_no_bias": ("num_output: 3 axis: 2 transpose: true bias_term: false", (2, 3, 4, 2)),
    "axis_minus1": ("num_output: 4 axis: -1", (2, 3, 6)),
}


@cases(INNER_PRODUCT)
def test_inner_product(params: str, shape: tuple, engine: str) -> None:
    check_lowering(one_layer("InnerProduct", f"inner_product_param {{ {params} }}", data=shape),
                   engine=engine)


NEURONS = {
    "relu": ("ReLU", ""),
    "leaky_relu": ("ReLU", "relu_param { negative_slope: 0.1 }"),
    "prelu": ("PReLU", ""),
    "prelu_shared": ("PReLU", "prelu_param { channel_shared: true }"),
    "sigmoid": ("Sigmoid", ""),
    "tanh": ("TanH", ""),
    "elu": ("ELU", ""),
    "elu_alpha": ("ELU", "elu_param { alpha: 0.4 }"),
    "absval": ("AbsVal", ""),
    "bnll": ("BNLL", ""),
    "relu6": ("ReLU6", ""),
    "relu6_slope_threshold": ("ReLU6", "relu6_param { negative_slope: 0.2 threshold: 2.5 }"),
    "dropout": ("Dropout", "dropout_param { dropout_ratio: 0.3 }"),
    "power_default": ("Power", ""),
    "power_square": ("Power", "power_param { power: 2 scale: 0.5 shift: 1 }"),
    "power_cube": ("Power", "power_param { power: 3 scale: -1.5 }"),
    "power_scale_zero": ("Power", "power_param { power: 2 scale: 0 shift: 3 }"),
    "power_zero": ("Power", "power_param { power: 0 scale: 2 shift: 1 }"),
    "exp": ("Exp", ""),
    "exp_base_scale_shift": ("Exp", "exp_param { base: 2 scale: 0.5 shift: 1.5 }"),
    "exp_e_shift": ("Exp", "exp_param { shift: -0.7 scale: 0.3 }"),
}


@pytest.mark.parametrize("layer_type, params", list(NEURONS.values()), ids=list(NEURONS))
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 6)], ids=["4d", "2d"])
def test_neuron(layer_type: str, params: str, shape: tuple, engine: str) -> None:
    """Inputs are scaled by 8 to reach ReLU6's clip and BNLL's large-|x| branch."""
    check_lowering(one_layer(layer_type, params, data=shape), inputs=lambda a: 8 * a, engine=engine)


POSITIVE_NEURONS = {
    "power_sqrt": ("Power", "power_param { power: 0.5 scale: 2 shift: 0.1 }"),
    "power_negative": ("Power", "power_param { power: -1.5 }"),
    "log": ("Log", ""),
    "log_base10": ("Log", "log_param { base: 10 }"),
    "log_scale_shift": ("Log", "log_param { base: 2 scale: 3 shift: 0.5 }"),
}


@pytest.mark.parametrize("layer_type, params", list(POSITIVE_NEURONS.values()), ids=list(POSITIVE_NEURONS))
def test_neuron_on_positive_inputs(layer_type: str, params: str, engine: str) -> None:
    check_lowering(one_layer(layer_type, params, data=(2, 3, 4, 4)), inputs=lambda a: np.abs(a) + 0.2,
                   engine=engine)


def test_in_place_chain(engine: str) -> None:
    """conv -> ReLU -> Scale -> BatchNorm all written into one blob, then merged with a branch."""
    check_lowering(net("""
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
        layer { name: "relu1" type: "ReLU" bottom: "conv" top: "conv" relu_param { negative_slope: 0.2 } }
        layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
        layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
        layer { name: "sum" type: "Eltwise" bottom: "conv" bottom: "data" top: "sum"
                eltwise_param { coeff: 0.5 coeff: -1 } }
        layer { name: "relu2" type: "ReLU" bottom: "sum" top: "sum" }
    """, data=(2, 3, 6, 6)), engine=engine)


BATCH_NORM = {
    "4d": ("", (2, 3, 5, 4)),
    "eps": ("batch_norm_param { eps: 0.001 }", (2, 3, 5, 4)),
    "global_stats_explicit": ("batch_norm_param { use_global_stats: true }", (2, 4, 3, 3)),
    "2d": ("", (2, 6)),
    "3d": ("", (2, 3, 7)),
}


@cases(BATCH_NORM)
def test_batch_norm(params: str, shape: tuple, engine: str) -> None:
    check_lowering(one_layer("BatchNorm", params, data=shape), engine=engine)


def test_batch_norm_zero_factor(engine: str) -> None:
    """A zero moving-average factor zeroes mean and variance (Caffe's scale_factor = 0)."""
    def zero_factor(weights: dict) -> None:
        weights["op"][2][...] = 0
    check_lowering(one_layer("BatchNorm", "", data=(2, 3, 4, 4)), adjust_weights=zero_factor, engine=engine)


def test_batch_norm_batch_statistics_is_refused() -> None:
    model, graph = load_text(one_layer("BatchNorm", "batch_norm_param { use_global_stats: false }"))
    with pytest.raises(LoweringError) as caught:
        lower_whole_net(model, graph, graph.outputs)
    assert caught.value.layer == "op"


# Batch sizes to run: a second bottom without a batch axis, or a learned bias shaped from a
# batch-led bottom, ties the net to the prototxt's batch in Caffe itself.
PROTOTXT_BATCH, ANY_BATCH = (None,), (None, 3)
SCALE = {
    "learned": ("", {"data": (2, 3, 4, 4)}, ANY_BATCH),
    "learned_bias": ("scale_param { bias_term: true }", {"data": (2, 3, 4, 4)}, ANY_BATCH),
    "learned_two_axes": ("scale_param { axis: 1 num_axes: 2 bias_term: true }", {"data": (2, 3, 4, 5)},
                         ANY_BATCH),
    "learned_to_end": ("scale_param { axis: 2 num_axes: -1 }", {"data": (2, 3, 4, 5)}, ANY_BATCH),
    "learned_scalar": ("scale_param { num_axes: 0 bias_term: true }", {"data": (2, 3, 4, 5)}, ANY_BATCH),
    "learned_negative_axis": ("scale_param { axis: -1 }", {"data": (2, 3, 4, 5)}, ANY_BATCH),
    "bottom_batch_channels": ("scale_param { axis: 0 }", {"data": (2, 3, 4, 4), "factor": (2, 3)},
                              ANY_BATCH),
    "bottom_same_shape_bias": ("scale_param { axis: 0 bias_term: true }",
                               {"data": (2, 3, 4), "factor": (2, 3, 4)}, PROTOTXT_BATCH),
    "bottom_channels_spatial": ("scale_param { axis: 1 }", {"data": (2, 3, 4, 5), "factor": (3, 4)},
                                PROTOTXT_BATCH),
    "bottom_channels_bias": ("scale_param { axis: 1 bias_term: true }",
                             {"data": (2, 3, 4, 5), "factor": (3,)}, PROTOTXT_BATCH),
}


@pytest.mark.parametrize("params, shape, batches", list(SCALE.values()), ids=list(SCALE))
def test_scale(params: str, shape: dict, batches: tuple, engine: str) -> None:
    check_lowering(one_layer("Scale", params, **shape), batches=batches, engine=engine)


BIAS = {
    "learned": ("", {"data": (2, 3, 4, 4)}),
    "learned_axis2": ("bias_param { axis: 2 num_axes: 2 }", {"data": (2, 3, 4, 5)}),
    "learned_scalar": ("bias_param { num_axes: 0 }", {"data": (2, 3, 4, 5)}),
    "bottom_batch_channels": ("bias_param { axis: 0 }", {"data": (2, 3, 4, 4), "offset": (2, 3)}),
}


@cases(BIAS)
def test_bias(params: str, shape: dict, engine: str) -> None:
    check_lowering(one_layer("Bias", params, **shape), engine=engine)


ELTWISE = {
    "sum": ("", 2),
    "sum_coeffs": ("eltwise_param { operation: SUM coeff: 0.5 coeff: -2 }", 2),
    "sum_three_coeffs": ("eltwise_param { coeff: 1 coeff: 3 coeff: -0.25 }", 3),
    "prod": ("eltwise_param { operation: PROD }", 3),
    "max": ("eltwise_param { operation: MAX }", 3),
    "max_two": ("eltwise_param { operation: MAX }", 2),
}


@pytest.mark.parametrize("params, count", list(ELTWISE.values()), ids=list(ELTWISE))
def test_eltwise(params: str, count: int, engine: str) -> None:
    check_lowering(one_layer("Eltwise", params, **{f"in{i}": (2, 3, 4, 5) for i in range(count)}),
                   engine=engine)


CONCAT = {
    "channels": ("", [(2, 3, 4, 4), (2, 5, 4, 4)]),
    "axis2": ("concat_param { axis: 2 }", [(2, 3, 2, 4), (2, 3, 5, 4), (2, 3, 1, 4)]),
    "legacy_concat_dim": ("concat_param { concat_dim: 3 }", [(2, 3, 4, 2), (2, 3, 4, 3)]),
    "negative_axis": ("concat_param { axis: -1 }", [(2, 3, 4), (2, 3, 2)]),
    "batch_axis": ("concat_param { axis: 0 }", [(2, 3, 4), (2, 3, 4)]),
}


@cases(CONCAT)
def test_concat(params: str, shape: list, engine: str) -> None:
    check_lowering(one_layer("Concat", params, **{f"in{i}": s for i, s in enumerate(shape)}), engine=engine)


SLICE = {
    "points_channels": ("slice_param { slice_point: 1 slice_point: 4 }", 3, (2, 6, 3, 3)),
    "equal_channels": ("", 3, (2, 6, 3, 3)),
    "legacy_slice_dim": ("slice_param { slice_dim: 2 slice_point: 2 }", 2, (2, 3, 5, 3)),
    "negative_axis_points": ("slice_param { axis: -1 slice_point: 3 }", 2, (2, 3, 7)),
    "batch_axis_point": ("slice_param { axis: 0 slice_point: 1 }", 2, (2, 3, 4)),
    "batch_axis_equal": ("slice_param { axis: 0 }", 1, (2, 3, 4)),
}


@pytest.mark.parametrize("params, tops, shape", list(SLICE.values()), ids=list(SLICE))
def test_slice(params: str, tops: int, shape: tuple, engine: str) -> None:
    top_list = " ".join(f'top: "part{i}"' for i in range(tops))
    check_lowering(net(f'layer {{ name: "op" type: "Slice" bottom: "data" {top_list} {params} }}',
                       data=shape), engine=engine)


def test_split_tops_are_the_same_tensor(engine: str) -> None:
    """Not in place after the Split: Caffe's Split tops share memory with each other, so an
    in-place layer on one would rewrite its siblings too."""
    check_lowering(net("""
        layer { name: "split" type: "Split" bottom: "data" top: "a" top: "b" top: "c" }
        layer { name: "relu" type: "ReLU" bottom: "b" top: "b_relu" }
    """, data=(2, 3, 4, 4)), engine=engine)


FLATTEN = {
    "default": ("", (2, 3, 4, 5)),
    "axis2": ("flatten_param { axis: 2 }", (2, 3, 4, 5)),
    "axis1_end2": ("flatten_param { axis: 1 end_axis: 2 }", (2, 3, 4, 5)),
    "negative_axes": ("flatten_param { axis: -3 end_axis: -2 }", (2, 3, 4, 5, 2)),
}


@cases(FLATTEN)
def test_flatten(params: str, shape: tuple, engine: str) -> None:
    check_lowering(one_layer("Flatten", params, data=shape), engine=engine)


RESHAPE = {
    "copy_infer": ("shape { dim: 0 dim: -1 }", (2, 3, 4, 5)),
    "copy_copy_infer_static": ("shape { dim: 0 dim: 0 dim: 2 dim: -1 }", (2, 3, 4, 5)),
    "infer_first": ("shape { dim: -1 dim: 4 dim: 15 }", (2, 3, 4, 5)),
    "axis_num_axes": ("shape { dim: -1 } axis: 1 num_axes: 2", (2, 3, 4, 5)),
    "split_axis": ("shape { dim: 2 dim: 0 dim: -1 } axis: 1", (2, 6, 4, 5)),
    "append_axis": ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3, 4)),
    "insert_middle": ("shape { dim: 1 dim: 1 } axis: 2 num_axes: 0", (2, 3, 4)),
}


@cases(RESHAPE)
def test_reshape(params: str, shape: tuple, engine: str) -> None:
    check_lowering(one_layer("Reshape", f"reshape_param {{ {params} }}", data=shape), engine=engine)


CROP = {
    "default_axis2_offset0": ("", (2, 3, 8, 8), (2, 3, 5, 6)),
    "one_offset": ("crop_param { axis: 2 offset: 1 }", (2, 3, 8, 8), (2, 3, 5, 6)),
    "per_axis_offsets": ("crop_param { axis: 1 offset: 1 offset: 2 offset: 0 }", (2, 5, 8, 7), (2, 3, 4, 7)),
    "negative_axis": ("crop_param { axis: -1 offset: 3 }", (2, 3, 5, 9), (2, 1, 1, 4)),
    "batch_axis": ("crop_param { axis: 0 offset: 0 offset: 1 offset: 2 offset: 0 }",
                   (2, 4, 6, 5), (2, 2, 3, 5)),
}


@pytest.mark.parametrize("params, shape, reference", list(CROP.values()), ids=list(CROP))
def test_crop(params: str, shape: tuple, reference: tuple, engine: str) -> None:
    check_lowering(one_layer("Crop", params, data=shape, like=reference), engine=engine)


SOFTMAX = {
    "channels": ("", (2, 5, 3, 4)),
    "axis2": ("softmax_param { axis: 2 }", (2, 3, 5, 4)),
    "last_axis": ("softmax_param { axis: -1 }", (2, 3, 4, 6)),
    "2d": ("", (2, 10)),
}


@cases(SOFTMAX)
def test_softmax(params: str, shape: tuple, engine: str) -> None:
    check_lowering(one_layer("Softmax", params, data=shape), inputs=lambda a: 4 * a, engine=engine)


LRN = {
    "across_5": ("local_size: 5 alpha: 0.001 beta: 0.75", (2, 7, 4, 4)),
    "across_3_k": ("local_size: 3 alpha: 2 beta: 0.5 k: 2", (2, 4, 3, 5)),
    "across_1": ("local_size: 1 alpha: 1.5 beta: 1.2", (2, 3, 4, 4)),
    "across_wider_than_channels": ("local_size: 7 alpha: 0.5 beta: 0.9 k: 1.5", (2, 3, 4, 4)),
    "within_3": ("norm_region: WITHIN_CHANNEL local_size: 3 alpha: 2 beta: 0.75", (2, 3, 6, 5)),
    "within_5_k_ignored": ("norm_region: WITHIN_CHANNEL local_size: 5 alpha: 0.7 beta: 0.6 k: 3",
                           (2, 2, 7, 7)),
}


@cases(LRN)
def test_lrn(params: str, shape: tuple, engine: str) -> None:
    check_lowering(one_layer("LRN", f"lrn_param {{ {params} }}", data=shape), engine=engine)


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_even_local_size(region: str) -> None:
    """Caffe refuses even local_size outright; the lowering refuses it too if asked."""
    with pytest.raises(ModelError):
        load_text(one_layer("LRN", f"lrn_param {{ norm_region: {region} local_size: 4 }}"))
    model, graph = load_text(one_layer("LRN", f"lrn_param {{ norm_region: {region} local_size: 3 }}"))
    graph.layers["op"].param.lrn_param.local_size = 4
    with pytest.raises(LoweringError, match="even"):
        lower_whole_net(model, graph, graph.outputs)


PERMUTE = {
    "nhwc": ("order: 0 order: 2 order: 3 order: 1", (2, 3, 4, 5)),
    "partial_order": ("order: 0 order: 3", (2, 3, 4, 5)),
    "identity": ("order: 0 order: 1 order: 2 order: 3", (2, 3, 4, 5)),
    "3d": ("order: 0 order: 2 order: 1", (2, 3, 4)),
}


@cases(PERMUTE)
def test_permute(params: str, shape: tuple, engine: str) -> None:
    check_lowering(one_layer("Permute", f"permute_param {{ {params} }}", data=shape), engine=engine)


NORMALIZE = {
    "defaults": "",
    "per_position_per_channel": "norm_param { across_spatial: false channel_shared: false }",
    "per_position_shared": "norm_param { across_spatial: false channel_shared: true eps: 0.001 }",
    "across_per_channel": "norm_param { across_spatial: true channel_shared: false eps: 0.01 }",
}


@pytest.mark.parametrize("params", list(NORMALIZE.values()), ids=list(NORMALIZE))
def test_normalize(params: str, engine: str) -> None:
    """Caffe sizes across_spatial's norm buffer for the prototxt's batch and never resizes it,
    so only smaller batches are safe to compare there."""
    check_lowering(one_layer("Normalize", params, data=(2, 4, 3, 5)), batches=(None, 1), engine=engine)


def test_small_network_at_several_batches(engine: str) -> None:
    check_lowering(net("""
        layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
                convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
        layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
        layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
        layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
        layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
                pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
        layer { name: "flat" type: "Flatten" bottom: "pool1" top: "flat" }
        layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc"
                inner_product_param { num_output: 5 } }
        layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
    """, data=(2, 3, 11, 11)), batches=(None, 1, 5), extra_outputs=["pool1", "fc"], engine=engine)


def test_unlowered_layer_names_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))
    model, graph = load_text(one_layer("Python", 'python_param { module: "hybrid_example_layers" layer: "Swish" }'))
    with pytest.raises(LoweringError, match="'op' \\(Python\\): no ONNX lowering is registered") as caught:
        lower_whole_net(model, graph, graph.outputs)
    assert caught.value.layer == "op"


@pytest.mark.parametrize("opset", [13, 18, 20])
def test_other_opsets(opset: int, engine: str) -> None:
    """Ops whose signature changed between opsets (Split, reductions, pooling) at both ends."""
    check_lowering(net("""
        layer { name: "split" type: "Slice" bottom: "data" top: "a" top: "b" }
        layer { name: "norm" type: "Normalize" bottom: "a" top: "norm"
                norm_param { across_spatial: false channel_shared: false } }
        layer { name: "pool" type: "Pooling" bottom: "b" top: "pool"
                pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
        layer { name: "lrn" type: "LRN" bottom: "b" top: "lrn" lrn_param { norm_region: WITHIN_CHANNEL } }
        layer { name: "scale" type: "Scale" bottom: "data" bottom: "gate" top: "scaled"
                scale_param { axis: 0 } }
    """, data=(2, 4, 6, 6), gate=(2, 4)), opset=opset, engine=engine)


SEGMENTED = net("""
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 4 kernel_size: 3 } }
    layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
    layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 2 } }
    layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 3 } }
""", data=(2, 3, 9, 9))


def test_segment_in_the_middle_of_a_net(engine: str) -> None:
    """A segment fed by an in-place value ("conv@relu"), with a symbolic batch in its interface."""
    model, graph = load_text(SEGMENTED)
    middle = graph.final_value["conv"]
    assert middle == "conv@relu"
    onnx_model = lower_segment(graph, ["pool", "fc"], [middle], ["fc"], model.weights, name="middle")
    for port in [*onnx_model.graph.input, *onnx_model.graph.output]:
        assert port.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [i.name for i in onnx_model.graph.input] == [middle]
    caffe_net = model.reference_net()
    data = np.random.default_rng().standard_normal((2, 3, 9, 9)).astype(np.float32)
    caffe_net.forward(data=data)
    fc = cpu_engine(onnx_model, engine).run({middle: caffe_net.blobs["conv"].data})["fc"]
    assert rel_l2(fc, caffe_net.blobs["fc"].data) <= LAYER_TOLERANCE


def test_segment_missing_an_input_is_a_bug() -> None:
    model, graph = load_text(SEGMENTED)
    with pytest.raises(ValueError, match="conv@relu"):
        lower_segment(graph, ["pool", "fc"], ["data"], ["fc"], model.weights)
