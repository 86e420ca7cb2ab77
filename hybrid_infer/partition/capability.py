"""Which Caffe layers can run in a TensorRT segment: a table, not an algorithm.

The partitioner only asks ``Capability.judge`` and never looks at layer types itself. In
the full ``tensorrt`` profile the table *is* the lowering registry: a layer may go to
TensorRT exactly when a lowering is registered for it (``lowering.register_lowering``,
built-in or the user's) and that lowering's check accepts its parameters, so what is
partitioned and what can be lowered cannot drift apart. ``tensorrt-2`` is a fixed
historical table of what TensorRT 2's Caffe parser took, for comparing against older
deployments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ..errors import OptionError
from ..graph.layer_graph import Layer, LayerGraph
from ..lowering.conv_pool import check_convolution, check_pooling
from ..lowering.registry import REGISTRY, LoweringTarget
from ..lowering.tensor_ops import check_eltwise

Check = Callable[[Layer, LayerGraph], Optional[str]]

PROFILES = ("tensorrt", "tensorrt-2")

# Layers that do no arithmetic: they never count towards a segment's size.
NON_COMPUTE_TYPES = frozenset({"Input", "Split", "Dropout", "Flatten", "Reshape", "Unsqueeze", "Silence"})

#: Why layer types without a lowering stay in Caffe, where there is more to say than "none".
_DATA_LAYER = "data layers read from files or a database; deploy nets feed inputs instead"
_LOSS_LAYER = "loss layers need labels and belong to training nets"
_NOT_LOWERED_WHY = {
    "Proposal": "Faster R-CNN's Proposal (anchor decoding + NMS over a variable box count) has no lowering",
    "ROIPooling": "ROI pooling reads a variable number of boxes; it has no lowering",
    "PSROIPooling": "position-sensitive ROI pooling reads a variable number of boxes; it has no lowering",
    "LSTM": "LSTM runs a time loop over an unrolled internal Caffe net (hidden state carried across "
            "steps, reset by the cont input); it has no lowering",
    "RNN": "RNN runs a time loop over an unrolled internal Caffe net (hidden state carried across "
           "steps, reset by the cont input); it has no lowering",
    "LSTMUnit": "LSTMUnit is one time step inside Caffe's LSTM, time-major with the batch on axis 1; "
                "segments carry the batch on axis 0",
    "MaxUnPool": "MaxUnPool scatters values to the positions recorded in a max pooling's mask top "
                 "(data-dependent indices), and pooling with a mask top stays in Caffe",
    "Filter": "Filter keeps the items whose selector is non-zero, so its output batch depends on the data",
    "BatchReindex": "BatchReindex's output batch is the length of its index blob, not the input's batch",
    "Parameter": "Parameter outputs a learned blob without a batch axis; Caffe feeds it to the segments",
    "Data": _DATA_LAYER, "ImageData": _DATA_LAYER, "HDF5Data": _DATA_LAYER, "MemoryData": _DATA_LAYER,
    "WindowData": _DATA_LAYER, "AnnotatedData": _DATA_LAYER, "VideoData": _DATA_LAYER,
    "DummyData": "DummyData generates tensors inside Caffe",
    "HDF5Output": "HDF5Output writes blobs to a file",
    "SoftmaxWithLoss": _LOSS_LAYER, "EuclideanLoss": _LOSS_LAYER, "ContrastiveLoss": _LOSS_LAYER,
    "HingeLoss": _LOSS_LAYER, "InfogainLoss": _LOSS_LAYER, "MultinomialLogisticLoss": _LOSS_LAYER,
    "SigmoidCrossEntropyLoss": _LOSS_LAYER, "SmoothL1Loss": _LOSS_LAYER, "MultiBoxLoss": _LOSS_LAYER,
    "Accuracy": "Accuracy needs labels and belongs to training/validation nets",
    "DetectionEvaluate": "DetectionEvaluate scores detections against ground truth (validation nets)",
    "Silence": "Silence only discards blobs inside Caffe",
}


def _python_layer_why(target: LoweringTarget) -> str:
    return (f"Python layer {target.python_module}.{target.python_layer} runs Python code that only "
            "Caffe can call; register a lowering for it to move it to TensorRT (README: custom layers)")


def _always(layer: Layer, graph: LayerGraph) -> Optional[str]:
    return None


def _trt2_convolution(layer: Layer, graph: LayerGraph) -> Optional[str]:
    if len(graph.values[layer.bottoms[0]].shape) != 4:
        return "TensorRT 2 took 2-D convolutions only"
    if len(layer.bottoms) != 1:
        return "TensorRT 2's Caffe parser took one bottom per convolution"
    return check_convolution(layer, graph)


def _trt2_relu(layer: Layer, graph: LayerGraph) -> Optional[str]:
    if layer.param.relu_param.negative_slope != 0:
        return "TensorRT 2 had no leaky ReLU"
    return None


def _trt2_eltwise(layer: Layer, graph: LayerGraph) -> Optional[str]:
    if any(c != 1 for c in layer.param.eltwise_param.coeff):
        return "TensorRT 2's element-wise layer had no coefficients"
    return check_eltwise(layer, graph)


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
    "ReLU": _trt2_relu, "TanH": _always, "Sigmoid": _always, "Pooling": check_pooling,
    "Eltwise": _trt2_eltwise, "LRN": _trt2_lrn, "InnerProduct": _always,
    "Softmax": _trt2_softmax,
}

_FIXED_TABLES = {"tensorrt-2": TRT2_TABLE}


@dataclass(frozen=True)
class Verdict:
    supported: bool
    reason: Optional[str] = None


class Capability:
    """Answers "may this layer run in TensorRT?" for one profile and the user's overrides."""

    def __init__(self, profile: str = "tensorrt", fallback: Iterable[str] = ()):
        if profile not in PROFILES:
            raise OptionError(f"unknown profile '{profile}'; choose one of {', '.join(PROFILES)}")
        self.profile = profile
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
        registration = REGISTRY.find(layer)
        if registration is None:
            target = LoweringTarget.of(layer)
            if target.layer_type == "Python":
                return Verdict(False, _python_layer_why(target))
            return Verdict(False, _NOT_LOWERED_WHY.get(layer.type, f"no lowering for layer type '{layer.type}'"))
        if self.profile in _FIXED_TABLES:
            check = _FIXED_TABLES[self.profile].get(layer.type)
            if check is None:
                return Verdict(False, f"not supported by the {self.profile} profile")
            reason = check(layer, graph)
        else:
            reason = registration.refusal(layer, graph)
            if reason is not None and not registration.built_in and registration.describe() not in reason:
                reason = f"{reason} (said by the check of {registration.describe()})"
        return Verdict(reason is None, reason)
