"""Invariants every partition must satisfy, shared by the partition tests."""
from __future__ import annotations

import networkx as nx

from hybrid_infer.graph.layer_graph import LayerGraph
from hybrid_infer.partition.partitioner import TENSORRT


def check_partition_invariants(graph: LayerGraph, p, min_size: int) -> None:
    placed = [name for s in p.segments for name in s.layers]
    assert sorted(placed) == sorted(layer.name for layer in graph.compute_layers())
    assert len(placed) == len(set(placed))
    seg_of = {name: s.id for s in p.segments for name in s.layers}
    dag = nx.DiGraph()
    dag.add_nodes_from(s.id for s in p.segments)
    dag.add_edges_from((seg_of[u], seg_of[v]) for u, v in graph.graph.edges
                       if u in seg_of and v in seg_of and seg_of[u] != seg_of[v])
    assert nx.is_directed_acyclic_graph(dag)
    available = set(graph.inputs)
    for s in p.segments:
        assert set(s.inputs) <= available, f"segment {s.id} reads a value not produced earlier"
        available |= set(s.outputs)
        if s.backend == TENSORRT and s.compute_layer_count(graph) < min_size:
            # Only a segment without neighbours may stay small: net inputs in, the caller out.
            assert set(s.inputs) <= set(graph.inputs), f"small segment {s.id} is fed by another segment"
            assert all(c in s.layers for v in s.outputs for c in graph.consumers[v]), \
                f"small segment {s.id} feeds another segment"
            assert any(d.layers == tuple(s.layers) and not d.moved_to_caffe for d in p.small_segments)
    for v in graph.outputs:
        assert v in available
