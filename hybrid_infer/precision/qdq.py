"""From a segment's FP32 ONNX to the ONNX an engine runs in reduced precision.

Everything here is done by ONNX Runtime's tools (``onnxruntime.quantization`` and its graph
optimizer), not by own graph surgery:

1. ``prepare``: ONNX Runtime's *basic* graph optimizations (standard ONNX ops only) fold
   the Mul/Add pairs the lowering emits for BatchNorm and Scale into the preceding
   convolution's weights and bias, as TensorRT does itself before it quantizes. Node names
   and ``doc_string`` (the Caffe layer) survive. Calibration ranges are taken on this
   prepared graph, so tensor names match at Q/DQ time.
2. ``quantize``: ``QDQQuantizer`` inserts QuantizeLinear/DequantizeLinear pairs using the
   ranges of the calibration file (no calibration run here). Weights are INT8, symmetric,
   per output channel (axis 0 for Conv and Gemm, 1 for ConvTranspose).

Two placements, one per engine:

- ``TENSORRT``: what TensorRT's explicit quantization wants (TensorRT developer guide,
  "Explicit Quantization" and "Q/DQ layer placement recommendations"): symmetric signed
  INT8 activations (zero point 0: TensorRT only supports symmetric quantization), Q/DQ on
  the inputs of Convolution, Deconvolution, InnerProduct (Gemm), MatMul and of residual
  Adds (two computed inputs) only, never on their outputs, biases left in FP32 (TensorRT
  quantizes them itself). The builder then fuses Q/DQ into the neighbouring layers.
- ``ONNXRUNTIME`` (the CPU): unsigned INT8 activations with a zero point, signed INT8
  weights (U8S8), every operator ONNX Runtime can quantize, ReLU folded into the
  quantization of the preceding convolution. ONNX Runtime's x86 integer kernels are
  U8S8 (VNNI's VPDPBUSD multiplies unsigned by signed bytes), and its QDQ fusion turns
  DQ -> Conv -> Q into QLinearConv only when no float op sits in between: with the
  symmetric TensorRT placement a float ReLU stays between every convolution and its Q,
  and the CPU runs the convolutions in FP32 after dequantizing (measured in the README).

``excluded_layers`` (Caffe layer names) stay in FP32: their nodes get no Q/DQ.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Collection, Mapping, Optional, Sequence

import numpy as np
import onnx

log = logging.getLogger("hybrid_infer.precision")

TENSORRT = "tensorrt"
ONNXRUNTIME = "onnxruntime"
TARGETS = (TENSORRT, ONNXRUNTIME)
#: Layers with weights whose inputs TensorRT wants quantized (and ONNX Runtime quantizes).
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Left in float on the CPU too: an 8-bit softmax rounds probabilities to steps of 1/255.
CPU_FLOAT_OPS = {"Softmax"}


def prepare(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """The segment after ONNX Runtime's basic graph optimizations (BatchNorm/Scale folded
    into convolutions, constants folded); same inputs, outputs and node names."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory(prefix="hybrid_infer_prepare_") as tmp:
        path = Path(tmp) / "prepared.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3
        ort.InferenceSession(fp32.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(path))


def layer_of_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """ONNX node name -> Caffe layer (the lowering writes the layer into ``doc_string``)."""
    return {node.name: node.doc_string for node in model.graph.node if node.doc_string}


def _initializers(model: onnx.ModelProto) -> set[str]:
    return {init.name for init in model.graph.initializer}


def tensorrt_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes TensorRT wants Q/DQ on: weighted layers, and Adds of two computed tensors
    (residual connections; an Add with a constant is a bias and stays in float)."""
    constants = _initializers(model)
    return [node.name for node in model.graph.node
            if node.op_type in WEIGHTED_OPS
            or (node.op_type == "Add" and not any(i in constants for i in node.input))]


def quantize(prepared: onnx.ModelProto, ranges: Mapping[str, Sequence[float]], target: str,
             excluded_layers: Collection[str] = (), quantizable_layers: Optional[Collection[str]] = None
             ) -> onnx.ModelProto:
    """Q/DQ copy of ``prepared`` for ``target`` ("tensorrt" or "onnxruntime").

    ``ranges`` maps tensor names of ``prepared`` to ``(lowest, highest)`` from calibration;
    ``excluded_layers`` are Caffe layer names whose nodes stay FP32, and so are the nodes of
    layers outside ``quantizable_layers`` when it is given (an SSD's box decoding and NMS,
    a Softmax, LRN: arithmetic that 8 bits would ruin, or that gains nothing from them).
    Segment inputs and outputs keep their names and stay FP32. Raises ValueError for an
    unknown target, or a tensor to quantize without a calibrated range.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.calibrate import TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    if target not in TARGETS:
        raise ValueError(f"unknown quantization target '{target}'; choose one of {', '.join(TARGETS)}")
    model = onnx.ModelProto()
    model.CopyFrom(prepared)
    original_inputs = {node.name: list(node.input) for node in model.graph.node}
    original_producers = {out: node.name for node in model.graph.node for out in node.output}
    layers = layer_of_nodes(model)
    excluded = [name for name, layer in layers.items() if layer in set(excluded_layers)
                or (quantizable_layers is not None and layer not in set(quantizable_layers))]
    tensors = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()})
    if target == TENSORRT:
        nodes = [n for n in tensorrt_nodes(model) if n not in excluded]
        if not nodes:  # (an empty list would mean "every node" to the quantizer)
            return model
        quantizer = QDQQuantizer(
            model, True, False, QuantType.QInt8, QuantType.QInt8, tensors, nodes, excluded,
            sorted({node.op_type for node in model.graph.node}),
            {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "OpTypesToExcludeOutputQuantization": sorted({node.op_type for node in model.graph.node}),
             "QDQKeepRemovableActivations": True})
    else:
        quantizer = QDQQuantizer(
            model, True, False, QuantType.QInt8, QuantType.QUInt8, tensors, [], excluded,
            sorted(set(QDQRegistry) | set(QLinearOpsRegistry) - CPU_FLOAT_OPS),
            {"ActivationSymmetric": False, "WeightSymmetric": True})
    quantizer.quantize_model()
    quantized: onnx.ModelProto = quantizer.model.model
    _float_inputs_for(quantized, set(excluded), original_inputs, original_producers)
    _float_graph_outputs(quantized, original_producers)
    _drop_unread_qdq(quantized)
    _restore_layer_names(quantized, layers)
    return quantized


def _qdq_source(producer: Mapping[str, onnx.NodeProto], name: str) -> Optional[str]:
    """The float tensor behind ``name`` when ``name`` is the output of a Q -> DQ pair."""
    dq = producer.get(name)
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None


def _float_inputs_for(model: onnx.ModelProto, nodes: set[str], original_inputs: Mapping[str, list[str]],
                      original_producers: Mapping[str, str]) -> None:
    """Feed ``nodes`` their float tensor again where the quantizer gave them a Q/DQ pair it
    inserted for another consumer of the same tensor (it rewires every consumer, excluded or
    not). Only where that tensor is still what the node read: where the quantizer removed a
    ReLU into the pair (the ReLU's producer then writes the ReLU's output name, unclipped),
    the node keeps the pair, whose quantization does the clipping."""
    producer = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.name not in nodes:
            continue
        for k, name in enumerate(node.input):
            source = _qdq_source(producer, name)
            writer = producer[source].name if source in producer else None
            if source in original_inputs.get(node.name, ()) and writer == original_producers.get(source):
                node.input[k] = source


def _float_graph_outputs(model: onnx.ModelProto, original_producers: Mapping[str, str]) -> None:
    """Segment outputs leave in full precision: a Q/DQ pair the quantizer put on an output
    (renaming its producer's output) is bypassed. What follows in Caffe, or the user, gets
    the float result of the last layer, not an 8-bit rounding of it; except where a ReLU was
    folded into the pair (the pair's clipping is that ReLU)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    for value in model.graph.output:
        source = _qdq_source(producer, value.name)
        if source is None or producer.get(source) is None \
                or producer[source].name != original_producers.get(value.name):
            continue
        dq = producer[value.name]
        dq.output[0] = value.name + "_unused_dequantized"
        for node in model.graph.node:
            node.input[:] = [value.name if name == source else name for name in node.input]
            node.output[:] = [value.name if name == source else name for name in node.output]


def _drop_unread_qdq(model: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes whose outputs nothing reads any more."""
    outputs = {value.name for value in model.graph.output}
    while True:
        read = {name for node in model.graph.node for name in node.input} | outputs
        dead = [node for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not set(node.output) & read]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)


def _restore_layer_names(model: onnx.ModelProto, layers: Mapping[str, str]) -> None:
    """Give Q/DQ nodes the Caffe layer of the node they feed or follow, so TensorRT's
    messages and layer lists keep speaking in Caffe layers."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model.graph.node:
        if node.doc_string or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        near = [c for out in node.output for c in consumers.get(out, []) if c.name in layers]
        near += [producer[i] for i in node.input if i in producer and producer[i].name in layers]
        if near:
            node.doc_string = layers[near[0].name]

