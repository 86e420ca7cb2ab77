"""From a segment's FP32 ONNX to the ONNX an engine runs in reduced precision.

The quantization itself is done by ONNX Runtime's tools (``onnxruntime.quantization`` and
its graph optimizer); what is here decides *where*, and repairs the few places where the
quantizer's own choices contradict the placement:

1. ``prepare``: ONNX Runtime's *basic* graph optimizations (standard ONNX ops only) fold
   the Mul/Add pairs the lowering emits for BatchNorm and Scale into the preceding
   convolution's weights and bias, as TensorRT does itself before it quantizes. Node names
   and ``doc_string`` (the Caffe layer) survive. Calibration ranges are taken on this
   prepared graph, so tensor names match at Q/DQ time.
2. ``quantize``: ``QDQQuantizer`` inserts QuantizeLinear/DequantizeLinear pairs using the
   ranges of the calibration file (no calibration run here). Weights are INT8, symmetric,
   per output channel (axis 0 for Conv and Gemm, 1 for ConvTranspose, whose weights are
   C_in x C_out/group x k..., so only an ungrouped ConvTranspose has one weight slice per
   output channel there: ``plan.py`` keeps grouped Deconvolutions in FP32).

Two placements, one per engine:

- ``TENSORRT``: what TensorRT's explicit quantization wants (TensorRT developer guide,
  "Explicit Quantization", "Q/DQ Layer-Placement Recommendations"): symmetric signed INT8
  activations (zero point 0: TensorRT only supports symmetric quantization), Q/DQ on the
  inputs of Convolution, Deconvolution, InnerProduct (Gemm) and MatMul, never on their
  outputs, biases left in FP32 (TensorRT quantizes them itself). A residual Add (an Eltwise
  SUM without coefficients one of whose inputs a convolution writes) gets Q/DQ on its other,
  residual input only, so that TensorRT fuses the convolution, the addition and what
  follows into one INT8 kernel (NVIDIA Model Optimizer places them the same way); an Add
  of two non-convolution values (logits summed with coefficients, say) stays float. Every
  other node reads full-precision tensors, also where the quantizer had rewired it to a
  pair it inserted for a quantized neighbour (an Eltwise PROD beside a residual Add).
- ``ONNXRUNTIME`` (the CPU): unsigned INT8 activations with a zero point, signed INT8
  weights (U8S8), every operator ONNX Runtime can quantize, ReLU folded into the
  quantization of the preceding convolution. ONNX Runtime's x86 integer kernels are
  U8S8 (VNNI's VPDPBUSD multiplies unsigned by signed bytes), and its QDQ fusion turns
  DQ -> Conv -> Q into QLinearConv only when the convolution's output is quantized: so a
  convolution's output keeps its Q/DQ pair also where a float layer reads it (PReLU, LRN),
  and that layer reads the 8-bit value, as it would after ONNX Runtime's QLinearConv.
  Layers in ``float_input_layers`` (kept in FP32, or arithmetic that must see the full
  value: Softmax's logits, SSD's box decoding) read the float tensor instead.

In both, segment outputs leave in FP32: where the quantizer put a pair on an output (for a
consumer inside the segment), the consumers inside keep the 8-bit value and the output
gets the float one, with a ReLU the quantizer folded into the pair re-applied in float.

FP16 (``to_half``, ``emulate_half``): TensorRT gets ONNX Runtime's float16 converter's
model. ONNX Runtime's CPU provider has no FP16 kernels for most operators and runs such a
model in FP32 (its "precision free" casts), which would measure nothing but rounded
weights; ``emulate_half`` therefore rewrites the same converted model into FP32 arithmetic
with every FP16 tensor rounded to FP16 (Cast to FP16 and back after each node, which ONNX
Runtime keeps): FP16 storage, range (overflow to inf above 65504) and rounding of every
activation and weight, with FP32 accumulation inside a convolution, as TensorRT's FP16
kernels accumulate.
"""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Collection, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger("hybrid_infer.precision")

TENSORRT = "tensorrt"
ONNXRUNTIME = "onnxruntime"
TARGETS = (TENSORRT, ONNXRUNTIME)
#: Layers with weights whose inputs TensorRT wants quantized (and ONNX Runtime quantizes).
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Convolutions, which TensorRT fuses with a following residual Add.
CONV_OPS = ("Conv", "ConvTranspose")
#: Ops whose subgraphs neither converter rewrites here: they stay FP32 in FP16 models.
SUBGRAPH_OPS = ("Loop", "If", "Scan")
_MISSING_RANGE = re.compile(r"not specified for param (\S+?)\.? In static mode")


class MissingRange(ValueError):
    """A tensor the quantizer needs has no range in the calibration (``tensor`` names it)."""

    def __init__(self, tensor: str):
        super().__init__(f"tensor '{tensor}' has no calibrated range")
        self.tensor = tensor


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


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def tensorrt_nodes(model: onnx.ModelProto, quantized_layers: Collection[str],
                   residual_layers: Collection[str]) -> list[str]:
    """Nodes TensorRT wants Q/DQ on: the weighted nodes of ``quantized_layers``, and the
    Adds of ``residual_layers`` (Eltwise SUMs without coefficients) that a convolution feeds
    and that add two computed tensors (an Add of a constant is a bias, and stays float)."""
    constants = {init.name for init in model.graph.initializer}
    producer = _producers(model)
    chosen = []
    for node in model.graph.node:
        if node.doc_string not in quantized_layers:
            continue
        if node.op_type in WEIGHTED_OPS:
            chosen.append(node.name)
        elif (node.op_type == "Add" and node.doc_string in residual_layers
              and not any(i in constants for i in node.input)
              and any(producer.get(i) is not None and producer[i].op_type in CONV_OPS for i in node.input)):
            chosen.append(node.name)
    return chosen


def quantize(prepared: onnx.ModelProto, ranges: Mapping[str, Sequence[float]], target: str,
             quantized_layers: Collection[str], float_input_layers: Collection[str] = (),
             residual_layers: Collection[str] = (), fp32_layers: Collection[str] = ()) -> onnx.ModelProto:
    """Q/DQ copy of ``prepared`` for ``target`` ("tensorrt" or "onnxruntime").

    ``ranges`` maps tensor names of ``prepared`` to ``(lowest, highest)`` from calibration.
    Only nodes of ``quantized_layers`` (Caffe layer names) get Q/DQ for their own sake;
    nodes of ``float_input_layers`` read full-precision inputs where the quantizer gave them
    a pair for a neighbour's sake (on TensorRT every node outside the quantized ones does),
    nodes of ``fp32_layers`` (kept in FP32, CPU) where the tensor's producer computes in float;
    ``residual_layers`` are the Eltwise SUMs that may be residual Adds (TensorRT placement).
    Segment inputs and outputs keep their names and stay FP32. Raises ValueError for an
    unknown target, ``MissingRange`` for a tensor to quantize without a calibrated range.
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
    original_nodes = {node.name: node for node in prepared.graph.node}
    layers = layer_of_nodes(model)
    quantized = set(quantized_layers)
    excluded = [name for name, layer in layers.items() if layer not in quantized]
    tensors = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()})
    if target == TENSORRT:
        nodes = tensorrt_nodes(model, quantized, set(residual_layers))
        if not nodes:  # (an empty list would mean "every node" to the quantizer)
            return model
        quantizer = QDQQuantizer(
            model, True, False, QuantType.QInt8, QuantType.QInt8, tensors, nodes, excluded,
            sorted({node.op_type for node in model.graph.node}),
            {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "OpTypesToExcludeOutputQuantization": sorted({node.op_type for node in model.graph.node}),
             "QDQKeepRemovableActivations": True})
        float_readers = {node.name for node in model.graph.node if node.name not in set(nodes)}
    else:
        quantizer = QDQQuantizer(
            model, True, False, QuantType.QInt8, QuantType.QUInt8, tensors, [], excluded,
            sorted(set(QDQRegistry) | set(QLinearOpsRegistry)),
            {"ActivationSymmetric": False, "WeightSymmetric": True})
        float_readers = {name for name, layer in layers.items() if layer in set(float_input_layers)}
    try:
        quantizer.quantize_model()
    except ValueError as exc:
        missing = _MISSING_RANGE.search(str(exc))
        if missing:
            raise MissingRange(missing.group(1)) from None
        raise
    result: onnx.ModelProto = quantizer.model.model
    _float_inputs_for(result, float_readers, original_inputs, original_producers)
    if target == ONNXRUNTIME:  # layers kept in FP32 read a float producer's tensor in float; an INT8
        # producer's output (QLinearConv's 8-bit result) they read as it is
        float_writers = {name for name, layer in layers.items() if layer not in quantized}
        _float_inputs_for(result, {n for n in float_writers if layers[n] in set(fp32_layers)}, original_inputs,
                          original_producers, float_writers)
    if target == TENSORRT:
        _quantize_residual_inputs_only(result, set(nodes))
    _float_graph_outputs(result, original_producers, original_nodes)
    _drop_unread_qdq(result)
    _restore_layer_names(result)
    return result


def _qdq_source(producer: Mapping[str, onnx.NodeProto], name: str) -> Optional[str]:
    """The float tensor behind ``name`` when ``name`` is the output of a Q -> DQ pair."""
    dq = producer.get(name)
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None


def _float_inputs_for(model: onnx.ModelProto, nodes: set[str], original_inputs: Mapping[str, list[str]],
                      original_producers: Mapping[str, str], writers: Optional[set[str]] = None) -> None:
    """Feed ``nodes`` their float tensor again where the quantizer gave them a Q/DQ pair it
    inserted for another consumer of the same tensor (it rewires every consumer); with
    ``writers``, only tensors that one of those nodes (or the segment input) writes. Only where
    that tensor is still what the node read: where the quantizer removed a ReLU into the pair
    (the ReLU's producer then writes the ReLU's output name, unclipped), the node keeps the
    pair, whose quantization does the clipping."""
    producer = _producers(model)
    for node in model.graph.node:
        if node.name not in nodes:
            continue
        for k, name in enumerate(node.input):
            source = _qdq_source(producer, name)
            writer = producer[source].name if source in producer else None
            if source in original_inputs.get(node.name, ()) and writer == original_producers.get(source) \
                    and (writers is None or writer is None or writer in writers):
                node.input[k] = source


def _quantize_residual_inputs_only(model: onnx.ModelProto, quantized: set[str]) -> None:
    """A residual Add keeps Q/DQ on its residual input only: the input a convolution writes
    reads the float tensor (TensorRT fuses that convolution with the Add). Where both inputs
    come from convolutions (a projection shortcut), the later one is the fused one."""
    producer = _producers(model)
    order = {node.name: i for i, node in enumerate(model.graph.node)}
    for node in model.graph.node:
        if node.op_type != "Add" or node.name not in quantized:
            continue
        sources = [_qdq_source(producer, name) for name in node.input]
        convs = [k for k, s in enumerate(sources) if s in producer and producer[s].op_type in CONV_OPS]
        if convs:
            fused = max(convs, key=lambda k: order[producer[sources[k]].name])
            node.input[fused] = sources[fused]  # type: ignore[assignment]


def _float_graph_outputs(model: onnx.ModelProto, original_producers: Mapping[str, str],
                         original_nodes: Mapping[str, onnx.NodeProto]) -> None:
    """Segment outputs leave in full precision. Where the quantizer put a Q/DQ pair on an
    output (for a consumer inside the segment, renaming the output's producer), the
    consumers inside keep reading the pair and the output is written in float again: by its
    original producer, or, where the quantizer folded that producer (a ReLU) into the pair,
    by a copy of it applied to the float tensor before the pair."""
    producer = _producers(model)
    present = {node.name for node in model.graph.node}
    for value in model.graph.output:
        name = value.name
        source = _qdq_source(producer, name)
        if source is None:
            continue
        dequantized = f"{name}_inside_segment"
        producer[name].output[0] = dequantized
        for node in model.graph.node:
            if node is not producer[name]:
                node.input[:] = [dequantized if i == name else i for i in node.input]
        original = original_producers.get(name)
        if original in present and source in producer and producer[source].name == original:
            for node in model.graph.node:  # the producer writes the output name again
                node.input[:] = [name if i == source else i for i in node.input]
            producer[source].output[:] = [name if o == source else o for o in producer[source].output]
        else:  # a folded activation (or an output that is an input): apply it in float
            folded = onnx.NodeProto()
            if original in original_nodes:
                folded.CopyFrom(original_nodes[original])
                folded.input[0] = source
                folded.output[:] = [name]
                folded.name = f"{original}_segment_output"
            else:
                folded.CopyFrom(helper.make_node("Identity", [source], [name], name=f"{name}_segment_output"))
            model.graph.node.append(folded)
    _topological_sort(model)


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph (a Loop's or If's body) reads from the graphs around it."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        used |= _subgraph_reads(node)
        defined.update(node.output)
    return used - defined - {""}


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The outer-scope names the subgraphs of ``node`` read (empty for nodes without any)."""
    reads: set[str] = set()
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs):
            reads |= _outer_names(graph)
    return reads


def _read_names(model: onnx.ModelProto) -> set[str]:
    """Every name a node of ``model`` reads, by its inputs or from inside its subgraphs."""
    return {name for node in model.graph.node for name in (*node.input, *_subgraph_reads(node))}


def _topological_sort(model: onnx.ModelProto) -> None:
    """Order nodes so that each follows the producers of its inputs (ONNX requires it),
    counting the values a node's subgraphs read from outside (DetectionOutput's NMS Loop
    reads tensors computed before it: sorted by its inputs alone, it came first)."""
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    needs = {id(n): set(n.input) | _subgraph_reads(n) for n in pending}
    while pending:
        ready = [n for n in pending if needs[id(n)] <= available]
        if not ready:  # a cycle cannot arise here; keep what is left in its order
            ordered += pending
            break
        for node in ready:
            available.update(node.output)
            ordered.append(node)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _drop_unread_qdq(model: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes whose outputs nothing reads any more."""
    outputs = {value.name for value in model.graph.output}
    while True:
        read = _read_names(model) | outputs
        dead = [node for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not set(node.output) & read]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)


def _restore_layer_names(model: onnx.ModelProto) -> None:
    """Give Q/DQ nodes the Caffe layer of the node they feed or follow (a Q on a segment input
    that of its DQ's reader), so TensorRT's messages and layer lists keep speaking in Caffe layers."""
    producer = _producers(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for op_type in ("DequantizeLinear", "QuantizeLinear"):  # a Q may only know its DQ's layer
        for node in model.graph.node:
            if node.doc_string or node.op_type != op_type:
                continue
            near = [c for out in node.output for c in consumers.get(out, []) if c.doc_string]
            near += [producer[i] for i in node.input if i in producer and producer[i].doc_string]
            if near:
                node.doc_string = near[0].doc_string


# --- FP16 ---------------------------------------------------------------------------------

def to_half(prepared: onnx.ModelProto, float_nodes: Collection[str]) -> onnx.ModelProto:
    """FP16 copy of ``prepared`` with FP32 inputs and outputs, by ONNX Runtime's float16
    converter; ``float_nodes`` (ONNX node names) and nodes with subgraphs stay FP32 (the
    converter casts around them)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    # A Loop body reads some tensors from outside with the types it was built for: their
    # producers stay FP32 too (else the body's MatMul met an FP16 operand: invalid model).
    read_inside = {name for node in prepared.graph.node for name in _subgraph_reads(node)}
    float_nodes = {*float_nodes, *(node.name for node in prepared.graph.node if read_inside & set(node.output))}
    half = convert_float_to_float16(prepared, keep_io_types=True, node_block_list=sorted(float_nodes),
                                    op_block_list=[*DEFAULT_OP_BLOCK_LIST, *SUBGRAPH_OPS])
    _restore_subgraphs(half, prepared)
    _keep_read_inside_fp32(half, prepared, read_inside)
    _drop_second_producers(half)
    _skip_fp16_round_trips(half)
    _topological_sort(half)  # the converter leaves a Loop before the casts its body reads
    return half


def _keep_read_inside_fp32(half: onnx.ModelProto, prepared: onnx.ModelProto, read_inside: set[str]) -> None:
    """Tensors that a subgraph reads from outside stay FP32 under their name, where the
    converter (not knowing the Loop body reads them) turned a float initializer FP16 or cast a
    kept node's output to FP16 under the output's name; the FP16 version the converted nodes
    around it use gets a name of its own."""
    producer = _producers(half)
    for name in sorted(read_inside):
        cast = producer.get(name)
        source = producer.get(cast.input[0]) if cast is not None and cast.input else None
        if cast is None or source is None or not _is_cast_to(cast, TensorProto.FLOAT16):
            continue
        # the converter renamed the FP32 producer's output and cast it to FP16 under the old name
        half_name = f"{name}/fp16"
        for node in half.graph.node:
            if node is not cast:
                node.input[:] = [half_name if i == name else i for i in node.input]
        stale = {name, cast.input[0]}  # their recorded types changed: shape inference redoes them
        kept_info = [v for v in half.graph.value_info if v.name not in stale]
        del half.graph.value_info[:]
        half.graph.value_info.extend(kept_info)
        source.output[:] = [name if o == cast.input[0] else o for o in source.output]
        cast.input[0] = name
        cast.output[0] = half_name
    original = {init.name: init for init in prepared.graph.initializer}
    for init in half.graph.initializer:
        if init.name in read_inside and init.data_type == TensorProto.FLOAT16 and init.name in original:
            half_name = f"{init.name}/fp16"
            for node in half.graph.node:
                node.input[:] = [half_name if name == init.name else name for name in node.input]
            copy = half.graph.initializer.add()
            copy.CopyFrom(init)
            copy.name = half_name
            init.CopyFrom(original[init.name])


def _restore_subgraphs(half: onnx.ModelProto, prepared: onnx.ModelProto) -> None:
    """Put the FP32 bodies back into the nodes with subgraphs (Loop, If: kept FP32): the
    converter still rewrote some tensors inside them to FP16 (a MatMul inside DetectionOutput's
    NMS Loop then met an FP16 operand beside an FP32 one, an invalid model)."""
    original = {node.name: node for node in prepared.graph.node if _subgraph_reads(node) or any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)}
    for node in half.graph.node:
        if node.name in original:
            del node.attribute[:]
            node.attribute.extend(original[node.name].attribute)


def _drop_second_producers(model: onnx.ModelProto) -> None:
    """Remove the converter's output Casts that duplicate an FP32 node's output: with
    ``keep_io_types`` it casts every graph output back to FP32, also one that a kept (FP32)
    node or an FP32 initializer already provides under that name (an SSD's folded prior boxes
    when they are a segment output: the Cast then reads a name nothing writes), and ONNX
    Runtime refuses a name defined twice."""
    defined = {value.name for value in (*model.graph.initializer, *model.graph.input)}
    producers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.output:
            producers.setdefault(name, []).append(node)
    for name, nodes in producers.items():
        if len(nodes) > 1 or name in defined:
            for node in nodes:
                if node.op_type == "Cast" and node.name.startswith("graph_output_cast"):
                    model.graph.node.remove(node)


def _is_cast_to(node: onnx.NodeProto, elem_type: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == elem_type for a in node.attribute)


def _skip_fp16_round_trips(model: onnx.ModelProto) -> None:
    """The float16 converter casts *every* tensor between two FP32 nodes to FP16 and back
    (producer -> Cast FP16 -> Cast FP32 -> consumer), so a run of kept layers still rounds,
    and overflows, at each step. Let each such Cast to FP32 read the FP32 tensor before the
    pair (a Cast of FP32 to FP32 passes it unchanged), and drop casts nothing reads."""
    producer = _producers(model)
    for node in model.graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if _is_cast_to(node, TensorProto.FLOAT) and first is not None and _is_cast_to(first, TensorProto.FLOAT16):
            node.input[0] = first.input[0]
    outputs = {value.name for value in model.graph.output}
    while True:
        read = _read_names(model) | outputs
        dead = [n for n in model.graph.node if n.op_type == "Cast" and not set(n.output) & read]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)


def _rounding(name: str, rounded: str) -> list[onnx.NodeProto]:
    """``rounded`` = ``name`` rounded to FP16 and widened back to FP32."""
    half = f"{rounded}/fp16"
    return [helper.make_node("Cast", [name], [half], name=f"{half}/to_fp16", to=TensorProto.FLOAT16),
            helper.make_node("Cast", [half], [rounded], name=f"{half}/to_fp32", to=TensorProto.FLOAT)]


def _to_float(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == TensorProto.FLOAT16:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))


def emulate_half(half: onnx.ModelProto) -> onnx.ModelProto:
    """The FP16 model ``half`` (from ``to_half``) as FP32 arithmetic on FP16-rounded values,
    for ONNX Runtime's CPU provider: FP16 initializers and constants become FP32 holding the
    same values, every Cast to FP16 and every node output that was FP16 is rounded to FP16
    by an explicit Cast pair. Results equal FP16 storage of every tensor (inf above 65504)."""
    typed = onnx.shape_inference.infer_shapes(half)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*typed.graph.value_info, *typed.graph.input, *typed.graph.output)}
    model = onnx.ModelProto()
    model.CopyFrom(half)
    for init in model.graph.initializer:
        _to_float(init)
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _to_float(attr.t)
        if _is_cast_to(node, TensorProto.FLOAT16):
            nodes += _rounding(node.input[0], node.output[0])
            continue
        half_outputs = [o for o in node.output if types.get(o) == TensorProto.FLOAT16]
        for k, out in enumerate(node.output):
            if out in half_outputs:
                node.output[k] = f"{out}/fp32"
        nodes.append(node)
        for out in half_outputs:
            nodes += _rounding(f"{out}/fp32", out)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for value in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return model
