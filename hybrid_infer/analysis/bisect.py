"""``diff --bisect``: the smallest set of lowered layers that still produces a mismatch.

A mismatch seen late in a net may come from any earlier lowered layer, and errors grow as
they travel, so the first flagged value is a hint, not a verdict. Instead, layers are
taken away from TensorRT (forced to Caffe with ``fallback``) and the net is run again:
delta debugging (Zeller's ddmin) over the layers that were on TensorRT finds a set that
still fails on its own while every set with one layer fewer passes ("1-minimal"). Each
test is a real hybrid run of the real lowering, compared value by value with Caffe.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Sequence

import networkx as nx
import numpy as np

from ..api import HybridNet
from ..partition.capability import Capability
from ..partition.partitioner import TENSORRT, Partition, partition
from .layer_diff import LayerDiff, Settings, computed_values, diff_values, hybrid_values


def ddmin(items: Sequence[str], fails: Callable[[frozenset[str]], bool]) -> list[str]:
    """A 1-minimal subset of ``items`` for which ``fails`` holds; ``fails(items)`` must hold."""
    current = list(items)
    n = 2
    while len(current) >= 2:
        size = -(-len(current) // n)
        chunks = [current[i:i + size] for i in range(0, len(current), size)]
        for chunk in chunks:
            if fails(frozenset(chunk)):
                current, n = chunk, 2
                break
        else:
            for chunk in chunks:
                rest = [x for x in current if x not in chunk]
                if fails(frozenset(rest)):
                    current, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(current):
                    break
                n = min(len(current), 2 * n)
    return current


@dataclass
class BisectResult:
    culprits: list[str]  # empty when the mismatch did not reproduce
    runs: int
    diff_with_culprits: Optional[LayerDiff]  # the hybrid with only the culprits lowered
    explanation: str


def bisect(net: HybridNet, settings: Settings, inputs: Mapping[str, np.ndarray],
           reference: Mapping[str, np.ndarray], tolerance: float) -> BisectResult:
    """Search the layers ``settings`` puts on TensorRT for a 1-minimal failing set.

    Runs use minimum segment size 0, so a single kept layer really is lowered on its own.
    Only layers at or before the first mismatching value (its producer and the layers it
    depends on) are suspects, and a run fails only if it has a mismatch at or before that
    value: an error cannot flow backwards, so nothing after the first mismatch is blamed.
    """
    graph = net.graph
    values = computed_values(graph)
    base = replace(settings, min_segment_size=0)
    lowered = [name for s in partition_of(net, settings).segments if s.backend == TENSORRT for name in s.layers]
    cache: dict[frozenset[str], LayerDiff] = {}

    def run_with(kept: frozenset[str]) -> LayerDiff:
        if kept not in cache:
            forced = tuple(name for name in lowered if name not in kept)
            got, cut, kinds, _ = hybrid_values(net, replace(base, fallback=base.fallback + forced), inputs, values)
            cache[kept] = diff_values(graph, got, reference, cut, kinds, tolerance)
        return cache[kept]

    first = run_with(frozenset(lowered)).first_above if lowered else None
    if first is None:
        return BisectResult([], len(cache), None,
                            "the mismatch does not reproduce when the same layers are lowered at minimum "
                            "segment size 0 (a different cut): nothing to bisect")
    upstream = nx.ancestors(graph.graph, first.layer) | {first.layer}
    suspects = [name for name in lowered if name in upstream]
    if not suspects:
        return BisectResult([], len(cache), None,
                            f"the first mismatch, {first.value} (layer {first.layer}, {first.layer_type}, run by "
                            f"{first.backend}), has no TensorRT layer at or before it: every value it depends on "
                            "matches Caffe, so no lowering is to blame")
    limit = run_with(frozenset(lowered)).index(first.value)

    def fails(kept: frozenset[str]) -> bool:
        found = run_with(kept).first_above
        return found is not None and run_with(kept).index(found.value) <= limit

    if not fails(frozenset(suspects)):
        return BisectResult([], len(cache), None,
                            f"the mismatch at {first.value} does not reproduce with only the TensorRT layers before "
                            "it lowered: it needs layers after it too, which cannot cause it; nothing to bisect")
    culprits = ddmin(suspects, fails)
    found = run_with(frozenset(culprits))
    first = found.first_above
    assert first is not None
    kinds = ", ".join(f"{name} ({graph.layers[name].type})" for name in culprits)
    return BisectResult(culprits, len(cache), found,
                        f"smallest set found after {len(cache)} hybrid run(s): {kinds}. With only "
                        f"{'this layer' if len(culprits) == 1 else 'these layers'} on TensorRT and the rest "
                        f"in Caffe, {first.value} is off by relative L2 {first.rel_l2:.3g} (max abs "
                        f"{first.max_abs:.3g}); moving {'it' if len(culprits) == 1 else 'any one of them'} to Caffe "
                        f"brings every value within {tolerance:g}.")


def partition_of(net: HybridNet, settings: Settings) -> Partition:
    """The partition ``settings`` describe, on ``net``'s graph (no engines built)."""
    return partition(net.graph, Capability(settings.profile, settings.fallback), settings.min_segment_size)
