"""Check a lowering against the user's own pycaffe: the conformance helper for custom layers.

    from hybrid_infer.testing import check_lowering
    result = check_lowering('layer { name: "act" type: "Python" bottom: "data" top: "out" '
                            'python_param { module: "my_layers" layer: "HardSwish" } }',
                            input_shapes={"data": (2, 3, 8, 8)})
    print(result.max_error)

The net (a prototxt snippet, plus one Input layer per ``input_shapes`` entry) gets random
weights and inputs, runs in pycaffe and, lowered to ONNX as one segment, in a CPU engine
(ONNX Runtime, or ``engine="openvino"``); every output must agree within ``tolerance``
relative L2. hybrid_infer's own per-layer conformance tests use this same helper, once per
engine.
"""
from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import numpy as np

from .errors import HybridInferError
from .graph.layer_graph import LayerGraph
from .lowering.segment_to_onnx import lower_segment
from .model.caffe_model import CaffeModel

if TYPE_CHECKING:
    import onnx

    from .engines.base import Engine

#: The project's per-layer target: relative L2 error against Caffe, FP32.
LAYER_TOLERANCE = 1e-5
Shape = tuple[int, ...]


def net(body: str, **inputs: Shape) -> str:
    """A prototxt: one Input layer per keyword (blob name = shape, N-first), then ``body``.
    Without keywords, one input ``data`` of shape (2, 3, 8, 8)."""
    declared = "".join(
        f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ '
        + " ".join(f"dim: {d}" for d in shape) + " } } }\n"
        for name, shape in (inputs or {"data": (2, 3, 8, 8)}).items())
    return declared + body


def one_layer(layer_type: str, params: str = "", **inputs: Shape) -> str:
    """A net with a single layer "op" of ``layer_type`` reading every input and writing "out";
    ``params`` is the layer's parameter text, e.g. ``'relu_param { negative_slope: 0.1 }'``."""
    bottoms = " ".join(f'bottom: "{name}"' for name in (inputs or {"data": ()}))
    return net(f'layer {{ name: "op" type: "{layer_type}" {bottoms} top: "out" {params} }}', **inputs)


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64 (denominator floored at 1e-30)."""
    denominator = max(float(np.linalg.norm(expected.astype(np.float64))), 1e-30)
    return float(np.linalg.norm(actual.astype(np.float64) - expected.astype(np.float64))) / denominator


def load_text(prototxt: str, seed: int = 0, *, input_lines: int = 0) -> tuple[CaffeModel, LayerGraph]:
    """The model of prototxt text (random weights drawn from ``seed``) and its layer graph.

    Errors name "the check_lowering net" rather than the temporary file it was written to;
    ``input_lines`` (Input layers put before the caller's text) is said in them, since line
    numbers count those too.
    """
    with tempfile.TemporaryDirectory(prefix="hybrid_infer_check_") as tmp:
        path = Path(tmp) / "net.prototxt"
        path.write_text(prototxt)
        try:
            model = CaffeModel(path)
        except HybridInferError as exc:
            note = f" (line numbers count the {input_lines} Input layer line(s) put first)" if input_lines else ""
            raise type(exc)(str(exc).replace(str(path), "the check_lowering net") + note) from None
    model.set_random_weights(seed)
    return model, LayerGraph(model)


def lower_whole_net(model: CaffeModel, graph: LayerGraph, outputs: Sequence[str],
                    opset: int = 17) -> "onnx.ModelProto":
    """Every compute layer of the net as one ONNX segment (checked by onnx.checker)."""
    return lower_segment(graph, [layer.name for layer in graph.compute_layers()], graph.inputs,
                         list(outputs), model.weights, opset=opset)


def cpu_engine(model: "onnx.ModelProto", engine: str = "onnxruntime") -> "Engine":
    """The CPU engine named ``engine`` ("onnxruntime", "openvino") for ``model``, FP32, on one
    thread (small nets: more threads only add scheduling noise). Raises OptionError when that
    engine cannot run here."""
    from .errors import OptionError
    from .executor.engine_choice import CANDIDATES, CpuSettings
    from .executor.engine_factory import resolve_engine
    if engine not in CANDIDATES:
        raise OptionError(f"engine '{engine}': lowerings are checked on a CPU engine, one of {', '.join(CANDIDATES)}")
    resolve_engine(engine)  # an OptionError saying why, when it cannot run here
    return CANDIDATES[engine].build(model, CpuSettings(threads=1), True, {})


def fresh_seed(seed: Optional[int] = None) -> int:
    """``seed``, else HYBRID_INFER_TEST_SEED, else a fresh random one (printed in failures)."""
    if seed is not None:
        return seed
    fixed = os.environ.get("HYBRID_INFER_TEST_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(2**31)


@dataclass(frozen=True)
class LoweringCheck:
    """What ``check_lowering`` measured: relative L2 error per ``(value id, batch)``."""
    seed: int
    errors: dict[tuple[str, int], float]

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def check_lowering(prototxt: str, *, input_shapes: Optional[Mapping[str, Shape]] = None,
                   batches: Sequence[Optional[int]] = (None, 3), extra_outputs: Sequence[str] = (),
                   inputs: Callable[[np.ndarray], np.ndarray] = lambda a: a,
                   adjust_weights: Callable[[dict[str, list[np.ndarray]]], None] = lambda w: None,
                   seed: Optional[int] = None, opset: int = 17,
                   tolerance: float = LAYER_TOLERANCE, engine: str = "onnxruntime") -> LoweringCheck:
    """Run a small net in pycaffe and, lowered, in a CPU engine (``engine``: "onnxruntime" or
    "openvino", compiled once for every batch); assert they agree.

    ``prototxt`` is a whole net, or layers only when ``input_shapes`` ({blob: N-first shape})
    declares the inputs. Every net output and each of ``extra_outputs`` (value ids) is
    compared at each batch size of ``batches`` (None: the prototxt's). Random weights and
    standard normal inputs come from ``seed`` (fresh when None; see ``fresh_seed``);
    ``inputs`` maps the normal draws to what is fed (e.g. ``np.abs`` for positive inputs),
    ``adjust_weights`` edits the random weights in place before Caffe sees them.

    Lowerings under test must be registered first (import their module). Returns the
    errors; raises AssertionError (naming value, batch and seed) when a shape differs or an
    error exceeds ``tolerance``, and LoweringError when the lowering refuses the layer.
    """
    input_lines = len(input_shapes or {})
    if input_shapes:
        prototxt = net(prototxt, **input_shapes)
    seed = fresh_seed(seed)
    model, graph = load_text(prototxt, seed, input_lines=input_lines)
    adjust_weights(model.weights)
    outputs = list(graph.outputs) + [v for v in extra_outputs if v not in graph.outputs]
    for value in outputs:
        blob = graph.values[value].blob
        assert graph.final_value[blob] == value, f"Caffe's blob '{blob}' no longer holds {value}"
    runner = cpu_engine(lower_whole_net(model, graph, outputs, opset), engine)
    caffe_net = model.reference_net()
    rng = np.random.default_rng(seed)
    errors: dict[tuple[str, int], float] = {}
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
            used_batch = batch if batch is not None else graph.values[value].shape[0]
            where = f"{engine}: value '{value}' at batch {used_batch} (seed {seed})"
            assert actual[value].shape == expected[value].shape, \
                f"{where}: shape {actual[value].shape} != Caffe's {expected[value].shape}"
            error = rel_l2(actual[value], expected[value])
            errors[(value, used_batch)] = error
            assert error <= tolerance, f"{where}: relative L2 error {error:.3g} above {tolerance:g}"
    return LoweringCheck(seed, errors)
