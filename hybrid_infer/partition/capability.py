"""Which Caffe layers can run in a TensorRT segment: a table, not an algorithm.

Each supported layer type has a check that looks at its parameters and returns
``None`` (supported) or the reason it is not. A profile is such a table; the
partitioner only asks ``judge`` and never looks at layer types itself. The full
``tensorrt`` profile is exactly the set of layers hybrid_infer lowers to ONNX
(tests keep the two in step); ``tensorrt-2`` reproduces what TensorRT 2's Caffe
parser took, for comparing against older deployments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ..errors import OptionError
from ..graph.layer_graph import Layer, LayerGraph

Check = Callable[[Layer, LayerGraph], Optional[str]]

PROFILES = ("tensorrt", "tensorrt-2")

# Layers that do no arithmetic: they never count towards a segment's size.
NON_COMPUTE_TYPES = frozenset({"Input", "Split", "Dropout", "Flatten", "Reshape", "Silence"})

_NOT_SUPPORTED_WHY = {
    "Python": "Python layers run arbitrary Python code, which only Caffe can call",
    "PriorBox": "SSD's PriorBox has no TensorRT lowering here (fork layer)",
    "DetectionOutput": "SSD's DetectionOutput (decoding + NMS) has no TensorRT lowering here (fork layer)",
    "Proposal": "Faster R-CNN's Proposal layer has no TensorRT lowering here (fork layer)",
    "ROIPooling": "ROIPooling has no TensorRT lowering here (fork layer)",
    "PSROIPooling": "PSROIPooling has no TensorRT lowering here (fork layer)",
    "Data": "data layers read from files; deploy nets feed inputs instead",
    "ImageData": "data layers read from files; deploy nets feed inputs instead",
    "HDF5Data": "data layers read from files; deploy nets feed inputs instead",
    "MemoryData": "data layers read from files; deploy nets feed inputs instead",
    "DummyData": "DummyData generates tensors inside Caffe",
    "SoftmaxWithLoss": "loss layers belong to training nets",
    "EuclideanLoss": "loss layers belong to training nets",
    "Accuracy": "Accuracy needs labels and belongs to training/validation nets",
    "Silence": "Silence only discards blobs inside Caffe",
}


def _spatial_rank(layer: Layer, graph: LayerGraph) -> int:
    return len(graph.values[layer.bottoms[0]].shape) - 2


def _convolution(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.convolution_param
    if p.axis != 1:
        return f"convolution over axis {p.axis}; only channel axis 1 is lowered"
    if _spatial_rank(layer, graph) not in (1, 2, 3):
        return "only 1-D, 2-D and 3-D convolutions are lowered"
    if len(layer.bottoms) != 1:
        return "a convolution with several bottoms (shared weights) is not lowered"
    return None


def _pooling(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.pooling_param
    if p.pool not in (p.MAX, p.AVE):
        return "stochastic pooling has no TensorRT equivalent"
    if len(layer.tops) > 1:
        return "max pooling with a mask top has no TensorRT equivalent"
    return None


def _batch_norm(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        return "BatchNorm with use_global_stats: false normalises by batch statistics"
    return None


def _eltwise(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.eltwise_param
    if len(p.coeff) and p.operation != p.SUM:
        return "Eltwise coefficients are only defined for SUM"
    return None


def _always(layer: Layer, graph: LayerGraph) -> Optional[str]:
    return None


def _normalize(layer: Layer, graph: LayerGraph) -> Optional[str]:
    if len(graph.values[layer.bottoms[0]].shape) != 4:
        return "Normalize is lowered for 4-D blobs only"
    return None


FULL_TABLE: dict[str, Check] = {
    "Input": _always, "Convolution": _convolution, "Deconvolution": _convolution,
    "Pooling": _pooling, "InnerProduct": _always, "ReLU": _always, "PReLU": _always,
    "Sigmoid": _always, "TanH": _always, "ELU": _always, "AbsVal": _always, "BNLL": _always,
    "Power": _always, "Exp": _always, "Log": _always, "BatchNorm": _batch_norm,
    "Scale": _always, "Bias": _always, "Eltwise": _eltwise, "Concat": _always,
    "Slice": _always, "Split": _always, "Flatten": _always, "Reshape": _always,
    "Crop": _always, "Softmax": _always, "LRN": _always, "Dropout": _always,
    "Permute": _always, "Normalize": _normalize, "ReLU6": _always,
}


def _trt2_convolution(layer: Layer, graph: LayerGraph) -> Optional[str]:
    if _spatial_rank(layer, graph) != 2:
        return "TensorRT 2 took 2-D convolutions only"
    return _convolution(layer, graph)


def _trt2_relu(layer: Layer, graph: LayerGraph) -> Optional[str]:
    if layer.param.relu_param.negative_slope != 0:
        return "TensorRT 2 had no leaky ReLU"
    return None


def _trt2_eltwise(layer: Layer, graph: LayerGraph) -> Optional[str]:
    if any(c != 1 for c in layer.param.eltwise_param.coeff):
        return "TensorRT 2's element-wise layer had no coefficients"
    return _eltwise(layer, graph)


def _trt2_lrn(layer: Layer, graph: LayerGraph) -> Optional[str]:
    p = layer.param.lrn_param
    if p.norm_region != p.ACROSS_CHANNELS:
        return "TensorRT 2 had cross-channel LRN only"
    return None


def _trt2_softmax(layer: Layer, graph: LayerGraph) -> Optional[str]:
    if layer.param.softmax_param.axis != 1:
        return "TensorRT 2 had cross-channel softmax only"
    return None


TRT2_TABLE: dict[str, Check] = {
    "Input": _always, "Convolution": _trt2_convolution, "Deconvolution": _trt2_convolution,
    "ReLU": _trt2_relu, "TanH": _always, "Sigmoid": _always, "Pooling": _pooling,
    "Eltwise": _trt2_eltwise, "LRN": _trt2_lrn, "InnerProduct": _always,
    "Softmax": _trt2_softmax,
}

_TABLES = {"tensorrt": FULL_TABLE, "tensorrt-2": TRT2_TABLE}


@dataclass(frozen=True)
class Verdict:
    supported: bool
    reason: Optional[str] = None


class Capability:
    """Answers "may this layer run in TensorRT?" for one profile and the user's overrides."""

    def __init__(self, profile: str = "tensorrt", fallback: Iterable[str] = ()):
        if profile not in _TABLES:
            raise OptionError(f"unknown profile '{profile}'; choose one of {', '.join(PROFILES)}")
        self.profile = profile
        self.table = _TABLES[profile]
        self.fallback = tuple(fallback)

    def check_fallback_names(self, graph: LayerGraph) -> None:
        """Every --fallback entry must name a layer or a layer type of this model."""
        names = set(graph.layers)
        types = {layer.type for layer in graph.layers.values()}
        unknown = [f for f in self.fallback if f not in names and f not in types]
        if unknown:
            raise OptionError(f"--fallback {', '.join(unknown)}: no layer or layer type of that name in "
                              f"{graph.model.prototxt} (types here: {', '.join(sorted(types))})")

    def judge(self, layer: Layer, graph: LayerGraph) -> Verdict:
        if layer.name in self.fallback:
            return Verdict(False, f"forced to Caffe by --fallback {layer.name}")
        if layer.type in self.fallback:
            return Verdict(False, f"forced to Caffe by --fallback {layer.type}")
        check = self.table.get(layer.type)
        if check is None:
            why = _NOT_SUPPORTED_WHY.get(layer.type)
            if why is None and self.profile != "tensorrt" and layer.type in FULL_TABLE:
                why = f"not supported by the {self.profile} profile"
            return Verdict(False, why or f"no TensorRT lowering for layer type '{layer.type}'")
        reason = check(layer, graph)
        return Verdict(reason is None, reason)
