"""Caffe's greedy NMS (``ApplyNMSFast``, src/caffe/util/bbox_util.cpp) in ONNX, for many
images and classes at once, with nodes TensorRT-RTX builds (no NonMaxSuppression).

Candidates come in descending score order, ``[B, C, K]`` (K: the run's candidates per
class). Candidate i is kept when valid and its overlap with every box kept before it is at
most the threshold (``overlap <= threshold``, as Caffe tests it; Caffe's JaccardOverlap,
candidate first: the intersection's sides min(xmax) - max(xmin) must both be positive, then
intersection / (size_i + size_j - intersection)). With ``eta`` < 1 the threshold shrinks
by eta after each kept box while above 0.5.

Two exact ways, chosen from the graph's static sizes (K: top_k):

- where a step's tensors are small (B x C x K up to ``SMALL_STEP``, where a step is mostly
  the fixed cost of a Loop iteration), the pairwise ``[B, C, K, K]`` tensors small too
  (``PAIRWISE_LIMIT``) and eta is 1:
  the suppression matrix once, then up to ``ROUNDS`` rounds that each decide, at once,
  every candidate whose earlier conflicting candidates are all decided (kept if none of
  them is kept, dropped as soon as one is); a decision is final, so this is the greedy
  result. Typical detections need a few rounds; whatever a long chain of overlaps (each
  box suppressing the next) leaves undecided is finished position by position from the
  first undecided one, reading rows of the same matrix;
- otherwise (or with eta < 1, whose threshold depends on how many boxes were kept before):
  position by position from the start, computing each candidate's overlaps with its class
  in the step: K steps of O(B x C x K) work and memory, never K^2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from onnx import TensorProto

from .emitter import Emitter, LoopBody

#: Largest B x C x K (static sizes) for which the suppression matrix and rounds are used:
#: above it a step's own work outweighs its fixed cost (about 25 us per Loop iteration in
#: ONNX Runtime on the development machine's CPU), and the K x K matrix costs more than
#: the steps it saves (measured: scripts/bench_detection_output.py).
SMALL_STEP = 4096
#: Largest B x C x K^2 (static sizes) for which the suppression matrix is built.
PAIRWISE_LIMIT = 1 << 22
#: Rounds of parallel decisions before the rest is finished position by position.
ROUNDS = 8


def _axis(e: Emitter, axis: int) -> str:
    return e.const(np.array([axis]), f"axis{axis}")


@dataclass(frozen=True)
class Coords:
    """Box corners and areas, each a tensor (all of one shape, or broadcasting)."""
    x1: str
    y1: str
    x2: str
    y2: str
    size: str

    def map(self, f: Callable[[str], str]) -> "Coords":
        return Coords(*(f(t) for t in (self.x1, self.y1, self.x2, self.y2, self.size)))

    def beyond(self, emit: Emitter, others: "Coords", threshold: str) -> str:
        """Whether these candidates overlap ``others`` by more than ``threshold`` (Caffe's
        JaccardOverlap, these first; broadcasting)."""
        zero = emit.const(np.float32(0), "zero_f")
        width = emit("Sub", emit("Min", others.x2, self.x2), emit("Max", others.x1, self.x1))
        height = emit("Sub", emit("Min", others.y2, self.y2), emit("Max", others.y1, self.y1))
        inter = emit("Mul", width, height)
        overlap = emit("Div", inter, emit("Sub", emit("Add", self.size, others.size), inter))
        return emit("And", emit("And", emit("Greater", width, zero), emit("Greater", height, zero)),
                    emit("Not", emit("LessOrEqual", overlap, threshold)))


class Candidates:
    """The candidates' boxes ([B, C, K] each), their validity [B, C, K] (bool), K as a
    scalar and the positions 0..K-1."""

    def __init__(self, e: Emitter, boxes: str, valid: str, max_steps: int):
        x1, y1, x2, y2 = (e("Squeeze", c, _axis(e, 3)) for c in e.columns(boxes, axis=3))
        self.boxes = Coords(x1, y1, x2, y2, e("Mul", e("Sub", x2, x1), e("Sub", y2, y1)))
        self.valid = valid
        size = e("Slice", e("Shape", valid), e.const(np.array([2]), "two"), e.const(np.array([3]), "three"))
        self.count = e("Squeeze", size, _axis(e, 0))
        self.positions = e("Range", e.const(np.int64(0), "i0"), self.count, e.const(np.int64(1), "i1"))
        #: The Loops' trip limit: K never exceeds it (their condition ends them at K).
        self.max_steps = e.const(np.int64(max_steps), "max_steps")


def _any(emit: Emitter, mask: str, axis: int, e: Emitter) -> str:
    """Whether any element along ``axis`` is true (kept as size 1)."""
    total = emit("ReduceSum", emit("Cast", mask, to=TensorProto.FLOAT), _axis(e, axis), keepdims=1)
    return emit("Greater", total, e.const(np.float32(0.5), "half_mark"))


def _suppression(e: Emitter, c: Candidates, threshold: np.float32) -> str:
    """[B, C, K, K] bool: true where candidate j (axis 3) comes before i (axis 2) and would
    suppress it if kept."""
    later = c.boxes.map(lambda t: e("Unsqueeze", t, _axis(e, 3)))    # i: [B, C, K, 1]
    earlier = c.boxes.map(lambda t: e("Unsqueeze", t, _axis(e, 2)))  # j: [B, C, 1, K]
    beyond = later.beyond(e, earlier, e.const(threshold, "nms_threshold"))
    before = e("Less", e("Unsqueeze", c.positions, _axis(e, 0)), e("Unsqueeze", c.positions, _axis(e, 1)))
    return e("And", beyond, before)


def _rounds(e: Emitter, suppress: str, c: Candidates) -> tuple[str, str]:
    """(kept, decided) [B, C, K] after up to ROUNDS rounds of parallel decisions."""
    body = LoopBody(e.ctx, e.layer)
    iteration = body.value("round", TensorProto.INT64, [])
    again = body.value("again", TensorProto.BOOL, [])
    kept_in = body.value("kept", TensorProto.BOOL, None)
    done_in = body.value("decided", TensorProto.BOOL, None)
    as_column = lambda t: body("Unsqueeze", body("Cast", t, to=TensorProto.FLOAT), _axis(e, 3))
    counts = body("MatMul", e("Cast", suppress, to=TensorProto.FLOAT),
                  body("Concat", as_column(body("Not", done_in.name)), as_column(kept_in.name), axis=3))
    waiting, killed = (body("Greater", body("Squeeze", t, _axis(e, 3)), e.const(np.float32(0.5), "half_mark"))
                       for t in body.many("Split", [counts, e.const(np.array([1, 1]), "split2")], 2, axis=3))
    open_ = body("Not", done_in.name)
    accept = body("And", open_, body("Not", body("Or", waiting, killed)))
    kept_out = body("Or", kept_in.name, accept)
    done_out = body("Or", done_in.name, body("And", open_, body("Or", accept, killed)))
    left = body("ReduceMax", body("Cast", body("Not", done_out), to=TensorProto.FLOAT), keepdims=0)
    more = body("Greater", left, e.const(np.float32(0.5), "half_mark"))
    start_kept = e("Cast", e.fill(c.valid, 0), to=TensorProto.BOOL)
    kept, done = e.many("Loop", [e.const(np.int64(ROUNDS), "rounds"), e.const(np.bool_(True), "go"), start_kept,
                                 e("Not", c.valid)], 2,
                        body=body.graph([iteration, again, kept_in, done_in],
                                        [(more, TensorProto.BOOL), (kept_out, TensorProto.BOOL),
                                         (done_out, TensorProto.BOOL)]))
    return kept, done


def _in_order(e: Emitter, c: Candidates, kept: str, start: str, step) -> str:
    """Visit positions ``start`` .. K-1 in order; ``step(body, at, kept)`` gives whether the
    candidate at position ``at`` ([1]) is kept, [B, C, 1]. Returns kept [B, C, K]."""
    body = LoopBody(e.ctx, e.layer)
    iteration = body.value("iteration", TensorProto.INT64, [])
    again = body.value("again", TensorProto.BOOL, [])
    kept_in = body.value("kept", TensorProto.BOOL, None)
    position = body("Add", iteration.name, start)
    keep = step(body, body("Unsqueeze", position, _axis(e, 0)), kept_in.name)
    kept_out = body("Or", kept_in.name, body("And", body("Equal", c.positions, position), keep))
    more = body("Less", body("Add", position, e.const(np.int64(1), "i1")), c.count)
    go = e("Less", start, c.count)
    return e("Loop", c.max_steps, go, kept,
             body=body.graph([iteration, again, kept_in], [(more, TensorProto.BOOL), (kept_out, TensorProto.BOOL)]))


def adaptive_threshold(threshold: np.float32, eta: np.float32) -> bool:
    """Whether ApplyNMSFast's threshold changes as boxes are kept (eta < 1, above 0.5)."""
    return bool(eta < 1 and threshold > 0.5)


def uses_matrix(threshold: np.float32, eta: np.float32, groups: int, max_steps: int) -> bool:
    """Whether ``greedy_nms`` builds the suppression matrix (see the module docstring) for
    ``groups`` = B x C and K = ``max_steps``."""
    return (not adaptive_threshold(threshold, eta) and groups * max_steps <= SMALL_STEP
            and groups * max_steps * max_steps <= PAIRWISE_LIMIT)


def greedy_nms(e: Emitter, boxes: str, valid: str, threshold: np.float32, eta: np.float32,
               static_groups: int, max_steps: int) -> str:
    """Which candidates Caffe's NMS keeps, [B, C, K] bool. ``boxes`` [B, C, K, 4] and
    ``valid`` [B, C, K] in descending score order; ``static_groups``: B x C for the graph's
    static sizes and ``max_steps`` the largest K (top_k): they pick the way (see the module
    docstring)."""
    c = Candidates(e, boxes, valid, max_steps)
    adaptive = adaptive_threshold(threshold, eta)
    if not uses_matrix(threshold, eta, static_groups, max_steps):
        return _sequential(e, c, threshold, eta if adaptive else None)
    suppress = _suppression(e, c, threshold)
    kept, done = _rounds(e, suppress, c)
    first_open = e("ReduceMin", e("Where", done, c.count, c.positions), keepdims=0)

    def step(body: LoopBody, at: str, kept_now: str) -> str:
        row = body("Gather", suppress, at, axis=2)  # [B, C, 1, K]: who would suppress it
        hit = _any(body, body("And", row, body("Unsqueeze", kept_now, _axis(e, 2))), 3, e)
        undecided = body("Not", body("Gather", done, at, axis=2))
        return body("And", undecided, body("Not", body("Squeeze", hit, _axis(e, 3))))
    return _in_order(e, c, kept, first_open, step)


def _sequential(e: Emitter, c: Candidates, threshold: np.float32, eta: Optional[np.float32]) -> str:
    """Position by position from 0, each step computing its candidate's overlaps with its
    class ([B, C, K]; only the boxes kept so far count); with ``eta`` the threshold
    [B, C, 1] is carried and shrinks after each kept box."""
    body = LoopBody(e.ctx, e.layer)
    iteration = body.value("iteration", TensorProto.INT64, [])
    again = body.value("again", TensorProto.BOOL, [])
    kept_in = body.value("kept", TensorProto.BOOL, None)
    threshold_in = body.value("threshold", TensorProto.FLOAT, None) if eta is not None else None
    at = body("Unsqueeze", iteration.name, _axis(e, 0))
    pick = lambda t: body("Gather", t, at, axis=2)  # [B, C, 1]: candidate i
    limit = threshold_in.name if threshold_in else e.const(threshold, "nms_threshold")
    hit = _any(body, body("And", c.boxes.map(pick).beyond(body, c.boxes, limit), kept_in.name), 2, e)
    keep = body("And", pick(c.valid), body("Not", hit))
    kept_out = body("Or", kept_in.name, body("And", body("Equal", c.positions, iteration.name), keep))
    more = body("Less", body("Add", iteration.name, e.const(np.int64(1), "i1")), c.count)
    carried = [(more, TensorProto.BOOL), (kept_out, TensorProto.BOOL)]
    start = [e("Cast", e.fill(c.valid, 0), to=TensorProto.BOOL)]
    inputs = [iteration, again, kept_in]
    if threshold_in is not None:
        assert eta is not None
        half = e.const(np.float32(0.5), "half_mark")
        shrink = body("And", keep, body("Greater", threshold_in.name, half))
        carried.append((body("Where", shrink, body("Mul", threshold_in.name, e.const(eta, "eta")), threshold_in.name),
                        TensorProto.FLOAT))
        first = e("Slice", c.valid, e.const(np.array([0]), "zero"), e.const(np.array([1]), "one"), _axis(e, 2))
        start.append(e.fill(first, float(threshold)))
        inputs.append(threshold_in)
    go = e("Greater", c.count, e.const(np.int64(0), "i0"))
    return e.many("Loop", [c.max_steps, go, *start], len(start), body=body.graph(inputs, carried))[0]
