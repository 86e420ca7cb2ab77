"""Layer-wise comparison of the hybrid with pure Caffe: every value, in execution order.

Both sides must expose *every* value, including a blob's earlier writes that in-place
layers overwrite later (``conv1`` before ``relu1`` turns it into ``conv1@relu1``):

- Caffe keeps only a blob's last write, so the reference net is stepped one layer at a
  time and each layer's tops are copied as soon as it has run (``run_caffe_values``).
- The hybrid is partitioned with every value kept as a segment output, and run through the
  executor, which speaks value ids (``HybridNet(outputs=...)`` takes blob names, and a
  blob name means the last write).

Keeping every value as an output stops ONNX Runtime and TensorRT from fusing across
layers, so the hybrid here can round slightly differently from an ordinary run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from ..api import HybridNet
from ..executor.engine_factory import build_engines, resolve_engine
from ..executor.hybrid_executor import HybridExecutor
from ..graph.layer_graph import LayerGraph
from ..metrics import relative_l2
from ..partition.capability import Capability
from ..partition.partitioner import Partition, partition


@dataclass(frozen=True)
class Settings:
    """How the hybrid under test is partitioned and run."""
    profile: str = "tensorrt"
    min_segment_size: int = 3
    fallback: tuple[str, ...] = ()
    engine: str = "auto"


@dataclass(frozen=True)
class ValueDiff:
    value: str
    layer: str
    layer_type: str
    backend: str  # the engine that computed it: "onnxruntime", "tensorrt" or "caffe"
    segment: int
    shape: tuple[int, ...]
    max_abs: float
    rel_l2: float


@dataclass
class LayerDiff:
    rows: list[ValueDiff]
    tolerance: float
    notes: list[str] = field(default_factory=list)

    @property
    def first_above(self) -> Optional[ValueDiff]:
        return next((r for r in self.rows if r.rel_l2 > self.tolerance), None)


def computed_values(graph: LayerGraph) -> list[str]:
    """Every value a layer writes (net inputs excluded), in Caffe's execution order."""
    return [v for layer in graph.compute_layers() for v in layer.tops]


def caffe_values(net: HybridNet, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every value of pure Caffe on ``inputs``, each copied right after the layer that wrote it."""
    return net.run_caffe_values(inputs, computed_values(net.graph))


def hybrid_values(net: HybridNet, settings: Settings, inputs: Mapping[str, np.ndarray],
                  values: Iterable[str]) -> tuple[dict[str, np.ndarray], Partition, dict[int, str], list[str]]:
    """``values`` computed by the hybrid partitioned as ``settings`` say; also the partition,
    the engine kind that ran each segment, and notes on segments an engine refused."""
    graph, wanted = net.graph, list(values)
    cut = partition(graph, Capability(settings.profile, settings.fallback), settings.min_segment_size,
                    keep_outputs=wanted)
    engine, _ = resolve_engine(settings.engine)
    factory = None
    if engine == "tensorrt":
        from ..engines.tensorrt_segment import tensorrt_factory
        factory = tensorrt_factory()
    executor = HybridExecutor(build_engines(graph, net.model, cut.segments, engine, factory))
    try:
        checked = net.check_inputs(inputs)
        got = executor.run({graph.input_value(name): a for name, a in checked.items()}, wanted)
        kinds = {se.segment.id: se.engine.kind for se in executor.segment_engines}
        notes = [se.fallback_note for se in executor.segment_engines if se.fallback_note]
    finally:
        executor.close()
    return got, cut, kinds, notes


def diff_values(graph: LayerGraph, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
                cut: Partition, kinds: Mapping[int, str], tolerance: float) -> LayerDiff:
    rows = []
    for value in computed_values(graph):
        layer = graph.layers[graph.values[value].producer]
        segment = cut.segment_of(layer.name)
        a, b = got[value], want[value]
        finite = np.abs(a.astype(np.float64) - b.astype(np.float64))
        finite = finite[np.isfinite(finite)]
        rows.append(ValueDiff(value, layer.name, layer.type, kinds.get(segment.id, segment.backend), segment.id,
                              tuple(b.shape), float(finite.max()) if finite.size else 0.0, relative_l2(a, b)))
    return LayerDiff(rows, tolerance)


def layer_diff(net: HybridNet, settings: Settings, inputs: Mapping[str, np.ndarray],
               tolerance: float) -> LayerDiff:
    """Hybrid against Caffe for every value; ``first_above`` is the first over ``tolerance``."""
    want = caffe_values(net, inputs)
    got, cut, kinds, notes = hybrid_values(net, settings, inputs, computed_values(net.graph))
    result = diff_values(net.graph, got, want, cut, kinds, tolerance)
    result.notes = notes
    return result


def to_text(diff: LayerDiff) -> str:
    first = diff.first_above
    header = ["#", "value", "layer", "type", "backend", "seg", "shape", "max abs", "rel L2", ""]
    rows = [[str(i), r.value, r.layer, r.layer_type, r.backend, str(r.segment), "x".join(map(str, r.shape)),
             f"{r.max_abs:.3g}", f"{r.rel_l2:.3g}",
             "<- first above tolerance" if r is first else ("above" if r.rel_l2 > diff.tolerance else "")]
            for i, r in enumerate(diff.rows)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows), ""]
    if first is None:
        out.append(f"all {len(diff.rows)} values within relative L2 {diff.tolerance:g} of Caffe")
    else:
        above = sum(r.rel_l2 > diff.tolerance for r in diff.rows)
        out.append(f"first value above relative L2 {diff.tolerance:g}: {first.value} (layer {first.layer}, "
                   f"{first.layer_type}, {first.backend}, segment {first.segment}): rel L2 {first.rel_l2:.3g}, "
                   f"max abs {first.max_abs:.3g}; {above} of {len(diff.rows)} values above")
    out += [f"note: {n}" for n in diff.notes]
    return "\n".join(out) + "\n"


def to_json(diff: LayerDiff) -> dict[str, Any]:
    first = diff.first_above
    return {"tolerance_rel_l2": diff.tolerance, "first_above": first.value if first else None,
            "values": [{"value": r.value, "layer": r.layer, "type": r.layer_type, "backend": r.backend,
                        "segment": r.segment, "shape": list(r.shape), "max_abs": r.max_abs, "rel_l2": r.rel_l2,
                        "above": r.rel_l2 > diff.tolerance} for r in diff.rows],
            "notes": diff.notes}
