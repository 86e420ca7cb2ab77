"""Compare a lowered ONNX segment, run by a CPU engine (ONNX Runtime, OpenVINO), with real
pycaffe on a tiny net.

Each check draws a fresh seed for weights and inputs unless HYBRID_INFER_TEST_SEED is
set, and names it in any failure so the exact case can be replayed.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx

from hybrid_infer.engines.base import Engine
from hybrid_infer.executor.engine_choice import CANDIDATES, CpuSettings
from hybrid_infer.graph.layer_graph import LayerGraph
from hybrid_infer.lowering.segment_to_onnx import lower_segment
from hybrid_infer.model.caffe_model import CaffeModel

TOLERANCE = 1e-5
Shape = tuple[int, ...]


def net(body: str, **inputs: Shape) -> str:
    """A prototxt: one Input layer per keyword (blob name = shape), then ``body``."""
    declared = "".join(
        f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ '
        + " ".join(f"dim: {d}" for d in shape) + " } } }\n"
        for name, shape in (inputs or {"data": (2, 3, 8, 8)}).items())
    return declared + body


def one_layer(layer_type: str, params: str = "", **inputs: Shape) -> str:
    """A net with a single layer "op" of ``layer_type`` reading every input, writing "out"."""
    bottoms = " ".join(f'bottom: "{name}"' for name in (inputs or {"data": ()}))
    return net(f'layer {{ name: "op" type: "{layer_type}" {bottoms} top: "out" {params} }}', **inputs)


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    denominator = max(float(np.linalg.norm(expected.astype(np.float64))), 1e-30)
    return float(np.linalg.norm(actual.astype(np.float64) - expected.astype(np.float64))) / denominator


def load(prototxt: str, seed: int = 0) -> tuple[CaffeModel, LayerGraph]:
    """The model (with random weights from ``seed``) and its layer graph."""
    with tempfile.TemporaryDirectory(prefix="conformance_") as tmp:
        path = Path(tmp) / "net.prototxt"
        path.write_text(prototxt)
        model = CaffeModel(path)
    model.set_random_weights(seed)
    return model, LayerGraph(model)


def lower_all(model: CaffeModel, graph: LayerGraph, outputs: Sequence[str],
              opset: int = 17) -> onnx.ModelProto:
    """The whole net (every compute layer) as one segment."""
    return lower_segment(graph, [layer.name for layer in graph.compute_layers()], graph.inputs,
                         list(outputs), model.weights, opset=opset)


def build_engine(engine: str, model: onnx.ModelProto) -> Engine:
    """The CPU engine named ``engine`` ("onnxruntime", "openvino") for ``model``, on one thread
    (tiny nets: more threads only add scheduling noise)."""
    return CANDIDATES[engine].build(model, CpuSettings(threads=1), True)


def _seed(seed: Optional[int]) -> int:
    if seed is not None:
        return seed
    fixed = os.environ.get("HYBRID_INFER_TEST_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(2**31)


def check_lowering(prototxt: str, *, engine: str = "onnxruntime", batches: Sequence[Optional[int]] = (None, 3),
                   extra_outputs: Sequence[str] = (),
                   inputs: Callable[[np.ndarray], np.ndarray] = lambda a: a,
                   adjust_weights: Callable[[dict[str, list[np.ndarray]]], None] = lambda w: None,
                   seed: Optional[int] = None, opset: int = 17) -> None:
    """Assert ``engine`` (compiled once, run at every batch) matches pycaffe on every graph
    output (and ``extra_outputs``).

    ``batches`` lists the batch sizes to run (None: the prototxt's); ``inputs`` maps the
    random normal draws to the inputs fed (e.g. to keep them positive); ``adjust_weights``
    edits the random weights in place before Caffe sees them.
    """
    seed = _seed(seed)
    model, graph = load(prototxt, seed)
    adjust_weights(model.weights)
    outputs = list(graph.outputs) + [v for v in extra_outputs if v not in graph.outputs]
    for value in outputs:
        blob = graph.values[value].blob
        assert graph.final_value[blob] == value, f"Caffe's blob '{blob}' no longer holds {value}"
    onnx_model = lower_all(model, graph, outputs, opset)
    check_node_names(onnx_model, graph)
    runner = build_engine(engine, onnx_model)
    caffe_net = model.reference_net()
    rng = np.random.default_rng(seed)
    for batch in batches:
        feeds = {}
        for value in graph.inputs:
            shape = graph.values[value].shape
            shape = shape if batch is None else (batch, *shape[1:])
            feeds[value] = np.ascontiguousarray(inputs(rng.standard_normal(shape)), dtype=np.float32)
            caffe_net.blobs[graph.values[value].blob].reshape(*shape)
        caffe_net.reshape()
        caffe_net.forward(**{graph.values[v].blob: a for v, a in feeds.items()})
        expected = {v: np.array(caffe_net.blobs[graph.values[v].blob].data, copy=True) for v in outputs}
        actual = runner.run(feeds)
        for value in outputs:
            where = f"{engine}: value '{value}' at batch {batch or 'of the prototxt'} (seed {seed})"
            assert actual[value].shape == expected[value].shape, \
                f"{where}: shape {actual[value].shape} != Caffe's {expected[value].shape}"
            error = rel_l2(actual[value], expected[value])
            assert error <= TOLERANCE, f"{where}: relative L2 error {error:.3g}"


def check_node_names(model: onnx.ModelProto, graph: LayerGraph) -> None:
    """Every node names its Caffe layer in doc_string and has a unique layer/Op_k name."""
    names = [node.name for node in model.graph.node]
    assert len(set(names)) == len(names)
    for node in model.graph.node:
        assert node.doc_string in graph.layers
        assert node.name.startswith(f"{node.doc_string}/{node.op_type}_")
