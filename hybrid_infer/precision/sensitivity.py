"""Which layers to keep in FP32 for an accuracy target: measured, layer by layer.

1. Sensitivity: for every quantizable layer (Convolution, Deconvolution, InnerProduct,
   Eltwise) of the TensorRT segments, the hybrid runs with *only that layer* in reduced
   precision, and the TensorRT segments' outputs are compared with the FP32 hybrid's
   (relative L2 of the worst one). A layer's sensitivity is that error: what its
   quantization alone costs, measured where it is continuous even when the net's own
   output is not (a detector's list of boxes).
2. Greedy: starting from every layer in reduced precision, the most sensitive layer not
   yet kept goes back to FP32, and the whole hybrid is measured again (error and median
   latency), until the target is met. Each step records what keeping that layer bought
   (error) and cost (milliseconds).

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
from ..errors import OptionError
from ..detections import Thresholds, detection_outputs
from ..metrics import compare_outputs, relative_l2
from ..partition.partitioner import TENSORRT
from .plan import PrecisionPlan, quantizable_layers

#: Target metrics: at most (rel_l2, detections) or at least (top1) the value.
METRICS = ("rel_l2", "top1", "detections")


@dataclass(frozen=True)
class AccuracyTarget:
    """``rel_l2``: worst output's relative L2 against Caffe FP32 at most ``value``;
    ``top1``: top-1 agreement with Caffe FP32 at least ``value`` (classifiers);
    ``detections``: at most ``value`` detections differing from Caffe FP32's (SSD detectors)."""
    metric: str
    value: float

    def met(self, error: Mapping[str, Optional[float]]) -> bool:
        measured = error[self.metric]
        if measured is None:
            return False
        return measured >= self.value if self.metric == "top1" else measured <= self.value

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
        raise OptionError(f"--accuracy-target {text!r}: expected rel_l2=X (worst output's relative L2 "
                          "against Caffe FP32, e.g. rel_l2=0.02), top1=P (top-1 agreement, e.g. top1=0.99) "
                          "or detections=N (SSD detections differing from Caffe's, e.g. detections=0)")
    if metric == "top1" and number > 1:
        raise OptionError(f"--accuracy-target {text!r}: top-1 agreement is a fraction from 0 to 1")
    return AccuracyTarget(metric, number)


def error_of(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
             detections: Mapping[str, Thresholds] = {}) -> dict[str, Optional[float]]:
    """Worst relative L2, lowest top-1 agreement and the SSD detections found on one side
    only (outputs named in ``detections``, see ``detections.detection_outputs``)."""
    rows = compare_outputs(outputs, reference, detections=detections)
    top1 = [r.top1_agreement for r in rows if r.top1_agreement is not None]
    lone = [sum(d.kind in ("missing", "extra") for d in r.detections.diffs) for r in rows if r.detections]
    return {"rel_l2": max(r.rel_l2 for r in rows), "top1": min(top1) if top1 else None,
            "detections": float(sum(lone)) if lone else None}


@dataclass
class Step:
    """One configuration of the greedy search: the layer just kept in FP32 (None: all reduced)."""
    kept: Optional[str]
    kept_type: Optional[str]
    rel_l2: float
    top1: Optional[float]
    detections: Optional[float]
    latency_ms: float

    @property
    def error(self) -> dict[str, Optional[float]]:
        return {"rel_l2": self.rel_l2, "top1": self.top1, "detections": self.detections}


@dataclass
class SensitivityReport:
    target: str
    #: Layer -> worst relative L2 of the TensorRT segments' outputs against the FP32 hybrid,
    #: with only that layer in reduced precision.
    sensitivity: dict[str, float]
    steps: list[Step] = field(default_factory=list)
    met: bool = False
    fp32_latency_ms: Optional[float] = None

    @property
    def kept(self) -> list[str]:
        return [s.kept for s in self.steps if s.kept is not None]

    def to_json(self) -> dict[str, Any]:
        """As JSON-ready data; an infinite error (a detector that found another number of
        boxes has no relative L2) becomes null."""
        finite = lambda x: x if x is None or math.isfinite(x) else None  # noqa: E731
        data = asdict(self)
        data["sensitivity"] = {k: finite(v) for k, v in data["sensitivity"].items()}
        for step in data["steps"]:
            step["rel_l2"] = finite(step["rel_l2"])
        return data

    def to_text(self) -> str:
        lines = [f"accuracy target {self.target}: {'met' if self.met else 'NOT met'} with "
                 f"{len(self.kept)} layer(s) kept in FP32"]
        ranked = sorted(self.sensitivity.items(), key=lambda kv: -kv[1])
        lines.append("most sensitive layers (segment outputs' relative L2 with only that layer reduced): " +
                     ", ".join(f"{name} {err:.3g}" for name, err in ranked[:8]))
        lines.append(f"  {'kept in FP32':<36} {'rel L2':>10} {'top-1':>7} {'det. differ':>11} {'median ms':>10} "
                     f"{'cost ms':>8}")
        previous = None
        for s in self.steps:
            cost = "-" if previous is None else f"{s.latency_ms - previous:+.2f}"
            label = "(none: all reduced)" if s.kept is None else f"+ {s.kept} ({s.kept_type})"
            top1 = "-" if s.top1 is None else f"{s.top1:.1%}"
            detections = "-" if s.detections is None else f"{s.detections:g}"
            lines.append(f"  {label:<36} {s.rel_l2:>10.3g} {top1:>7} {detections:>11} {s.latency_ms:>10.2f} {cost:>8}")
            previous = s.latency_ms
        if self.fp32_latency_ms is not None:
            lines.append(f"  {'(FP32 hybrid)':<36} {'':>10} {'':>7} {'':>11} {self.fp32_latency_ms:>10.2f}")
        return "\n".join(lines)


def search(plan: PrecisionPlan, make_net: Callable[[Optional[PrecisionPlan]], HybridNet],
           inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], target: AccuracyTarget, *,
           layers: Sequence[str], runs: int = 5, warmup: int = 1,
           tick: Optional[Callable[[], None]] = None) -> SensitivityReport:
    """Keep the most sensitive of ``layers`` in FP32 until ``target`` is met.

    ``make_net(plan)`` opens the hybrid with that plan (None: FP32); ``reference`` is pure
    Caffe FP32 on ``inputs``. ``tick`` follows each measured configuration (one per
    candidate layer for the sensitivities, then one per greedy step).
    """
    candidates = quantizable_layers(plan.graph, layers)
    if not candidates:
        raise OptionError("no layer in the TensorRT segments can be kept in FP32 (no Convolution, "
                          "Deconvolution, InnerProduct or Eltwise)")
    base_keep = set(plan.keep_fp32)
    with make_net(None) as fp32:
        outputs = [v for se in fp32.segment_engines if se.segment.backend == TENSORRT for v in se.segment.outputs]
        fp32_values = fp32.run_values(inputs, outputs)
        fp32_ms = time_calls(lambda: fp32.run(inputs), runs, warmup).median * 1e3
    # A DetectionOutput's row count varies with the data: no relative L2 to rank by there.
    detections = detection_outputs(plan.graph)
    boundary = [v for v in outputs if v not in detections]
    if not boundary:
        raise OptionError("the TensorRT segments' only outputs are DetectionOutput rows, whose number varies: "
                          "add --output-blob for the blobs that feed DetectionOutput (e.g. the mbox_loc and "
                          "mbox_conf concatenations) so each layer's sensitivity can be measured there")

    def segment_error(keep: set[str]) -> float:
        with make_net(plan.with_keep_fp32(keep)) as net:
            values = net.run_values(inputs, boundary)
        if tick:
            tick()
        return max(relative_l2(values[v], fp32_values[v]) for v in boundary)

    def step(kept: Optional[str], keep: set[str]) -> Step:
        with make_net(plan.with_keep_fp32(keep)) as net:
            error = error_of(net.run(inputs), reference, detection_outputs(plan.graph))
            latency = time_calls(lambda: net.run(inputs), runs, warmup).median * 1e3
        if tick:
            tick()
        kept_type = plan.graph.layers[kept].type if kept else None
        return Step(kept, kept_type, error["rel_l2"] or 0.0, error["top1"], error["detections"], latency)

    sensitivity = {layer: segment_error(base_keep | (set(candidates) - {layer})) for layer in candidates}
    report = SensitivityReport(target.text, sensitivity, fp32_latency_ms=fp32_ms)
    keep = set(base_keep)
    report.steps.append(step(None, keep))
    for layer in sorted(candidates, key=lambda name: -sensitivity[name]):
        if target.met(report.steps[-1].error):
            break
        keep.add(layer)
        report.steps.append(step(layer, keep))
    report.met = target.met(report.steps[-1].error)
    return report
