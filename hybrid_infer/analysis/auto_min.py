"""``--min-segment-size auto``: pick the minimum TensorRT segment size by measuring.

A fixed minimum (what other tools offer) guesses how much a hand-off costs against what a
small TensorRT segment saves; the answer depends on the model, the inputs' size and the
machine. Here every minimum that gives a *different* partition is tried on the user's own
inputs and the fastest of those that match Caffe (within the tolerance) wins. Those minimums are found without running anything: at
minimum 1 each TensorRT segment has some number of compute layers c, and a minimum of c+1
is the first that hands that segment to Caffe, so only those values can change the cut.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np

from ..api import HybridNet
from ..errors import HybridInferError
from ..partition.partitioner import TENSORRT, Partition
from .timing import Timing, time_calls

#: At most this many distinct partitions are timed (the smallest minimums, then the largest).
MAX_CANDIDATES = 6


@dataclass
class Candidate:
    min_sizes: list[int]  # every minimum that gives this same partition
    segments: int
    tensorrt_layers: int
    timing: Optional[Timing] = None
    rel_l2: float = 0.0  # worst output's error against Caffe


@dataclass
class AutoChoice:
    """The chosen minimum, its net (engines built), and why."""
    min_segment_size: int
    net: HybridNet
    candidates: list[Candidate]
    reason: str


def _signature(p: Partition) -> tuple:
    return tuple((s.backend, tuple(s.layers)) for s in p.segments)


def candidate_sizes(make_net: Callable[[int], HybridNet]) -> list[int]:
    """1, then c + 1 for every compute-layer count c of a TensorRT segment at minimum 1."""
    probe = make_net(1)
    counts = {s.compute_layer_count(probe.graph) for s in probe.partition.segments if s.backend == TENSORRT}
    return sorted({1} | {c + 1 for c in counts})


def choose_min_segment_size(make_net: Callable[[int], HybridNet], inputs: Mapping[str, np.ndarray],
                            reference: Mapping[str, np.ndarray], *, tolerance: float = 1e-4, runs: int = 5,
                            warmup: int = 1, tick: Optional[Callable[[], None]] = None) -> AutoChoice:
    """Time each distinct partition on ``inputs`` whose outputs and Softmax inputs are within
    ``tolerance`` of ``reference`` (pure Caffe's ``HybridNet.reference_values``, as ``compare``
    checks); return the fastest (ties: smaller minimum). The largest candidate puts every
    layer in Caffe, so at least one candidate always qualifies."""
    by_partition: dict[tuple, Candidate] = {}
    for size in candidate_sizes(make_net):
        net = make_net(size)
        key = _signature(net.partition)
        if key in by_partition:
            by_partition[key].min_sizes.append(size)
        else:
            on_trt = sum(len(s.layers) for s in net.partition.segments if s.backend == TENSORRT)
            by_partition[key] = Candidate([size], len(net.partition.segments), on_trt)
        net.close()
    candidates = list(by_partition.values())
    if len(candidates) > MAX_CANDIDATES:
        half = MAX_CANDIDATES // 2
        candidates = candidates[:MAX_CANDIDATES - half] + candidates[-half:]
    best: Optional[tuple[Candidate, HybridNet]] = None
    for candidate in candidates:
        net = make_net(candidate.min_sizes[0])
        # The first run builds the engines, which is not part of the per-call latency.
        accuracy = net.compare_values(net.run_values(inputs, list(net.checked_values())), reference, tolerance)
        candidate.rel_l2 = max(d.rel_l2 for d in accuracy)
        if not all(d.within(tolerance) for d in accuracy):
            net.close()
            continue
        candidate.timing = time_calls(lambda: net.run(inputs), runs, warmup, tick)
        if best is None or candidate.timing.median < best[0].timing.median:  # type: ignore[union-attr]
            if best is not None:
                best[1].close()
            best = (candidate, net)
        else:
            net.close()
    if best is None:
        raise HybridInferError(f"no partition matches Caffe within relative L2 {tolerance:g} on these inputs")
    chosen, net = best
    return AutoChoice(chosen.min_sizes[0], net, candidates, _explain(chosen, candidates, tolerance))


def _describe(c: Candidate, tolerance: float, largest: int) -> str:
    """One candidate; the one holding the largest minimum tried holds every larger one too
    (no segment has more compute layers), e.g. a net whose TensorRT segments are isolated
    and so stay whatever the minimum."""
    if c.min_sizes[-1] == largest:
        sizes = f"{c.min_sizes[0]} or more"
    else:
        sizes = f"{c.min_sizes[0]}" if len(c.min_sizes) == 1 else f"{c.min_sizes[0]}..{c.min_sizes[-1]}"
    speed = (f"{c.timing.median * 1e3:.2f} ms median" if c.timing
             else f"refused: relative L2 {c.rel_l2:.2g} against Caffe > {tolerance:g}")
    return f"min {sizes}: {speed}, {c.segments} segment(s), {c.tensorrt_layers} layer(s) on TensorRT"


def _explain(chosen: Candidate, candidates: list[Candidate], tolerance: float) -> str:
    assert chosen.timing is not None
    timed = sorted((c for c in candidates if c.timing and c is not chosen), key=lambda c: c.timing.median)  # type: ignore
    why = (f"--min-segment-size auto chose {chosen.min_sizes[0]}: fastest of {len(candidates)} distinct "
           "partition(s) measured on these inputs")
    if timed:
        runner_up = timed[0]
        gain = runner_up.timing.median / chosen.timing.median - 1  # type: ignore[union-attr]
        why += f", {gain:.1%} faster than the next best (min {runner_up.min_sizes[0]})"
    largest = max(size for c in candidates for size in c.min_sizes)
    return why + "\n" + "\n".join(f"  {'*' if c is chosen else ' '} {_describe(c, tolerance, largest)}"
                                  for c in candidates)
