"""Floating-point operations per layer, per batch item: the weight of each layer when
reporting how much of a model's work runs on TensorRT (layer counts alone mislead:
one convolution outweighs dozens of ReLUs)."""
from __future__ import annotations

from math import prod

from .layer_graph import Layer, LayerGraph


def layer_flops(layer: Layer, graph: LayerGraph) -> int:
    """Approximate FLOPs of one batch item (a multiply-add counts 2)."""
    if not layer.tops:
        return 0
    out = graph.values[layer.tops[0]].shape
    out_items = prod(out[1:]) if len(out) > 1 else 1
    params = graph.model.info.param_shapes.get(layer.name, [])
    # A convolution with several bottoms applies its weights to each (one top per bottom).
    if layer.type == "Convolution" and params:
        return 2 * out_items * prod(params[0][1:]) * len(layer.tops)
    if layer.type == "Deconvolution" and params:
        inp = graph.values[layer.bottoms[0]].shape
        return 2 * prod(inp[1:]) * prod(params[0][1:]) * len(layer.tops)
    if layer.type == "InnerProduct" and params:
        p = layer.param.inner_product_param
        k = params[0][0] if p.transpose else params[0][1]
        return 2 * out_items * k
    if layer.type == "Pooling":
        p = layer.param.pooling_param
        if p.global_pooling:
            return prod(graph.values[layer.bottoms[0]].shape[1:])
        kh = p.kernel_h or p.kernel_size or 1
        kw = p.kernel_w or p.kernel_size or 1
        return out_items * kh * kw
    if layer.type == "LRN":
        return out_items * (layer.param.lrn_param.local_size + 3)
    return out_items * len(layer.tops)


def model_flops(graph: LayerGraph) -> dict[str, int]:
    return {layer.name: layer_flops(layer, graph) for layer in graph.compute_layers()}
