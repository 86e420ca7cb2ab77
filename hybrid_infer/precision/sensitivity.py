"""Which layers to keep in FP32 for an accuracy target: measured, layer by layer.

Every configuration is judged against pure Caffe FP32 on the evaluation inputs, on what
``run --check`` compares (``HybridNet.checked_values``): the outputs and the input of every
Softmax (probabilities saturate and would hide the error), DetectionOutput blobs detection
by detection (``detections.py``: detections found on one side only are counted).

1. Reachable? The configuration with every candidate layer kept in FP32 (and, on the CPU,
   their 8-bit neighbours: ``plan.reduced_neighbours``) is measured first. If even that
   misses the target, the search stops at once and says so.
2. Sensitivity: for every candidate layer (Convolution, Deconvolution, InnerProduct,
   Eltwise of the TensorRT segments), the hybrid runs with *only that layer* reduced, and
   the relative L2 at the measuring points is its sensitivity: the fixed-shape checked
   values plus the inputs of every DetectionOutput (a detector's rows vary in number, its
   inputs do not), so every layer gets a number even where the net's output is a list of
   boxes. A non-finite error (FP16 overflow) ranks first.
3. Greedy: starting from every layer reduced, the most sensitive layer not yet kept goes
   back to FP32, and the whole hybrid is measured again (error and median latency). A step
   that makes the target's metric worse is undone (listed as skipped); the search stops
   when the target is met. If the ranked list runs out first, the skipped layers are kept
   after all, one by one, until it is (with every layer kept the floor is reached, and
   the floor meets the target, or step 1 stopped the search).

The engines are the ones the hybrid would use (ONNX Runtime's CPU placement here,
TensorRT's where it runs), so both figures are for the engine the user will run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..analysis.timing import time_calls
from ..api import HybridNet
from ..detections import DETECTION_TOLERANCE, detection_outputs
from ..errors import OptionError
from ..metrics import relative_l2
from .plan import PrecisionPlan, quantizable_layers

#: Target metrics: at most (rel_l2, detections) or at least (top1) the value.
METRICS = ("rel_l2", "top1", "detections")


@dataclass(frozen=True)
class AccuracyTarget:
    """``rel_l2``: worst relative L2 against Caffe FP32 (outputs and Softmax inputs) at most
    ``value``; ``top1``: top-1 agreement with Caffe FP32 at least ``value`` (classifiers);
    ``detections``: at most ``value`` detections found on one side only (SSD detectors)."""
    metric: str
    value: float

    def met(self, error: Mapping[str, Optional[float]]) -> bool:
        measured = error[self.metric]
        if measured is None or math.isnan(measured):
            return False
        return measured >= self.value if self.metric == "top1" else measured <= self.value

    def worse(self, a: Mapping[str, Optional[float]], b: Mapping[str, Optional[float]]) -> bool:
        """``a`` is worse than ``b`` on this target's metric (NaN and None count as worst)."""
        def score(e: Mapping[str, Optional[float]]) -> float:
            v = e[self.metric]
            if v is None or math.isnan(v):
                return -math.inf
            return v if self.metric == "top1" else -v
        return score(a) < score(b)

    @property
    def text(self) -> str:
        return f"{self.metric}{'>=' if self.metric == 'top1' else '<='}{self.value:g}"


def parse_target(text: str) -> AccuracyTarget:
    """``rel_l2=0.02``, ``top1=0.99`` or ``detections=0``; a mistake is an OptionError with the spelling."""
    metric, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or metric not in METRICS or not math.isfinite(number) or number < 0:
        raise OptionError(f"--accuracy-target {text!r}: expected rel_l2=X (worst relative L2 of the outputs and "
                          "Softmax inputs against Caffe FP32, e.g. rel_l2=0.02), top1=P (top-1 agreement, e.g. "
                          "top1=0.99) or detections=N (SSD detections differing from Caffe's, e.g. detections=0)")
    if metric == "top1" and number > 1:
        raise OptionError(f"--accuracy-target {text!r}: top-1 agreement is a fraction from 0 to 1")
    return AccuracyTarget(metric, number)


def is_classifier_shape(shape: Sequence[int]) -> bool:
    """Shapes whose top-1 means something: N x C (x 1 x 1), C > 1 (``metrics.compare_outputs``)."""
    return len(shape) >= 2 and shape[1] > 1 and all(d == 1 for d in shape[2:])


def check_target(target: AccuracyTarget, net: HybridNet) -> None:
    """Refuse, before any long work, a target the net's checked values cannot measure:
    ``detections`` without a DetectionOutput blob among them, ``top1`` without a
    classifier-shaped one (N x C). OptionError saying what to use instead."""
    checked = net.checked_values()
    if target.metric == "detections" and not any(v in detection_outputs(net.graph) for v in checked):
        raise OptionError(f"--accuracy-target {target.text}: {net.model.prototxt} has no DetectionOutput blob among "
                          f"its outputs ({', '.join(checked.values())}); use rel_l2=X or top1=P"
                          + (", or drop --output-blob" if any(l.type == "DetectionOutput" for l in
                                                             net.graph.layers.values()) else ""))
    if target.metric == "top1" and not any(is_classifier_shape(net.graph.values[v].shape) for v in checked):
        raise OptionError(f"--accuracy-target {target.text}: no output or Softmax input of {net.model.prototxt} "
                          f"has a class axis (N x C) to take a top-1 from ({', '.join(checked.values())}); use "
                          "rel_l2=X" + (" or detections=N" if detection_outputs(net.graph) else ""))


def measuring_points(net: HybridNet) -> list[str]:
    """Values whose relative L2 ranks layers: fixed-shape checked values and DetectionOutput inputs."""
    detections = detection_outputs(net.graph)
    points = [v for v in net.checked_values() if v not in detections]
    for layer in net.graph.layers.values():
        if layer.type == "DetectionOutput":
            points += [v for v in layer.bottoms if v not in points]
    return points




def error_of(net: HybridNet, got: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
             ) -> dict[str, Optional[float]]:
    """Worst relative L2 (fixed-shape checked values, and DetectionOutput's inputs where ``got``
    and ``reference`` hold them), lowest top-1 agreement (None: no
    classifier-shaped value), and detections found on one side only (None: no
    DetectionOutput blob; matched within ``DETECTION_TOLERANCE``, near-ties not counted) of
    ``got`` against Caffe's ``reference`` (both value id -> array)."""
    rows = net.compare_values(got, reference, DETECTION_TOLERANCE)
    fixed = [r.rel_l2 for r in rows if r.detections is None]
    # an SSD's location and confidence heads (DetectionOutput's inputs), where both sides have them
    checked = net.checked_values()
    fixed += [relative_l2(got[v], reference[v]) for v in measuring_points(net)
              if v not in checked and v in got and v in reference]
    top1 = [r.top1_agreement for r in rows if r.top1_agreement is not None]
    lone = [r.detections.real_lone_rows for r in rows if r.detections]
    return {"rel_l2": max(fixed) if fixed else None, "top1": min(top1) if top1 else None,
            "detections": float(sum(lone)) if lone else None}


@dataclass
class Step:
    """One configuration of the greedy search: the layer just kept in FP32 (None: all
    reduced; "(all kept)" for the reachability check); ``skipped``: undone, it made things worse."""
    kept: Optional[str]
    kept_type: Optional[str]
    rel_l2: Optional[float]
    top1: Optional[float]
    detections: Optional[float]
    latency_ms: float
    skipped: bool = False

    @property
    def error(self) -> dict[str, Optional[float]]:
        return {"rel_l2": self.rel_l2, "top1": self.top1, "detections": self.detections}


ALL_KEPT = "(all kept)"


@dataclass
class SensitivityReport:
    target: str
    #: Layer -> worst relative L2 at the measuring points against Caffe FP32, with only that layer reduced.
    sensitivity: dict[str, float]
    steps: list[Step] = field(default_factory=list)
    met: bool = False
    fp32_latency_ms: Optional[float] = None
    #: The best every candidate kept in FP32 can do (None: not measured).
    floor: Optional[Step] = None
    points: list[str] = field(default_factory=list)

    @property
    def kept(self) -> list[str]:
        return [s.kept for s in self.steps if s.kept is not None and not s.skipped]

    def to_json(self) -> dict[str, Any]:
        """As JSON-ready data; an infinite or NaN error becomes null."""
        finite = lambda x: x if x is None or math.isfinite(x) else None  # noqa: E731
        data = asdict(self)
        data["sensitivity"] = {k: finite(v) for k, v in data["sensitivity"].items()}
        for step in [*data["steps"], *([data["floor"]] if data["floor"] else [])]:
            step["rel_l2"] = finite(step["rel_l2"])
        return data

    def to_text(self) -> str:
        kept = len(self.kept)
        lines = [f"accuracy target {self.target}: " + (f"met with {kept} layer(s) kept in FP32" if self.met else
                 f"NOT met ({kept} layer(s) kept in FP32)")]
        if self.floor is not None and not self.met and len(self.steps) <= 1:
            lines.append(f"  unreachable: even with every candidate layer in FP32 the error is {_fmt(self.floor)}")
        if self.sensitivity:
            ranked = sorted(self.sensitivity.items(), key=lambda kv: -_rank(kv[1]))
            lines.append(f"most sensitive layers (worst relative L2 at {', '.join(self.points[:4])}"
                         f"{' ...' if len(self.points) > 4 else ''} with only that layer reduced): "
                         + ", ".join(f"{name} {err:.3g}" for name, err in ranked[:8]))
        steps = [*([self.floor] if self.floor else []), *self.steps]
        show_top1 = any(s.top1 is not None for s in steps)
        show_det = any(s.detections is not None for s in steps)
        header = f"  {'kept in FP32':<40} {'rel L2':>10}" + (f" {'top-1':>7}" if show_top1 else "") + \
            (f" {'det. differ':>11}" if show_det else "") + f" {'median ms':>10} {'cost ms':>8}"
        lines.append(header)
        previous = None
        for s in steps:
            if s.kept == ALL_KEPT:
                label, cost = "(every candidate kept)", "-"
            else:
                cost = "-" if previous is None or s.skipped else f"{s.latency_ms - previous:+.2f}"
                label = "(none: all reduced)" if s.kept is None else \
                    f"{'skipped' if s.skipped else '+'} {s.kept} ({s.kept_type})"
            line = f"  {label:<40} {_num(s.rel_l2):>10}"
            line += f" {'-' if s.top1 is None else f'{s.top1:.1%}':>7}" if show_top1 else ""
            line += f" {'-' if s.detections is None else f'{s.detections:g}':>11}" if show_det else ""
            lines.append(line + f" {s.latency_ms:>10.2f} {cost:>8}")
            if s.kept != ALL_KEPT and not s.skipped:
                previous = s.latency_ms
        if self.fp32_latency_ms is not None:
            lines.append(f"  {'(FP32 hybrid)':<40} {'':>10}" + (f" {'':>7}" if show_top1 else "")
                         + (f" {'':>11}" if show_det else "") + f" {self.fp32_latency_ms:>10.2f}")
        return "\n".join(lines)


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"


def _fmt(step: Step) -> str:
    parts = [f"relative L2 {_num(step.rel_l2)}"]
    if step.top1 is not None:
        parts.append(f"top-1 {step.top1:.1%}")
    if step.detections is not None:
        parts.append(f"{step.detections:g} detection(s) differ")
    return ", ".join(parts)


def _rank(error: float) -> float:
    return math.inf if math.isnan(error) else error


def search(plan: PrecisionPlan, make_net: Callable[[Optional[PrecisionPlan]], HybridNet],
           inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], target: AccuracyTarget, *,
           layers: Sequence[str], runs: int = 5, warmup: int = 1,
           tick: Optional[Callable[[], None]] = None) -> SensitivityReport:
    """Keep the most sensitive of ``layers`` in FP32 until ``target`` is met.

    ``make_net(plan)`` opens the hybrid with that plan (None: FP32) with the checked values
    among its segment outputs (``keep_logits=True``); ``reference`` is pure Caffe FP32 on
    ``inputs`` for the checked values and the measuring points (value id -> array, see
    ``measuring_points``). ``tick`` follows each measured configuration (the reachability
    check, one per candidate layer, then one per greedy step).
    """
    candidates = quantizable_layers(plan.graph, layers)
    if not candidates:
        raise OptionError("no layer in the TensorRT segments can be kept in FP32 (no Convolution, "
                          "Deconvolution, InnerProduct or Eltwise)")
    base_keep = set(plan.keep_fp32)

    def measure(kept: Optional[str], keep: Optional[set[str]], timed: bool = True) -> tuple[Step, float]:
        with make_net(None if keep is None else plan.with_keep_fp32(keep)) as net:
            points = measuring_points(net)
            checked = list(net.checked_values())
            values = net.run_values(inputs, list(dict.fromkeys([*checked, *points])))
            error = error_of(net, values, reference)
            worst = max((_rank(relative_l2(values[v], reference[v])) for v in points), default=0.0)
            latency = time_calls(lambda: net.run(inputs), runs, warmup).median * 1e3 if timed else 0.0
        if tick:
            tick()
        kept_type = plan.graph.layers[kept].type if kept and kept in plan.graph.layers else None
        return Step(kept, kept_type, error["rel_l2"], error["top1"], error["detections"], latency), worst

    with make_net(None) as fp32:
        fp32_ms = time_calls(lambda: fp32.run(inputs), runs, warmup).median * 1e3
        points = measuring_points(fp32)
    report = SensitivityReport(target.text, {}, fp32_latency_ms=fp32_ms, points=points)
    report.floor, _ = measure(ALL_KEPT, base_keep | set(candidates))
    report.floor.kept = ALL_KEPT
    first, _ = measure(None, set(base_keep))
    report.steps.append(first)
    if not target.met(report.floor.error) or target.met(first.error):
        report.met = target.met(first.error)
        return report
    report.sensitivity = {layer: measure(layer, base_keep | (set(candidates) - {layer}), timed=False)[1]
                          for layer in candidates}
    keep = set(base_keep)
    best = first
    skipped = []
    for layer in sorted(candidates, key=lambda name: -_rank(report.sensitivity[name])):
        if target.met(best.error):
            break
        step, _ = measure(layer, keep | {layer})
        if target.worse(step.error, best.error):
            step.skipped = True
            skipped.append(layer)
        else:
            keep.add(layer)
            best = step
        report.steps.append(step)
    for layer in skipped:  # the floor meets the target: the skipped layers, kept after all, lead there
        if target.met(best.error):
            break
        keep.add(layer)
        best, _ = measure(layer, set(keep))
        report.steps.append(best)
    report.met = target.met(best.error)
    return report
