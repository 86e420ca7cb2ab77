"""Cut the layer graph into maximal same-backend segments whose graph stays acyclic.

Layers are visited in Caffe's order (a topological order). A layer joins the segments
of its producers that share its backend, merged into one, unless that merge would put
a segment on both ends of a path through another segment: contracting it would then
create a cycle (a branch leaving a TensorRT region through Caffe and coming back).
Afterwards, independent same-backend branches that read a common tensor are merged.
TensorRT segments with fewer compute layers than ``min_segment_size`` are handed to
Caffe and the cut is redone, because each boundary costs a hand-off; a small segment
with no segment on either side (only net inputs in, only net outputs out: a whole tiny
net, or an isolated branch) adds no boundary and stays on TensorRT.

The algorithm only asks a ``Capability`` which layers may go to TensorRT; it knows
nothing about layer types itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import networkx as nx

from ..graph.layer_graph import LayerGraph
from .capability import NON_COMPUTE_TYPES, Capability

TENSORRT = "tensorrt"
CAFFE = "caffe"


@dataclass
class Segment:
    """Consecutive work for one engine: layers in execution order and the values at its edges."""
    id: int
    backend: str
    layers: list[str]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def compute_layer_count(self, graph: LayerGraph) -> int:
        return sum(graph.layers[name].type not in NON_COMPUTE_TYPES for name in self.layers)


@dataclass(frozen=True)
class SmallSegment:
    """A TensorRT segment below ``--min-segment-size``, and whether it moved to Caffe and why."""
    layers: tuple[str, ...]
    compute_layers: int
    moved_to_caffe: bool
    reason: str


@dataclass
class Partition:
    """The segments of one model in execution order, why layers stayed in Caffe, and what
    became of each TensorRT segment smaller than ``min_segment_size``."""
    graph: LayerGraph
    segments: list[Segment]
    fallback_reasons: dict[str, str]
    profile: str
    min_segment_size: int
    small_segments: list[SmallSegment] = field(default_factory=list)

    def segment_of(self, layer: str) -> Segment:
        for segment in self.segments:
            if layer in segment.layers:
                return segment
        raise KeyError(layer)

    def boundary_values(self) -> list[str]:
        """Values that cross from one segment to another (net inputs excluded)."""
        seen: list[str] = []
        for segment in self.segments:
            for value in segment.inputs:
                if value not in self.graph.inputs and value not in seen:
                    seen.append(value)
        return seen


class _Cutter:
    """One pass of the greedy merge for a fixed backend assignment."""

    def __init__(self, graph: LayerGraph, backend_of: dict[str, str]):
        self.graph = graph
        self.backend_of = backend_of
        self.segment_of: dict[str, int] = {}
        self.members: dict[int, list[str]] = {}
        self.backend: dict[int, str] = {}
        self.preds: dict[int, set[int]] = {}
        self.succs: dict[int, set[int]] = {}
        self._next_id = 0

    def _ancestors_inclusive(self, roots: Iterable[int]) -> set[int]:
        seen: set[int] = set()
        stack = list(roots)
        while stack:
            sid = stack.pop()
            if sid not in seen:
                seen.add(sid)
                stack.extend(self.preds[sid])
        return seen

    def _merge_is_acyclic(self, merged: set[int], pred_segments: set[int]) -> bool:
        """No segment outside ``merged`` may lie on a path from a member to the new layer.

        Every segment on such a path is an ancestor of the new layer, and the first one
        after the members is a direct successor of a member, so one look suffices.
        """
        region = self._ancestors_inclusive(pred_segments)
        return not any(s in region and s not in merged for m in merged for s in self.succs[m])

    def _merge(self, ids: list[int], layer: str) -> int:
        target = min(ids)
        for sid in ids:
            if sid == target:
                continue
            for name in self.members.pop(sid):
                self.segment_of[name] = target
                self.members[target].append(name)
            for p in self.preds.pop(sid):
                self.succs[p].discard(sid)
                if p != target:
                    self.preds[target].add(p)
                    self.succs[p].add(target)
            for s in self.succs.pop(sid):
                self.preds[s].discard(sid)
                if s != target:
                    self.succs[target].add(s)
                    self.preds[s].add(target)
            del self.backend[sid]
        self.preds[target].discard(target)
        self.succs[target].discard(target)
        self.members[target].append(layer)
        self.segment_of[layer] = target
        return target

    def add(self, layer_name: str) -> None:
        backend = self.backend_of[layer_name]
        pred_segments = {self.segment_of[p] for p in self.graph.graph.predecessors(layer_name)
                         if p in self.segment_of}
        merged: set[int] = set()
        for sid in sorted(s for s in pred_segments if self.backend[s] == backend):
            if self._merge_is_acyclic(merged | {sid}, pred_segments):
                merged.add(sid)
        if merged:
            sid = self._merge(sorted(merged), layer_name)
        else:
            sid = self._next_id
            self._next_id += 1
            self.members[sid] = [layer_name]
            self.backend[sid] = backend
            self.preds[sid] = set()
            self.succs[sid] = set()
            self.segment_of[layer_name] = sid
        for p in {self.segment_of[p] for p in self.graph.graph.predecessors(layer_name)
                  if p in self.segment_of} - {sid}:
            self.preds[sid].add(p)
            self.succs[p].add(sid)

    def merge_sibling_branches(self) -> None:
        """Merge same-backend segments that read a common value and do not depend on each other.

        Inception-style branches separated by a Caffe-only Concat would otherwise become one
        small engine each; merged, they are one engine with one launch and no extra hand-off.
        """
        changed = True
        while changed:
            changed = False
            readers: dict[str, list[int]] = {}
            for sid in sorted(self.members):
                inside = set(self.members[sid])
                for name in self.members[sid]:
                    for v in self.graph.layers[name].bottoms:
                        if self.graph.values[v].producer not in inside:
                            readers.setdefault(v, [])
                            if sid not in readers[v]:
                                readers[v].append(sid)
            for sids in readers.values():
                for i, a in enumerate(sids):
                    for b in sids[i + 1:]:
                        if a in self.members and b in self.members and a != b \
                                and self.backend[a] == self.backend[b] and self._independent(a, b):
                            self._merge_segments(a, b)
                            changed = True

    def _independent(self, a: int, b: int) -> bool:
        return a not in self._ancestors_inclusive([b]) and b not in self._ancestors_inclusive([a])

    def _merge_segments(self, a: int, b: int) -> None:
        keep, gone = min(a, b), max(a, b)
        for name in self.members.pop(gone):
            self.segment_of[name] = keep
            self.members[keep].append(name)
        for p in self.preds.pop(gone):
            self.succs[p].discard(gone)
            self.preds[keep].add(p)
            self.succs[p].add(keep)
        for s in self.succs.pop(gone):
            self.preds[s].discard(gone)
            self.succs[keep].add(s)
            self.preds[s].add(keep)
        del self.backend[gone]

    def segments(self, keep_outputs: set[str]) -> list[Segment]:
        dag = nx.DiGraph()
        order = {sid: min(self.graph.layers[n].index for n in names) for sid, names in self.members.items()}
        dag.add_nodes_from(self.members)
        dag.add_edges_from((p, s) for s, ps in self.preds.items() for p in ps)
        ordered = list(nx.lexicographical_topological_sort(dag, key=lambda sid: order[sid]))
        segments = []
        net_outputs = set(self.graph.outputs) | keep_outputs
        for new_id, sid in enumerate(ordered):
            names = sorted(self.members[sid], key=lambda n: self.graph.layers[n].index)
            inside = set(names)
            produced = [v for n in names for v in self.graph.layers[n].tops]
            inputs: list[str] = []
            for n in names:
                for v in self.graph.layers[n].bottoms:
                    if self.graph.values[v].producer not in inside and v not in inputs:
                        inputs.append(v)
            outputs = [v for v in produced
                       if v in net_outputs or any(c not in inside for c in self.graph.consumers[v])]
            segments.append(Segment(new_id, self.backend[sid], names, inputs, outputs))
        return segments


def partition(graph: LayerGraph, capability: Capability, min_segment_size: int = 3,
              keep_outputs: Iterable[str] = (), rejected: Mapping[str, str] | None = None) -> Partition:
    """Partition ``graph``; ``keep_outputs`` are value ids the user wants to see (segment outputs).

    ``rejected`` maps layers an engine refused (at lowering or build time) to the reason;
    they go to Caffe even though the capability table accepts them.
    """
    capability.check_fallback_names(graph)
    rejected = rejected or {}
    reasons: dict[str, str] = {}
    backend_of: dict[str, str] = {}
    for layer in graph.compute_layers():
        if layer.name in rejected:
            backend_of[layer.name] = CAFFE
            reasons[layer.name] = rejected[layer.name]
            continue
        verdict = capability.judge(layer, graph)
        backend_of[layer.name] = TENSORRT if verdict.supported else CAFFE
        if not verdict.supported:
            reasons[layer.name] = verdict.reason or "not supported"
    keep = set(keep_outputs)
    decisions: list[SmallSegment] = []
    while True:
        cutter = _Cutter(graph, backend_of)
        for layer in graph.compute_layers():
            cutter.add(layer.name)
        cutter.merge_sibling_branches()
        segments = cutter.segments(keep)
        small = [s for s in segments
                 if s.backend == TENSORRT and s.compute_layer_count(graph) < min_segment_size]
        to_move = [s for s in small if not _isolated(graph, s)]
        if not to_move:
            decisions += [SmallSegment(tuple(s.layers), s.compute_layer_count(graph), False,
                                       "stays on TensorRT although below --min-segment-size "
                                       f"{min_segment_size}: only net inputs feed it and nothing but the "
                                       "caller reads its outputs, so it adds no hand-off") for s in small]
            return Partition(graph, segments, reasons, capability.profile, min_segment_size, decisions)
        for segment in to_move:
            count = segment.compute_layer_count(graph)
            why = (f"TensorRT segment of {count} compute layer(s) is below --min-segment-size "
                   f"{min_segment_size} and exchanges tensors with other segments (each a hand-off)")
            decisions.append(SmallSegment(tuple(segment.layers), count, True, f"moved to Caffe: {why}"))
            for name in segment.layers:
                backend_of[name] = CAFFE
                reasons[name] = why


def _isolated(graph: LayerGraph, segment: Segment) -> bool:
    """True if ``segment`` reads only net inputs and no other segment reads its outputs."""
    inside = set(segment.layers)
    return all(v in graph.inputs for v in segment.inputs) and \
        all(c in inside for v in segment.outputs for c in graph.consumers[v])
