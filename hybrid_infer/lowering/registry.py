"""Which function lowers which Caffe layer type.

The keys are exactly the ``tensorrt`` capability profile's layer types (a test keeps
them in step), so the partitioner never sends a layer here that cannot be lowered.
"""
from __future__ import annotations

from typing import Callable

from ..graph.layer_graph import Layer
from . import activations, conv_pool, normalization, tensor_ops
from .context import LoweringContext

Lowering = Callable[[LoweringContext, Layer, list[str], list[str]], None]

LOWERINGS: dict[str, Lowering] = {
    "Input": tensor_ops.lower_input,
    "Convolution": conv_pool.lower_convolution,
    "Deconvolution": conv_pool.lower_deconvolution,
    "Pooling": conv_pool.lower_pooling,
    "InnerProduct": conv_pool.lower_inner_product,
    "ReLU": activations.lower_relu,
    "PReLU": activations.lower_prelu,
    "Sigmoid": activations.lower_sigmoid,
    "TanH": activations.lower_tanh,
    "ELU": activations.lower_elu,
    "AbsVal": activations.lower_absval,
    "BNLL": activations.lower_bnll,
    "Power": activations.lower_power,
    "Exp": activations.lower_exp,
    "Log": activations.lower_log,
    "ReLU6": activations.lower_relu6,
    "BatchNorm": normalization.lower_batch_norm,
    "Scale": normalization.lower_scale,
    "Bias": normalization.lower_bias,
    "Softmax": normalization.lower_softmax,
    "LRN": normalization.lower_lrn,
    "Normalize": normalization.lower_normalize,
    "Eltwise": tensor_ops.lower_eltwise,
    "Concat": tensor_ops.lower_concat,
    "Slice": tensor_ops.lower_slice,
    "Split": tensor_ops.lower_split,
    "Flatten": tensor_ops.lower_flatten,
    "Reshape": tensor_ops.lower_reshape,
    "Crop": tensor_ops.lower_crop,
    "Dropout": tensor_ops.lower_dropout,
    "Permute": tensor_ops.lower_permute,
}
